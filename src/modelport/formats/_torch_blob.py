"""A ``torch.save`` blob lying inside another file: a DCP chunk, or the bytes a plain pickle
hands to ``torch.storage._load_from_bytes``.

Layout (torch/serialization.py):

- zip blob (``torch.save`` default since 1.6): MUST be a whole zip archive whose offsets are
  relative to the blob's first byte; read through ``ZipDirectory.read(path, start, length)``
  so tensor bytes stay a range of the outer file;
- legacy blob (``_use_new_zipfile_serialization=False``, what ``TypedStorage.__reduce__``
  writes): five pickles in a row (the magic number ``0x1950a86a20f9469cfc6c``, the protocol
  version ``1001``, a sys-info dict, the object with persistent ids
  ``("storage", <torch.XStorage>, key, location, numel, view_metadata)``, the sorted list of
  storage keys), then for each key in that order a little-endian u64 element count followed
  by ``count * itemsize`` raw bytes;
- ``view_metadata`` MAY be ``(view_key, element_offset, numel)``: an old-style storage view.

Every pickle goes through modelport's restricted machine; every count is checked against
the blob's length before use.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Final

from modelport import dtypes
from modelport.errors import CorruptFileError, UnsupportedVersionError
from modelport.formats._legacy_stream import MAGIC_NUMBER
from modelport.formats._zip import LOCAL_SIGNATURE, ZipDirectory
from modelport.formats.torch_zip import archive_prefix, load_archive_pickle
from modelport.pickles.reading import read_pickle
from modelport.pickles.torch_types import StorageType, TypedStorage
from modelport.tensors import NDArray, Storage, byte_array

LEGACY_PROTOCOL_VERSION: Final = 1001


def read_torch_blob(
    data: memoryview, *, path: Path | None, file_offset: int | None
) -> tuple[Any, str]:
    """The object a ``torch.save`` blob holds, and which kind of blob it was.

    ``data`` is the blob's bytes; when ``path`` and ``file_offset`` locate it in a file, its
    storages are ranges of that file, otherwise they read from ``data``.
    """
    if bytes(data[:4]) == LOCAL_SIGNATURE:
        if path is None or file_offset is None:
            raise UnsupportedVersionError(
                "a zip-format torch.save blob can only be read from an uncompressed file"
            )
        directory = ZipDirectory.read(path, start=file_offset, length=len(data))
        prefix = archive_prefix(directory)
        if prefix is None:
            raise CorruptFileError("embedded torch zip has no data.pkl", path=path)
        value, _ = load_archive_pickle(directory, prefix, "data.pkl", path)
        return value, "zip"
    return _read_legacy(data, path, file_offset), "legacy"


def _read_legacy(data: memoryview, path: Path | None, file_offset: int | None) -> Any:
    magic = read_pickle(data)
    if magic.value != MAGIC_NUMBER:
        raise CorruptFileError("torch blob is neither a zip archive nor a legacy torch.save")
    version = read_pickle(data, start=magic.end)
    if version.value != LEGACY_PROTOCOL_VERSION:
        raise UnsupportedVersionError(f"legacy torch protocol version {version.value!r}")
    info = read_pickle(data, start=version.end)
    if isinstance(info.value, dict) and info.value.get("little_endian") is False:
        raise UnsupportedVersionError("big-endian torch saves are not supported yet")
    requested: dict[str, StorageType] = {}

    def record(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CorruptFileError(f"unexpected persistent id {pid!r:.80}")
        if not isinstance(pid[1], StorageType):
            raise CorruptFileError(f"storage {pid[2]!r} has no known storage type")
        requested.setdefault(str(pid[2]), pid[1])
        return None

    main_start = info.end
    main = read_pickle(data, start=main_start, storage_loader=record)
    keys = read_pickle(data, start=main.end)
    if not isinstance(keys.value, list) or not all(isinstance(k, str) for k in keys.value):
        raise CorruptFileError("legacy torch blob: storage key list is malformed")
    storages: dict[str, TypedStorage] = {}
    position = keys.end
    for key in keys.value:
        if key not in requested:
            raise CorruptFileError(f"legacy torch blob: storage {key!r} is never used")
        dtype = requested[key].dtype
        if position + 8 > len(data):
            raise CorruptFileError(f"legacy torch blob: storage {key!r} is cut short")
        (numel,) = struct.unpack("<q", data[position : position + 8])
        nbytes = numel * dtypes.dtype(dtype).itemsize
        position += 8
        if numel < 0 or position + nbytes > len(data):
            raise CorruptFileError(
                f"legacy torch blob: storage {key!r} claims {nbytes} bytes, "
                f"{len(data) - position} remain"
            )
        storage = _storage(data, position, nbytes, path, file_offset, key)
        storages[key] = TypedStorage(storage, dtype, numel, "cpu")
        position += nbytes

    def resolve(pid: Any) -> TypedStorage:
        key = str(pid[2])
        if key not in storages:
            raise CorruptFileError(f"legacy torch blob: storage {key!r} has no data")
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return storages[key]
        return _view(storages[key], view)

    return read_pickle(data, start=main_start, storage_loader=resolve).value


def _storage(
    data: memoryview, start: int, nbytes: int, path: Path | None, file_offset: int | None, key: str
) -> Storage:
    if path is not None and file_offset is not None:
        return Storage(path, file_offset + start, nbytes, key=key)
    chunk = data[start : start + nbytes]
    return Storage(None, 0, nbytes, key=key, reader=lambda: byte_array(chunk))


def _view(base: TypedStorage, view: Any) -> TypedStorage:
    if not (
        isinstance(view, tuple)
        and len(view) == 3
        and all(isinstance(v, int) and v >= 0 for v in view[1:])
    ):
        raise CorruptFileError("legacy torch blob: malformed storage view")
    _, offset, numel = view
    itemsize = dtypes.dtype(base.dtype).itemsize
    if offset + numel > base.numel:
        raise CorruptFileError("legacy torch blob: storage view runs past its storage")
    st = base.storage
    if st.reader is None:
        storage = Storage(st.path, st.offset + offset * itemsize, numel * itemsize, key=st.key)
    else:
        outer = st

        def read_view() -> NDArray:
            return outer.bytes_view()[offset * itemsize : (offset + numel) * itemsize]

        storage = Storage(None, 0, numel * itemsize, key=st.key, reader=read_view)
    return TypedStorage(storage, base.dtype, numel, base.location)
