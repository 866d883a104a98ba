"""Blosc 1 frames, as the HDF5 blosc filter (32001, hdf5-blosc and PyTables) stores each chunk.

Decoded here, in Python and numpy, so that such a dataset reads without the filter plugin
(h5py ships none). Layout (c-blosc 1.x, ``blosc.h`` and ``blosc.c``; format version 2):

- a 16-byte header: ``version`` (u8, MUST be 2), ``versionlz`` (u8), ``flags`` (u8),
  ``typesize`` (u8), then little-endian u32 ``nbytes`` (decoded size), ``blocksize`` and
  ``cbytes`` (the frame's size, header included);
- ``flags``: bit 0 byte shuffle, bit 1 stored plain (``memcpyed``: the data follows the
  header as it is), bit 2 bit shuffle, bit 3 reserved (MUST be 0), bit 4 "blocks not split",
  bits 5-7 the codec: 0 BloscLZ, 1 LZ4 (and LZ4HC), 2 Snappy, 3 zlib, 4 Zstd;
- otherwise ``ceil(nbytes / blocksize)`` u32 offsets of the blocks (from the frame's start),
  the last block holding the remainder; a block is ``typesize`` streams when it is split
  (not flagged unsplit, typesize <= 16, blocksize / typesize >= 128 and not the last, short
  block), else one; each stream is a u32 compressed size and that many bytes, stored raw
  when the size equals the stream's decoded size;
- a block is then unshuffled: byte shuffle stores byte ``j`` of every element together
  (the bytes past the last whole element as they are); bit shuffle stores bit ``k`` of byte
  ``j`` of every element together, eight elements to a byte (least significant bit first),
  over the largest multiple of eight elements, only when the block holds a multiple of eight.

BloscLZ (``blosclz.c``, after FastLZ): a control byte under 32 is a literal run of
``ctrl + 1`` bytes; otherwise a match of ``(ctrl >> 5) + 2`` bytes (length 7 extended by
bytes up to and including the first under 255) at distance ``((ctrl & 31) << 8) + next + 1``,
or, when that byte is 255 and ``ctrl & 31`` is 31, ``u16be + 8191 + 1``. LZ4 blocks are the
LZ4 block format. Snappy and Zstd are not decoded here: the error names hdf5plugin.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

from modelport.errors import CorruptFileError, UnsupportedVersionError

HEADER = struct.Struct("<BBBBIII")
FORMAT_VERSION = 2
MAX_SPLITS = 16
MIN_BUFFERSIZE = 128
MAX_DISTANCE = 8191  # BloscLZ's near-match window

SHUFFLE = 0x01
MEMCPYED = 0x02
BITSHUFFLE = 0x04
RESERVED = 0x08
DONT_SPLIT = 0x10


class Codec(IntEnum):
    """The codec code in bits 5-7 of the flags (c-blosc's ``BLOSC_*_FORMAT``)."""

    BLOSCLZ = 0
    LZ4 = 1
    SNAPPY = 2
    ZLIB = 3
    ZSTD = 4


DECODED = (Codec.BLOSCLZ, Codec.LZ4, Codec.ZLIB)
CODEC_NAMES = {int(codec): codec.name.lower() for codec in Codec}
PLUGIN_HINT = "h5py reads it after `import hdf5plugin` (pip install hdf5plugin)"


@dataclass(frozen=True)
class FrameHeader:
    version: int
    versionlz: int
    flags: int
    typesize: int
    nbytes: int
    blocksize: int
    cbytes: int

    @property
    def codec(self) -> int:
        return self.flags >> 5


def read_header(frame: bytes, where: str) -> FrameHeader:
    if len(frame) < HEADER.size:
        raise CorruptFileError(f"{where}: a blosc frame shorter than its 16-byte header")
    header = FrameHeader(*HEADER.unpack_from(frame, 0))
    if header.version != FORMAT_VERSION or header.flags & RESERVED:
        raise UnsupportedVersionError(
            f"{where}: blosc frame version {header.version} (flags {header.flags:#04x}); "
            f"modelport reads version {FORMAT_VERSION}: {PLUGIN_HINT}"
        )
    if header.cbytes > len(frame):
        raise CorruptFileError(f"{where}: blosc frame of {header.cbytes} bytes holds {len(frame)}")
    if header.nbytes and (header.typesize == 0 or header.blocksize == 0):
        raise CorruptFileError(f"{where}: blosc frame with a zero type or block size")
    return header


def decompress(frame: bytes, limit: int, where: str) -> bytes:
    """The bytes a blosc frame holds, at most ``limit``; ``where`` names it in errors."""
    header = read_header(frame, where)
    if header.nbytes > limit:
        raise CorruptFileError(
            f"{where}: blosc frame decodes to {header.nbytes} bytes, the chunk has {limit}"
        )
    if header.flags & MEMCPYED:
        if header.cbytes != HEADER.size + header.nbytes:
            raise CorruptFileError(f"{where}: a plain blosc frame of the wrong size")
        return bytes(frame[HEADER.size : header.cbytes])
    if header.nbytes == 0:
        return b""
    if header.codec not in DECODED:
        name = CODEC_NAMES.get(header.codec, "an unknown codec")
        raise UnsupportedVersionError(
            f"{where}: blosc frame compressed with {name} (codec {header.codec}); modelport "
            f"decodes blosclz, lz4 and zlib itself: {PLUGIN_HINT}"
        )
    nblocks = -(-header.nbytes // header.blocksize)
    if HEADER.size + 4 * nblocks > header.cbytes:
        raise CorruptFileError(f"{where}: blosc frame too short for its {nblocks} block offsets")
    starts = struct.unpack_from(f"<{nblocks}I", frame, HEADER.size)
    body = memoryview(frame)[: header.cbytes]
    out = bytearray()
    for index, start in enumerate(starts):
        size = min(header.blocksize, header.nbytes - index * header.blocksize)
        out += _block(header, body, start, size, where)
    return bytes(out)


def _block(header: FrameHeader, body: memoryview, start: int, size: int, where: str) -> bytes:
    typesize = header.typesize
    split = (
        not header.flags & DONT_SPLIT
        and typesize <= MAX_SPLITS
        and header.blocksize // typesize >= MIN_BUFFERSIZE
        and size == header.blocksize
    )
    streams = typesize if split else 1
    stream_size = size // streams
    parts = []
    offset = start
    for _ in range(streams):
        if offset < HEADER.size or offset + 4 > len(body):
            raise CorruptFileError(f"{where}: a blosc stream lies outside its frame")
        (csize,) = struct.unpack_from("<I", body, offset)
        offset += 4
        if offset + csize > len(body):
            raise CorruptFileError(f"{where}: a blosc stream runs past its frame")
        packed = bytes(body[offset : offset + csize])
        offset += csize
        decoded = packed
        if csize != stream_size:
            try:
                decoded = _decode(header.codec, packed, stream_size)
            except CorruptFileError as exc:
                raise CorruptFileError(f"{where}: {exc}") from None
        if len(decoded) != stream_size:
            raise CorruptFileError(
                f"{where}: a blosc stream decodes to {len(decoded)} bytes, not {stream_size}"
            )
        parts.append(decoded)
    data = b"".join(parts)
    if header.flags & SHUFFLE and typesize > 1:
        return unshuffle(data, typesize)
    if header.flags & BITSHUFFLE and size >= typesize:
        return bitunshuffle(data, typesize)
    return data


def _decode(codec: int, packed: bytes, size: int) -> bytes:
    if codec == Codec.BLOSCLZ:
        return blosclz_decompress(packed, size)
    if codec == Codec.LZ4:
        return lz4_block_decompress(packed, size)
    try:
        decoder = zlib.decompressobj()
        data = decoder.decompress(packed, size)
    except zlib.error as exc:
        raise CorruptFileError(f"a blosc zlib stream does not inflate: {exc}") from None
    return data


def unshuffle(data: bytes, typesize: int) -> bytes:
    """Byte ``j`` of element ``i`` back from ``data[j * count + i]``."""
    import numpy as np

    count = len(data) // typesize
    whole = count * typesize
    planes = np.frombuffer(data, np.uint8, whole).reshape(typesize, count)
    return planes.T.tobytes() + data[whole:]


def bitunshuffle(data: bytes, typesize: int) -> bytes:
    """Bit ``k`` of byte ``j`` of element ``i`` back from bit ``i % 8`` of row ``8j + k``,
    byte ``i // 8``; a block whose elements are no multiple of eight is stored as it is."""
    import numpy as np

    count = len(data) // typesize
    if count % 8:
        return data
    whole = count * typesize
    rows = np.frombuffer(data, np.uint8, whole).reshape(typesize * 8, count // 8)
    bits = np.unpackbits(rows, axis=1, bitorder="little").reshape(typesize, 8, count)
    elements = np.packbits(bits.transpose(2, 0, 1), axis=2, bitorder="little")
    return elements.tobytes() + data[whole:]


def _copy_match(out: bytearray, distance: int, length: int, size: int) -> None:
    """Append ``length`` bytes copied from ``distance`` back, overlapping as LZ77 does."""
    if distance <= 0 or distance > len(out):
        raise CorruptFileError("a compressed block refers before its start")
    if len(out) + length > size:
        raise CorruptFileError("a compressed block decodes past its size")
    start = len(out) - distance
    if distance >= length:
        out += out[start : start + length]
    else:
        pattern = bytes(out[start:])
        out += (pattern * (length // distance + 1))[:length]


def blosclz_decompress(src: bytes, size: int) -> bytes:
    """One BloscLZ stream (see the module docstring), ``size`` bytes once decoded."""
    out = bytearray()
    end = len(src)
    if end == 0:
        raise CorruptFileError("an empty BloscLZ stream")
    ctrl = src[0] & 31
    at = 1
    try:
        while True:
            if ctrl >= 32:
                length, at = _extended_length(src, at, (ctrl >> 5) - 1, 6)
                near = (ctrl & 31) << 8
                code = src[at]
                at += 1
                distance = near + code
                if code == 255 and near == 31 << 8:
                    distance = (src[at] << 8 | src[at + 1]) + MAX_DISTANCE
                    at += 2
                _copy_match(out, distance + 1, length + 3, size)
            else:
                if at + ctrl + 1 > end or len(out) + ctrl + 1 > size:
                    raise CorruptFileError("a BloscLZ literal run passes its stream or block")
                out += src[at : at + ctrl + 1]
                at += ctrl + 1
            if at >= end:
                break
            ctrl = src[at]
            at += 1
    except IndexError:
        raise CorruptFileError("a BloscLZ stream ends inside a match") from None
    return bytes(out)


def _extended_length(src: bytes, at: int, length: int, escape: int) -> tuple[int, int]:
    """A match or literal length at its ``escape`` value goes on in the bytes at ``at``,
    each added, until one under 255 (LZ4's and BloscLZ's one scheme)."""
    if length == escape:
        code = 255
        while code == 255:
            code = src[at]
            at += 1
            length += code
    return length, at


def lz4_block_decompress(src: bytes, size: int) -> bytes:
    """One LZ4 block (token, literals, u16 offset, match), ``size`` bytes once decoded."""
    out = bytearray()
    at, end = 0, len(src)
    try:
        while at < end:
            token = src[at]
            literals, at = _extended_length(src, at + 1, token >> 4, 15)
            if at + literals > end or len(out) + literals > size:
                raise CorruptFileError("an LZ4 literal run passes its block")
            out += src[at : at + literals]
            at += literals
            if at >= end:
                break
            distance = src[at] | src[at + 1] << 8
            length, at = _extended_length(src, at + 2, token & 15, 15)
            _copy_match(out, distance, length + 4, size)
    except IndexError:
        raise CorruptFileError("an LZ4 block ends inside a sequence") from None
    return bytes(out)
