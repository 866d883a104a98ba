"""Compressed pickle streams: which compression wraps a stream (zlib, gzip, bz2, xz, lzma,
lz4 frames, joblib's ``ZF`` files), and inflating it in bounded pieces under a cap, as
joblib and the scanner read them; zip members deflated, in bzip2 or in LZMA, inflated the
same way (``member_pieces``), as Python's zipfile (and so ``numpy.load``) reads them."""

from __future__ import annotations

import bz2
import importlib
import lzma
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from modelport import limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    MissingDependencyError,
    TruncatedFileError,
)

DECOMPRESS_CHUNK = 1 << 20  # inflate this much at a time, checking the cap in between
ZF_PREFIX: Final = b"ZF"
ZF_LENGTH_CHARS: Final = 19
# Zip members' compression methods (APPNOTE 4.4.5) that Python's zipfile inflates
DEFLATED: Final = 8
BZIP2: Final = 12
LZMA: Final = 14
_LZMA_PROPERTIES: Final = 5  # lc/lp/pb in one byte, then the dictionary size (lzma.txt)


class Compression(str, Enum):
    """How the pickle stream is wrapped on disk; values are what ``details`` reports."""

    ZLIB = "zlib"
    GZIP = "gzip"
    BZ2 = "bz2"
    XZ = "xz"
    LZMA = "lzma"
    LZ4 = "lz4"
    JOBLIB_ZF = "joblib-zfile"


MAGICS: Final = (
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x1f\x8b", Compression.GZIP),
    (b"BZh", Compression.BZ2),
    # joblib's own prefix (compressor.LZMACompressorWrapper): an LZMA-alone header is the
    # properties byte and a dictionary size, whose second byte is 0x10 for a 4 KiB dictionary
    (b"\x5d\x00", Compression.LZMA),
    # an LZ4 frame (lz4_Frame_format.md: magic 0x184D2204, little-endian), what
    # joblib.dump(..., compress="lz4") writes through lz4.frame
    (b"\x04\x22\x4d\x18", Compression.LZ4),
    # joblib takes any file opening with "ZF" for one and reads its length with int(text, 16),
    # which needs no "0x" (numpy_pickle_utils._detect_compressor, numpy_pickle_compat.read_zfile)
    (ZF_PREFIX, Compression.JOBLIB_ZF),
    (b"\x78", Compression.ZLIB),
)


def compression_of(head: bytes) -> Compression | None:
    for magic, kind in MAGICS:
        if head.startswith(magic):
            if kind is Compression.ZLIB and (len(head) < 2 or (head[0] * 256 + head[1]) % 31):
                return None
            return kind
    return None


def decompression_cap() -> int:
    """``limits.MAX_PICKLE_INFLATED``, lowered to half the machine's memory where that is known."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return limits.MAX_PICKLE_INFLATED
    return min(limits.MAX_PICKLE_INFLATED, max(memory // 2, 1 << 20))


@dataclass(frozen=True)
class InflationCap:
    """How many bytes a stream may inflate to, and what to tell the user when it goes past:
    which limit stopped it and what to do instead."""

    size: int
    advice: str = (
        "limits.MAX_PICKLE_INFLATED, limits.MAX_SCAN_INFLATED_BYTES when scanning, or half "
        "the machine's memory"
    )


def stream_cap(compressed: int, absolute: int) -> InflationCap:
    """A whole compressed pickle stream's cap: ``limits.MAX_INFLATION_RATIO`` times its
    compressed size (never below ``limits.MIN_INFLATION_ALLOWANCE``) and never past
    ``absolute``. Its bytes are held in memory to be walked, so a stream of a few KB (bz2
    and xz reach a million to one on a run of one byte) must not claim gigabytes; a real
    model's stream compresses a few times and never meets it."""
    by_ratio = max(limits.MIN_INFLATION_ALLOWANCE, compressed * limits.MAX_INFLATION_RATIO)
    if by_ratio >= absolute:
        return InflationCap(absolute)
    return InflationCap(
        by_ratio,
        f"{limits.MAX_INFLATION_RATIO}x its {compressed:,} compressed bytes, or "
        f"{limits.MIN_INFLATION_ALLOWANCE:,} if more: limits.MAX_INFLATION_RATIO and "
        "limits.MIN_INFLATION_ALLOWANCE; model data compresses far less, so decompress a "
        "file you trust and scan the result",
    )


_ZLIB_TYPE: Final = type(zlib.decompressobj())


def _decompressor(kind: Compression) -> Any:
    if kind in (Compression.ZLIB, Compression.JOBLIB_ZF):
        return zlib.decompressobj(15)
    if kind is Compression.GZIP:
        return zlib.decompressobj(31)
    if kind is Compression.BZ2:
        return bz2.BZ2Decompressor()
    if kind is Compression.LZ4:
        return _lz4_frame().LZ4FrameDecompressor()
    return lzma.LZMADecompressor(lzma.FORMAT_XZ if kind is Compression.XZ else lzma.FORMAT_ALONE)


def _lz4_frame() -> Any:
    """The ``lz4`` package's frame module, which joblib itself needs for these files: LZ4
    frames are not inflated without it (and never passed unread)."""
    try:
        return importlib.import_module("lz4.frame")
    except ImportError:
        raise MissingDependencyError("lz4", "lz4", "Reading an LZ4 frame (joblib's lz4)") from None


