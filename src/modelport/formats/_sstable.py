"""LevelDB's sorted table (SSTable), the container of a TensorFlow tensor bundle's ``.index``.

Layout (leveldb ``doc/table_format.md``; TensorFlow's copy in ``tsl/lib/io/format.h``):

- the file MUST end with a 48-byte footer: the metaindex ``BlockHandle`` and the index
  ``BlockHandle`` (each two varint64: offset, size), zero padding up to byte 40, then the
  magic number 0xdb4775248b80fb57 as a little-endian u64;
- a ``BlockHandle`` names ``size`` bytes at ``offset``; a 5-byte trailer MUST follow them:
  the compression type (0: none, 1: snappy) and the masked crc32c of the block's bytes and
  that type byte (``crc32c`` rotated right by 15 bits, plus 0xa282ead8);
- a block (after decompression) is a run of entries, then ``num_restarts`` u32 offsets of
  restart points, then ``num_restarts`` itself as a u32. An entry is varint32 ``shared``,
  varint32 ``non_shared``, varint32 ``value_length``, the key's last ``non_shared`` bytes and
  the value; the key is the previous key's first ``shared`` bytes plus those. At a restart
  point ``shared`` MUST be 0;
- the index block holds one entry per data block: a key at or above every key in that block,
  and the block's ``BlockHandle`` as its value. Keys MUST increase strictly across the table.

Every handle is checked against the file before it is followed and every block's checksum is
verified. Snappy blocks are inflated by ``snappy_decompress`` (a few dozen lines: literals and
back-references); other compression types raise ``UnsupportedVersionError``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Final

from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    TruncatedFileError,
    UnsupportedVersionError,
)

TABLE_MAGIC: Final = 0xDB4775248B80FB57
MAGIC_BYTES: Final = TABLE_MAGIC.to_bytes(8, "little")
FOOTER_SIZE: Final = 48  # two handles of at most 20 bytes each, padded to 40, + magic
TRAILER_SIZE: Final = 5  # compression type (1) + masked crc32c (4)
CRC_MASK_DELTA: Final = 0xA282EAD8
# A block inflated from snappy: writers cut blocks at a few KB (TensorFlow: 4 KiB, rarely
# raised to a few MB), so a block claiming more is damage or an attack.
MAX_BLOCK_BYTES: Final = 256 << 20
# Entries in one table: a tensor bundle has one per variable (plus slices of partitioned
# ones); the largest real checkpoints hold a few hundred thousand.
MAX_ENTRIES: Final = 10_000_000


class Compression(IntEnum):
    NONE = 0
    SNAPPY = 1


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as leveldb and TensorFlow compute it."""
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The checksum as stored: rotated so that a crc of data holding crcs stays strong."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


@dataclass(frozen=True)
class BlockHandle:
    offset: int
    size: int


def _varint(data: bytes, pos: int, end: int, path: Path | None) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise TruncatedFileError(
                "a varint runs past the end of its block", expected=pos + 1, actual=end, path=path
            )
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
    raise CorruptFileError("varint longer than 10 bytes", path=path)


