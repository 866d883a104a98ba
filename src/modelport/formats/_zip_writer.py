"""Writing zip archives the way torch's writer does: stored members, aligned data, zip64.

Layout written (APPNOTE 6.3.10), the reading side being ``formats/_zip.py``:

- each member: a local file header (signature, version needed 20, or 45 with zip64, flags
  ``0x0800`` (UTF-8 names), method 0 (STORED), DOS time 1980-01-01 00:00, CRC-32, sizes,
  name, extra field), then the member's bytes, uncompressed;
- the local extra field MAY start with a zip64 record (tag ``0x0001``: uncompressed and
  compressed size, u64 each; the header's 32-bit sizes are then ``0xFFFFFFFF``) when the
  member reaches ``ZIP64_LIMIT`` bytes; it always ends with torch's padding record (tag
  ``"FB"``, ``0x4246``, filled with ``Z``) sized so the member's data starts at a multiple
  of ``align`` bytes in the file (64 for torch archives: storages are memory-mapped);
- sizes are known before a member is written; its CRC-32 is not (it may still be being
  computed on the checking thread, see ``readback``), so the local header is written with
  CRC 0 and patched (seek back, write 4 bytes) by ``finish``, before the directory;
- the central directory repeats each member's facts; its zip64 record holds only the values
  that reach ``ZIP64_LIMIT`` (uncompressed size, compressed size, local header offset, in
  that order), the 32-bit fields are then ``0xFFFFFFFF``;
- the end: a zip64 end-of-central-directory record and its locator (as torch writes them;
  not in an empty archive, which MUST begin with its end record for numpy to see a zip),
  then the classic end record, whose fields read ``0xFFFF``/``0xFFFFFFFF`` where the real
  value does not fit.

Member names MUST be unique; a repeated name is refused (readers disagree on which copy
wins). ``crc32_combine`` joins two CRC-32s without re-reading bytes (zlib's algorithm), for
members whose bytes come from two writers (an ``.npy`` header, then streamed tensor data).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO

from modelport.errors import ConversionError
from modelport.formats._zip import (
    CENTRAL_SIGNATURE,
    EOCD_SIGNATURE,
    LOCAL_SIGNATURE,
    ZIP64_EOCD_SIGNATURE,
    ZIP64_LOCATOR_SIGNATURE,
)
from modelport.transfer.readback import Checksum
from modelport.transfer.streaming import write_all

ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 records
MAX_SHORT_COUNT = 0xFFFF
VERSION = 20
VERSION_ZIP64 = 45
FLAG_UTF8 = 0x0800
DOS_TIME = 0
DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01
PAD_BYTE = b"Z"
CRC_FIELD = 14  # offset of the CRC-32 in a local file header

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_END = struct.Struct("<4sHHHHIIH")


class ExtraTag(IntEnum):
    """Extra field records written in local and central headers."""

    ZIP64 = 0x0001  # 64-bit sizes and offset
    TORCH_PADDING = 0x4246  # b"FB": torch's alignment padding, filled with b"Z"


@dataclass(frozen=True)
class Member:
    """One written member, as the central directory will describe it."""

    name: bytes
    header_offset: int
    size: int
    crc32: Checksum


class ZipWriter:
    """Appends stored members to ``handle`` (seekable), then ``finish`` writes the directory."""

    def __init__(self, handle: BinaryIO, *, align: int = 64) -> None:
        self.handle = handle
        self.align = align
        self.members: list[Member] = []
        self._names: set[bytes] = set()

    def add(self, name: str, data: bytes) -> None:
        """A member whose bytes are already in memory (pickles, small text records)."""

        def fill() -> Checksum:
            write_all(self.handle, data)
            crc = zlib.crc32(data)
            return lambda: crc

        self.add_stream(name, len(data), fill)

    def add_stream(self, name: str, size: int, fill: Callable[[], Checksum]) -> None:
        """A member of ``size`` bytes that ``fill`` appends to the handle; ``fill`` returns
        what gives their CRC-32, asked for by ``finish``."""
        raw = name.encode("utf-8")
        if raw in self._names:
            raise ConversionError(f"zip member {name!r} would be written twice")
        if len(raw) > 0xFFFF:
            raise ConversionError(f"zip member name of {len(raw):,} bytes is too long")
        self._names.add(raw)
        offset = self.handle.tell()
        big = size >= ZIP64_LIMIT
        extra = struct.pack("<HHQQ", ExtraTag.ZIP64, 16, size, size) if big else b""
        before_pad = offset + _LOCAL.size + len(raw) + len(extra) + 4
        extra += struct.pack("<HH", ExtraTag.TORCH_PADDING, -before_pad % self.align)
        extra += PAD_BYTE * (-before_pad % self.align)
        short = 0xFFFFFFFF if big else size
        header = _LOCAL.pack(
            LOCAL_SIGNATURE,
            VERSION_ZIP64 if big else VERSION,
            FLAG_UTF8,
            0,
            DOS_TIME,
            DOS_DATE,
            0,
            short,
            short,
            len(raw),
            len(extra),
        )
        write_all(self.handle, header + raw + extra)
        start = self.handle.tell()
        crc = fill()
        end = self.handle.tell()
        if end - start != size:
            raise ConversionError(f"zip member {name!r}: wrote {end - start} bytes, not {size}")
        self.members.append(Member(raw, offset, size, crc))

    def finish(self) -> None:
        """Each local header's CRC-32, then the central directory, the zip64 end record and
        locator, the end record."""
        cd_offset = self.handle.tell()
        crcs = [member.crc32() for member in self.members]
        for member, crc in zip(self.members, crcs, strict=True):
            self.handle.seek(member.header_offset + CRC_FIELD)
            write_all(self.handle, struct.pack("<I", crc))
        self.handle.seek(cd_offset)
        directory = bytearray()
        for member, crc in zip(self.members, crcs, strict=True):
            directory += _central_record(member, crc)
        write_all(self.handle, bytes(directory))
        cd_size = len(directory)
        count = len(self.members)
        zip64_end = self.handle.tell()
        if count:  # an empty archive is its end record alone: numpy sniffs zips by PK\5\6
            write_all(
                self.handle,
                _ZIP64_END.pack(
                    ZIP64_EOCD_SIGNATURE,
                    _ZIP64_END.size - 12,
                    VERSION_ZIP64,
                    VERSION_ZIP64,
                    0,
                    0,
                    count,
                    count,
                    cd_size,
                    cd_offset,
                )
                + _ZIP64_LOCATOR.pack(ZIP64_LOCATOR_SIGNATURE, 0, zip64_end, 1),
            )
        short_count = min(count, MAX_SHORT_COUNT)
        write_all(
            self.handle,
            _END.pack(
                EOCD_SIGNATURE,
                0,
                0,
                short_count,
                short_count,
                0xFFFFFFFF if cd_size >= ZIP64_LIMIT else cd_size,
                0xFFFFFFFF if cd_offset >= ZIP64_LIMIT else cd_offset,
                0,
            ),
        )


def _central_record(member: Member, crc: int) -> bytes:
    zip64 = b""
    sizes = member.size
    if member.size >= ZIP64_LIMIT:
        zip64 += struct.pack("<QQ", member.size, member.size)
        sizes = 0xFFFFFFFF
    offset = member.header_offset
    if offset >= ZIP64_LIMIT:
        zip64 += struct.pack("<Q", offset)
        offset = 0xFFFFFFFF
    extra = struct.pack("<HH", ExtraTag.ZIP64, len(zip64)) + zip64 if zip64 else b""
    version = VERSION_ZIP64 if zip64 else VERSION
    return (
        _CENTRAL.pack(
            CENTRAL_SIGNATURE,
            VERSION_ZIP64,
            version,
            FLAG_UTF8,
            0,
            DOS_TIME,
            DOS_DATE,
            crc,
            sizes,
            sizes,
            len(member.name),
            len(extra),
            0,
            0,
            0,
            0,
            offset,
        )
        + member.name
        + extra
    )


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (zlib's
    ``crc32_combine``: apply ``length2`` zero bytes to ``crc1`` by squaring a GF(2) matrix)."""
    if length2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if length2 & 1:
            crc1 = _gf2_times(even, crc1)
        length2 >>= 1
        if not length2:
            break
        odd = _gf2_square(even)
        if length2 & 1:
            crc1 = _gf2_times(odd, crc1)
        length2 >>= 1
        if not length2:
            break
    return crc1 ^ crc2
