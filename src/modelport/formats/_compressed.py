"""Compressed pickle streams: which compression wraps a stream (zlib, gzip, bz2, xz, lzma,
joblib's ``ZF`` files), and inflating it in bounded pieces under a cap, as joblib and the
scanner read them."""

from __future__ import annotations

import bz2
import lzma
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError

DECOMPRESS_CHUNK = 1 << 20  # inflate this much at a time, checking the cap in between
ZF_PREFIX: Final = b"ZF"
ZF_LENGTH_CHARS: Final = 19


class Compression(str, Enum):
    """How the pickle stream is wrapped on disk; values are what ``details`` reports."""

    ZLIB = "zlib"
    GZIP = "gzip"
    BZ2 = "bz2"
    XZ = "xz"
    LZMA = "lzma"
    JOBLIB_ZF = "joblib-zfile"


MAGICS: Final = (
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x1f\x8b", Compression.GZIP),
    (b"BZh", Compression.BZ2),
    # joblib's own prefix (compressor.LZMACompressorWrapper): an LZMA-alone header is the
    # properties byte and a dictionary size, whose second byte is 0x10 for a 4 KiB dictionary
    (b"\x5d\x00", Compression.LZMA),
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
    return lzma.LZMADecompressor(lzma.FORMAT_XZ if kind is Compression.XZ else lzma.FORMAT_ALONE)


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
        except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
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
            rest = position - len(engine.unused_data)
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
