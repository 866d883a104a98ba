"""numpy ``.npz``: a zip archive of ``.npy`` members, one per array.

Layout (numpy ``savez`` / ``savez_compressed``):

- a zip archive (read with modelport's own directory parser, ``formats/_zip.py``) whose
  members MUST all be named ``<array name>.npy``;
- each member is a complete ``.npy`` (see ``formats/npy.py``), stored (``savez``) or
  deflated (``savez_compressed``); zip64 records appear past 4 GiB.

Choices and edge cases:

- tensor names are member names without ``.npy``; when a name repeats, the last member
  wins, as in ``numpy.load`` (Python's ``zipfile``), with a warning;
- stored members are zero-copy: a storage at the member's data offset plus its header;
- deflated members get a storage that inflates that member on access, and only it. A
  member's declared size MUST equal its header plus ``prod(shape) * itemsize``, MUST be
  reachable from its compressed size (deflate expands at most ``MAX_RATIO`` to one), and
  inflation stops at that size, so a zip bomb costs at most what its header honestly
  declares; the CRC-32 is checked once the member has been inflated;
- object arrays are read as in ``.npy`` files (a pickle, never executed), with a warning.

Sniffing claims a zip whose members are all ``*.npy``, which no torch archive is.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from modelport.errors import CorruptFileError, TruncatedFileError
from modelport.formats import npy
from modelport.formats._base import Contents, Format, FormatReader, Probe
from modelport.formats._zip import DEFLATED, STORED, ZipDirectory, ZipEntry
from modelport.tensors import NDArray, TensorRef

SUFFIX = ".npy"
CHUNK = 1 << 20
MAX_RATIO = 1032  # deflate's largest possible expansion (258-byte matches in 2-bit codes)
RATIO_SLACK = 1024


def sniff(probe: Probe) -> bool:
    directory = probe.zip
    if directory is None or not directory.entries:
        return False
    return all(entry.name.endswith(SUFFIX) for entry in directory.entries)


def inflate(path: Path, entry: ZipEntry, skip: int, count: int) -> NDArray:
    """Bytes ``skip .. skip + count`` of a deflated member, inflating no further than that
    (the CRC-32 is checked when the range reaches the member's end)."""
    end = skip + count
    out = np.empty(count, dtype=np.uint8)
    inflater = zlib.decompressobj(-15)
    produced, crc = 0, 0
    with open(path, "rb") as handle:
        handle.seek(entry.data_offset)
        left = entry.compressed_size
        pending = b""
        while produced < end:
            if not pending:
                if left == 0 or inflater.eof:
                    break
                pending = handle.read(min(CHUNK, left))
                left -= len(pending)
                if not pending:
                    break
            try:
                piece = inflater.decompress(pending, min(end - produced, CHUNK))
            except zlib.error as exc:
                raise CorruptFileError(
                    f"npz member {entry.name!r} is not valid deflate data ({exc})", path=path
                ) from None
            pending = inflater.unconsumed_tail
            crc = zlib.crc32(piece, crc)
            low, high = max(skip - produced, 0), min(end - produced, len(piece))
            if high > low:
                start = produced + low - skip
                out[start : start + high - low] = np.frombuffer(piece, np.uint8)[low:high]
            produced += len(piece)
    if produced < end:
        raise TruncatedFileError(
            f"npz member {entry.name!r} inflates to {produced} bytes, {end} were expected",
            expected=end,
            actual=produced,
            path=path,
        )
    if end == entry.size and crc != entry.crc32:
        raise CorruptFileError(f"npz member {entry.name!r} fails its CRC-32 check", path=path)
    return out


def _read_prefix(handle: BinaryIO, path: Path, entry: ZipEntry) -> bytes:
    count = min(entry.size, npy.MAX_PREFIX)
    if entry.is_stored:
        handle.seek(entry.data_offset)
        return handle.read(count)
    return inflate(path, entry, 0, count).tobytes()


def _member(directory: ZipDirectory, handle: BinaryIO, entry: ZipEntry, warnings: list[str]) -> Any:
    path = directory.path
    where = f" member {entry.name!r}"
    if entry.method not in (STORED, DEFLATED):
        raise CorruptFileError(
            f"npz{where} uses zip compression method {entry.method} (numpy writes stored or "
            "deflated members)",
            path=path,
        )
    if entry.is_stored and entry.size != entry.compressed_size:
        raise CorruptFileError(
            f"npz{where} is stored but declares {entry.size} bytes in {entry.compressed_size}",
            path=path,
        )
    if entry.size > entry.compressed_size * MAX_RATIO + RATIO_SLACK:
        raise CorruptFileError(
            f"npz{where} declares {entry.size:,} bytes from {entry.compressed_size:,} "
            "compressed, more than deflate can produce",
            path=path,
        )
    header = npy.parse_header(
        _read_prefix(handle, path, entry), path=path, where=where, available=entry.size
    )
    if header.warning:
        warnings.append(f"{entry.name}: {header.warning}" if header.is_object else header.warning)
    if header.is_object:
        data = directory.read_member(entry, npy.MAX_PICKLE)
        stored = entry.is_stored
        return npy.object_array(
            data,
            header,
            path=path if stored else None,
            base_offset=entry.data_offset if stored else 0,
        )
    expected = header.data_offset + header.nbytes
    if entry.size != expected:
        raise CorruptFileError(
            f"npz{where} declares {entry.size:,} bytes but its header describes "
            f"{expected:,} ({header.descr} array of shape {list(header.shape)})",
            path=path,
        )
    if entry.is_stored:
        return npy.tensor_ref(header, path, entry.data_offset + header.data_offset, key=entry.name)

    def inflated() -> NDArray:
        return inflate(path, entry, header.data_offset, header.nbytes)

    return npy.tensor_ref(header, path, entry.data_offset, key=entry.name, reader=inflated)


def read(path: Path, probe: Probe) -> Contents:
    directory: ZipDirectory = probe.zip
    if directory is None:
        raise CorruptFileError("not a zip archive", path=path)
    warnings = [f"zip member name escapes the archive: {name!r}" for name in directory.unsafe_names]
    chosen: dict[str, ZipEntry] = {}
    for entry in directory.entries:
        if not entry.name.endswith(SUFFIX):
            raise CorruptFileError(f"npz member {entry.name!r} is not a .npy", path=path)
        name = entry.name[: -len(SUFFIX)]
        if name in chosen:
            warnings.append(f"npz member {entry.name!r} appears more than once: the last wins")
        chosen[name] = entry
    tree: dict[str, TensorRef | Any] = {}
    with open(path, "rb") as handle:
        for name, entry in chosen.items():
            tree[name] = _member(directory, handle, entry, warnings)
    stored = sum(1 for e in chosen.values() if e.is_stored)
    details = {"members": len(chosen), "stored": stored, "deflated": len(chosen) - stored}
    return Contents(Format.NPZ, tree, details=details, warnings=warnings)


READER = FormatReader(Format.NPZ, sniff, read, (".npz",))
