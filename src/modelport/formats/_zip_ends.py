"""Where a zip's central directory lies, as each of its two kinds of reader finds it.

torch's reader (miniz, under caffe2/serialize/inline_container.cc) and Python's ``zipfile``
(``numpy.load``, Keras) agree on every zip a writer makes, and can be made to disagree:

- miniz reads the directory at the end record's ``cd_offset``; with a zip64 locator just
  before the end record, from the zip64 end record the locator points at. Header offsets
  are taken as written.
- ``zipfile`` (Lib/zipfile.py: ``_EndRecData``, ``_EndRecData64``, ``_RealGetContents``)
  takes the end record from the last 22 bytes when they are one with no comment, else the
  last signature in the last 64 KiB + 22 bytes. It reads the zip64 end record from the 56
  bytes just before the locator, whatever offset the locator holds, and keeps the 32-bit
  fields when those bytes are no such record. The directory is the ``cd_size`` bytes that
  end where that record begins: ``concat = record_at - cd_size - cd_offset`` (bytes in front
  of the zip, as zipfile sees it) is added to the directory's offset and to every header
  offset, whatever its sign. Names end at their first NUL (``ZipInfo.__init__``).

So one file can hold two directories, one per kind of loader; ``ZipEnd`` is what a reader
takes from the end records, and two equal ``ZipEnd`` read the same directory the same way.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from modelport.errors import CorruptFileError, ModelportError, TruncatedFileError

EOCD_SIGNATURE = b"PK\x05\x06"
LOCAL_SIGNATURE = b"PK\x03\x04"
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
EOCD_SIZE = 22
LOCATOR_SIZE = 20
ZIP64_EOCD_SIZE = 56  # the fixed part; zipfile assumes no extensible data follows it
MAX_COMMENT = 0xFFFF
# What either reader looks at of a zip's end: the end record and its comment, a locator and
# a zip64 record before it.
TAIL_BYTES = EOCD_SIZE + MAX_COMMENT + LOCATOR_SIZE + ZIP64_EOCD_SIZE
_ZIPFILE_SEARCH = (1 << 16) + EOCD_SIZE  # zipfile's end-record search, from the file's end
_EOCD = struct.Struct("<4sHHHHIIH")
_LOCATOR = struct.Struct("<4sIQI")  # signature, disk, zip64 record offset, disks

ReadAt = Callable[[int, int], bytes]  # (offset from the zip's start, count) -> bytes


class ZipView(Enum):
    """Which kind of reader a directory is read for."""

    TORCH = "torch"  # torch.load, torch.jit.load, torch.export.load: miniz
    ZIPFILE = "zipfile"  # numpy.load, Keras, anything opened with Python's zipfile


@dataclass(frozen=True)
class ZipEnd:
    """What one reader takes from a zip's end records, offsets from the zip's start."""

    directory_at: int  # the central directory's first byte
    directory_size: int
    count: int  # members the end record declares (zipfile walks the directory by size)
    shift: int  # added to every member's header offset: zipfile's ``concat``, 0 for torch
    zip64: bool


def torch_end(tail: bytes, size: int, read: ReadAt, path: Path) -> ZipEnd:
    """The end as miniz reads it; ``tail`` is the zip's last ``TAIL_BYTES`` (or all of it)."""
    eocd_at = tail.rfind(EOCD_SIGNATURE)
    if eocd_at < 0 or eocd_at + EOCD_SIZE > len(tail):
        raise TruncatedFileError(
            "zip archive has no end-of-central-directory record (truncated download?)",
            expected=size + 1,
            actual=size,
            path=path,
        )
    count, cd_size, cd_offset = _EOCD.unpack_from(tail, eocd_at)[4:7]
    record_at = size - len(tail) + eocd_at
    locator_at = eocd_at - LOCATOR_SIZE
    zip64 = locator_at >= 0 and tail.startswith(ZIP64_LOCATOR_SIGNATURE, locator_at)
    if zip64:
        zip64_offset = _LOCATOR.unpack_from(tail, locator_at)[2]
        if zip64_offset + ZIP64_EOCD_SIZE > size:
            raise CorruptFileError("zip64 end record points past the file", path=path)
        record = read(zip64_offset, ZIP64_EOCD_SIZE)
        if len(record) < ZIP64_EOCD_SIZE or not record.startswith(ZIP64_EOCD_SIGNATURE):
            raise CorruptFileError("zip64 end record missing", path=path)
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", record, 32)
        record_at = zip64_offset
    if cd_offset + cd_size > record_at:
        raise TruncatedFileError(
            f"zip central directory claims bytes {cd_offset}..{cd_offset + cd_size} "
            f"but the file's directory ends at {record_at}",
            expected=cd_offset + cd_size,
            actual=record_at,
            path=path,
        )
    return ZipEnd(cd_offset, cd_size, count, 0, zip64)