def _zf_payload(data: memoryview) -> tuple[int, memoryview]:
    header = bytes(data[len(ZF_PREFIX) : len(ZF_PREFIX) + ZF_LENGTH_CHARS])
    try:
        declared = int(header.decode("ascii").strip(), 16)
    except (UnicodeDecodeError, ValueError):
        raise CorruptFileError("joblib ZF header: length is not hexadecimal") from None
    start = len(ZF_PREFIX) + ZF_LENGTH_CHARS
    if bytes(data[start : start + 1]) == b" ":
        start += 1
    return declared, data[start:]


def _pieces(data: memoryview, kind: Compression) -> Iterator[bytes]:
    """The inflated bytes, at most ``DECOMPRESS_CHUNK`` of them at a time from at most
    ``DECOMPRESS_CHUNK`` of input, so that whoever stops early has paid for no more; streams
    of the same kind that follow one another are read on, as joblib's and Python's readers
    do. Raises ``TruncatedFileError`` when the data ends inside a stream."""
    engine, position, pending, more = _decompressor(kind), 0, b"", False
    while True:
        if not pending and not more:
            if position >= len(data):
                break
            pending = bytes(data[position : position + DECOMPRESS_CHUNK])
            position += len(pending)
        try:
            piece = engine.decompress(pending, DECOMPRESS_CHUNK)
        except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError, RuntimeError) as exc:
            raise CorruptFileError(f"{kind.value} stream is corrupt ({exc})") from None
        if piece:
            yield piece
        # zlib hands back the input it left in ``unconsumed_tail`` and may hold output back
        # when ``max_length`` was filled; bz2 and lzma keep both inside until asked again
        if isinstance(engine, _ZLIB_TYPE):
            pending, more = engine.unconsumed_tail, len(piece) == DECOMPRESS_CHUNK
        else:
            pending, more = b"", not engine.needs_input
        if engine.eof:  # ``unused_data``: every byte fed past the stream's end
            rest = position - len(engine.unused_data or b"")  # lz4's is None when empty
            if compression_of(bytes(data[rest : rest + 8])) is not kind:
                return
            engine, position, pending, more = _decompressor(kind), rest, b"", False
    raise TruncatedFileError(
        f"{kind.value} stream ends before its end marker (truncated file?)",
        expected=len(data) + 1,
        actual=len(data),
    )


def inflate(data: memoryview, kind: Compression, cap: InflationCap, *, partial: bool) -> bytearray:
    """Inflate ``data`` chunk by chunk; past ``cap`` bytes: stop (``partial``) or raise
    ``LimitExceededError``, having inflated at most one chunk more than the cap."""
    limit = cap.size
    if kind is Compression.JOBLIB_ZF:
        declared, data = _zf_payload(data)
        if declared > limit and not partial:
            raise LimitExceededError(_resource("declared", kind, cap), limit, declared)
    out = bytearray()
    try:
        for piece in _pieces(data, kind):
            out += piece
            if len(out) > limit:
                if partial:
                    return out[:limit]
                raise LimitExceededError(_resource("inflated", kind, cap), limit, len(out))
    except TruncatedFileError:
        if not partial:
            raise
    return out


def _resource(which: str, kind: Compression, cap: InflationCap) -> str:
    return f"the {which} size of the {kind.value} stream (capped at {cap.advice})"


def member_pieces(read: Callable[[int], bytes], method: int) -> Iterator[bytes]:
    """An inflated member's bytes, at most ``DECOMPRESS_CHUNK`` at a time from at most
    ``DECOMPRESS_CHUNK`` of input (``read(n)``: the member's next compressed bytes, empty at
    its end), so whoever stops early has paid for no more. Ends where the stream or the data
    does (zipfile stops at the compressed size: an LZMA member needs no end marker); raises
    ``CorruptFileError`` when the data does not inflate."""
    engine = _engine(read, method)
    pending, more = b"", False
    flowing = isinstance(engine, _ZLIB_TYPE)
    while not engine.eof:
        if (not pending and not more) if flowing else engine.needs_input:
            pending = read(DECOMPRESS_CHUNK)
            if not pending:
                return
        try:
            piece = engine.decompress(pending, DECOMPRESS_CHUNK)
        except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
            raise CorruptFileError(f"compression method {method}: corrupt data ({exc})") from None
        # zlib hands back unused input and may hold output when ``max_length`` is filled;
        # bz2 and lzma keep both inside and say so with ``needs_input``
        pending, more = (
            (engine.unconsumed_tail, len(piece) == DECOMPRESS_CHUNK) if flowing else (b"", False)
        )
        if piece:
            yield piece


def _engine(read: Callable[[int], bytes], method: int) -> Any:
    """A decompressor for the member's method, its LZMA header (APPNOTE 5.8.8: version 2
    bytes, properties size 2 bytes, the properties) consumed as Python's zipfile does."""
    if method == DEFLATED:
        return zlib.decompressobj(-15)
    if method == BZIP2:
        return bz2.BZ2Decompressor()
    if method != LZMA:
        raise CorruptFileError(f"compression method {method} is not one zipfile reads")
    header = read(4)
    size = int.from_bytes(header[2:4], "little")
    properties = read(size) if len(header) == 4 and size == _LZMA_PROPERTIES else b""
    if len(properties) != _LZMA_PROPERTIES or properties[0] >= 9 * 5 * 5:
        raise CorruptFileError("LZMA member: its header holds no valid LZMA properties")
    packed = properties[0]
    lzma1 = {"id": lzma.FILTER_LZMA1, "lc": packed % 9, "lp": packed // 9 % 5, "pb": packed // 45}
    lzma1["dict_size"] = int.from_bytes(properties[1:], "little")
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1])