class Table:
    """A whole table held in memory (``.index`` files are small: one entry per tensor)."""

    def __init__(self, data: bytes, path: Path | None = None) -> None:
        self.data = data
        self.path = path
        if len(data) < FOOTER_SIZE:
            raise TruncatedFileError(
                f"a table needs a {FOOTER_SIZE}-byte footer, the file has {len(data)} bytes",
                expected=FOOTER_SIZE,
                actual=len(data),
                path=path,
            )
        if not data.endswith(MAGIC_BYTES):
            raise CorruptFileError("no table magic in the last 8 bytes", path=path)
        footer_start = len(data) - FOOTER_SIZE
        self.metaindex, pos = self._handle(footer_start, len(data) - 8)
        self.index, _ = self._handle(pos, len(data) - 8)

    def _handle(self, pos: int, end: int) -> tuple[BlockHandle, int]:
        offset, pos = _varint(self.data, pos, end, self.path)
        size, pos = _varint(self.data, pos, end, self.path)
        limit = len(self.data) - FOOTER_SIZE
        if offset + size + TRAILER_SIZE > limit:
            raise TruncatedFileError(
                f"block at bytes {offset}..{offset + size} and its trailer run past the "
                f"table's {limit} bytes of blocks",
                expected=offset + size + TRAILER_SIZE,
                actual=limit,
                path=self.path,
            )
        return BlockHandle(offset, size), pos

    def block(self, handle: BlockHandle) -> bytes:
        """A block's bytes, its checksum verified and snappy inflated."""
        start, end = handle.offset, handle.offset + handle.size
        raw = self.data[start:end]
        kind = self.data[end]
        (stored,) = struct.unpack_from("<I", self.data, end + 1)
        if masked_crc32c(self.data[start : end + 1]) != stored:
            raise CorruptFileError(f"block at byte {start}: checksum mismatch", path=self.path)
        if kind == Compression.NONE:
            return raw
        if kind == Compression.SNAPPY:
            return snappy_decompress(raw, MAX_BLOCK_BYTES, self.path)
        raise UnsupportedVersionError(
            f"block at byte {start} uses compression type {kind}; modelport reads "
            "uncompressed and snappy blocks",
            path=self.path,
        )

    def entries(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of the table in order; keys MUST strictly increase."""
        previous: bytes | None = None
        count = 0
        for _, handle_bytes in block_entries(self.block(self.index), self.path):
            handle, _ = Table._parse_handle(handle_bytes, self)
            for key, value in block_entries(self.block(handle), self.path):
                if previous is not None and key <= previous:
                    raise CorruptFileError(
                        f"table keys out of order: {key[:60]!r} after {previous[:60]!r}",
                        path=self.path,
                    )
                count += 1
                if count > MAX_ENTRIES:
                    raise LimitExceededError("entries in one table", MAX_ENTRIES, count)
                previous = key
                yield key, value

    @staticmethod
    def _parse_handle(value: bytes, table: Table) -> tuple[BlockHandle, int]:
        offset, pos = _varint(value, 0, len(value), table.path)
        size, pos = _varint(value, pos, len(value), table.path)
        limit = len(table.data) - FOOTER_SIZE
        if offset + size + TRAILER_SIZE > limit:
            raise CorruptFileError(
                f"index names a block at bytes {offset}..{offset + size}, past the table's "
                f"{limit} bytes of blocks",
                path=table.path,
            )
        return BlockHandle(offset, size), pos


def block_entries(block: bytes, path: Path | None = None) -> Iterator[tuple[bytes, bytes]]:
    """The entries of one block, keys rebuilt from their shared prefixes."""
    if len(block) < 4:
        raise CorruptFileError(f"a block of {len(block)} bytes has no restart count", path=path)
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * restarts
    if restarts == 0 or end < 0:
        raise CorruptFileError(
            f"block of {len(block)} bytes claims {restarts} restart points", path=path
        )
    key = b""
    pos = 0
    while pos < end:
        shared, pos = _varint(block, pos, end, path)
        unshared, pos = _varint(block, pos, end, path)
        length, pos = _varint(block, pos, end, path)
        if shared > len(key) or pos + unshared + length > end:
            raise CorruptFileError(
                f"block entry at byte {pos} overruns its block or its previous key", path=path
            )
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + length]
        pos += length


def snappy_decompress(data: bytes, limit: int, path: Path | None = None) -> bytes:
    """Raw snappy (google/snappy ``format_description.txt``): a varint of the inflated length,
    then elements whose tag's low two bits say literal (0) or copy with a 1-, 2- or 4-byte
    offset (1, 2, 3). A copy MAY overlap what it produces (offset < length repeats)."""
    size = len(data)
    expected, pos = _varint(data, 0, size, path)
    if expected > limit:
        raise LimitExceededError("snappy block's inflated size", limit, expected, path=path)
    out = bytearray()
    while pos < size:
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                length = int.from_bytes(data[pos : pos + extra], "little")
                pos += extra
            length += 1
            if pos + length > size:
                raise CorruptFileError("snappy literal runs past its block", path=path)
            out += data[pos : pos + length]
            pos += length
        else:
            length, offset, pos = _snappy_copy(data, tag, kind, pos)
            if pos > size or offset == 0 or offset > len(out):
                raise CorruptFileError(
                    f"snappy copy from {offset} bytes back, with {len(out)} bytes written",
                    path=path,
                )
            start = len(out) - offset
            if offset >= length:
                out += out[start : start + length]
            else:
                pattern = bytes(out[start:])
                out += (pattern * (length // offset + 1))[:length]
        if len(out) > expected:
            raise CorruptFileError(
                f"snappy block inflates past its declared {expected} bytes", path=path
            )
    if len(out) != expected:
        raise CorruptFileError(
            f"snappy block inflates to {len(out)} bytes, it declares {expected}", path=path
        )
    return bytes(out)


def _snappy_copy(data: bytes, tag: int, kind: int, pos: int) -> tuple[int, int, int]:
    """(length, offset, position after) of a copy element."""
    if kind == 1:
        length = ((tag >> 2) & 7) + 4
        offset = ((tag >> 5) << 8) | (data[pos] if pos < len(data) else 0)
        return length, offset, pos + 1
    width = 2 if kind == 2 else 4
    offset = int.from_bytes(data[pos : pos + width], "little")
    return (tag >> 2) + 1, offset, pos + width