def zipfile_end(tail: bytes, size: int, read: ReadAt, path: Path) -> ZipEnd:
    """The end as Python's ``zipfile`` reads it; raises where ``zipfile`` refuses the file
    (its loaders then read nothing)."""
    last = tail[-EOCD_SIZE:]
    if len(last) == EOCD_SIZE and last.startswith(EOCD_SIGNATURE) and last.endswith(b"\0\0"):
        eocd_at = len(tail) - EOCD_SIZE
    else:
        window = min(len(tail), _ZIPFILE_SEARCH)
        eocd_at = tail.rfind(EOCD_SIGNATURE, len(tail) - window)
        if eocd_at < 0 or eocd_at + EOCD_SIZE > len(tail):
            raise CorruptFileError("Python's zipfile finds no end record: not a zip", path=path)
    count, cd_size, cd_offset = _EOCD.unpack_from(tail, eocd_at)[4:7]
    record_at = size - len(tail) + eocd_at
    zip64 = False
    if record_at >= LOCATOR_SIZE:
        locator = read(record_at - LOCATOR_SIZE, LOCATOR_SIZE)
        if locator.startswith(ZIP64_LOCATOR_SIGNATURE):
            _, disk, _, disks = _LOCATOR.unpack(locator)
            if disk != 0 or disks > 1:
                raise CorruptFileError("zip spans several disks: zipfile refuses it", path=path)
            zip64_at = record_at - LOCATOR_SIZE - ZIP64_EOCD_SIZE
            if zip64_at < 0:
                raise CorruptFileError("zip64 locator at the file's start", path=path)
            record = read(zip64_at, ZIP64_EOCD_SIZE)
            if record.startswith(ZIP64_EOCD_SIGNATURE):
                count, cd_size, cd_offset = struct.unpack_from("<QQQ", record, 32)
                zip64 = True
    directory_at = record_at - cd_size - (LOCATOR_SIZE + ZIP64_EOCD_SIZE if zip64 else 0)
    if directory_at < 0:
        raise CorruptFileError(
            f"the {cd_size:,}-byte central directory would begin before the file", path=path
        )
    return ZipEnd(directory_at, cd_size, count, directory_at - cd_offset, zip64)


def prepended_bytes(path: Path) -> int:
    """How many bytes precede the zip in ``path`` (a pickle with a zip appended, a
    self-extracting archive): where the central directory really is minus where the end
    record says it is (the zip64 record's, when there is one), as Python's ``zipfile``
    computes it. torch does not read such files."""
    size = path.stat().st_size
    with open(path, "rb") as handle:

        def read_at(offset: int, count: int) -> bytes:
            return os.pread(handle.fileno(), count, offset) if offset >= 0 else b""

        try:
            end = zipfile_end(
                read_at(size - min(size, TAIL_BYTES), TAIL_BYTES), size, read_at, path
            )
        except ModelportError:
            return 0
    return max(0, end.shift)


def has_zip_tail(data: memoryview) -> bool:
    """Whether bytes that do not start as a zip end with one (a polyglot: loaders that
    read from either end see different files)."""
    tail = bytes(data[-(1 << 16) - 22 :])
    return EOCD_SIGNATURE in tail and bytes(data[:4]) != LOCAL_SIGNATURE
