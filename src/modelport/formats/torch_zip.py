"""torch zip checkpoints: what ``torch.save`` writes since torch 1.6.

Layout (torch/serialization.py; the prefix is the file's stem, ``archive`` for file objects):

- ``<prefix>/data.pkl``: the object tree as a pickle; each storage is a persistent id
  ``("storage", <torch.XStorage>, key, location, numel)``;
- ``<prefix>/data/<key>``: each storage's raw bytes, stored uncompressed, 64-byte aligned;
- ``<prefix>/byteorder`` (``little`` or ``big``), ``<prefix>/version``, ``.format_version``,
  ``.storage_alignment``, ``.data/serialization_id``: bookkeeping.

TorchScript archives (``code/``, ``constants.pkl``) and ``torch.export`` archives
(``models/``) are zips too; their own modules claim them first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelport import dtypes
from modelport.errors import CorruptFileError, TruncatedFileError, UnsupportedVersionError
from modelport.formats._base import Contents, Format, FormatReader, Probe
from modelport.formats._zip import ZipDirectory, ZipEntry
from modelport.pickles.reading import read_pickle
from modelport.pickles.torch_types import StorageType, TypedStorage
from modelport.tensors import Storage


def archive_prefix(directory: ZipDirectory) -> str | None:
    """The folder holding ``data.pkl`` (torch takes the first record's top-level folder)."""
    names = directory.names()
    if not names:
        return None
    first = names[0].split("/", 1)[0]
    if f"{first}/data.pkl" in names:
        return first
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            return parts[0]
    return None


def sniff(probe: Probe) -> bool:
    return probe.zip is not None and archive_prefix(probe.zip) is not None


def load_archive_pickle(
    directory: ZipDirectory, prefix: str, member: str, path: Path, *, data_dir: str = "data"
) -> tuple[Any, dict[str, Any]]:
    """Interpret ``<prefix>/<member>`` with storages resolved to ``<prefix>/<data_dir>/<key>``.

    Returns the tree and facts gathered on the way (storage locations). Shared by the
    TorchScript reader, whose archives use the same storage scheme (``constants.pkl`` keeps
    its storages under ``constants/``).
    """
    entry = directory.find(f"{prefix}/{member}")
    if entry is None:
        raise CorruptFileError(f"archive has no {prefix}/{member}", path=path)
    order = directory.find(f"{prefix}/byteorder")
    if order is not None and directory.read_member(order, 16).strip() not in (b"little", b""):
        raise UnsupportedVersionError("big-endian torch archives are not supported yet", path=path)
    storages: dict[str, TypedStorage] = {}
    locations: set[str] = set()

    def load_storage(pid: Any) -> TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CorruptFileError(f"unexpected persistent id {pid!r:.80}", path=path)
        _, storage_type, key, location, numel = pid[:5]
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0:
            raise CorruptFileError(f"malformed storage id for key {key!r}", path=path)
        key = str(key)
        locations.add(str(location))
        cached = storages.get(key)
        if cached is not None:
            return cached
        record = directory.find(f"{prefix}/{data_dir}/{key}")
        if record is None:
            raise CorruptFileError(f"storage {key!r} is missing from the archive", path=path)
        nbytes = numel * dtypes.dtype(storage_type.dtype).itemsize
        if record.size < nbytes:
            raise TruncatedFileError(
                f"storage {key!r} holds {record.size} bytes, its tensors need {nbytes}",
                expected=nbytes,
                actual=record.size,
                path=path,
            )
        reader = None if record.is_stored else _inflating_reader(directory, record, nbytes)
        storage = Storage(path, record.data_offset, nbytes, key=key, reader=reader)
        typed = TypedStorage(storage, storage_type.dtype, numel, str(location))
        storages[key] = typed
        return typed

    data = directory.read_member(entry)
    base = entry.data_offset if entry.is_stored else 0
    result = read_pickle(
        data, path=path if entry.is_stored else None, base_offset=base, storage_loader=load_storage
    )
    return result.value, {"storages": len(storages), "devices": sorted(locations)}


def _inflating_reader(
    directory: ZipDirectory, record: ZipEntry, nbytes: int
) -> Callable[[], np.ndarray[Any, np.dtype[np.uint8]]]:
    """Storages written compressed (by zip tools, not torch) are inflated on first read."""

    def read_bytes() -> np.ndarray[Any, np.dtype[np.uint8]]:
        return np.frombuffer(directory.read_member(record)[:nbytes], np.uint8)

    return read_bytes


def read(path: Path, probe: Probe) -> Contents:
    directory: ZipDirectory = probe.zip
    prefix = archive_prefix(directory)
    if prefix is None:
        raise CorruptFileError("zip archive has no data.pkl", path=path)
    tree, facts = load_archive_pickle(directory, prefix, "data.pkl", path)
    version = directory.find(f"{prefix}/version")
    details: dict[str, Any] = {"archive_prefix": prefix, **facts}
    if version is not None:
        details["archive_version"] = (
            directory.read_member(version, 64).decode("ascii", "replace").strip()
        )
    warnings = [f"zip member name escapes the archive: {name!r}" for name in directory.unsafe_names]
    return Contents(Format.TORCH_ZIP, tree, details=details, warnings=warnings)


READER = FormatReader(Format.TORCH_ZIP, sniff, read, (".pt", ".pth", ".bin", ".ckpt", ".tar"))
