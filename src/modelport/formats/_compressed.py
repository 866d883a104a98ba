"""Compressed pickle streams: which compression wraps a stream (zlib, gzip, bz2, xz, lzma,
joblib's ``ZF`` files), and inflating it in bounded pieces under a cap, as joblib and the
scanner read them."""

from __future__ import annotations

import bz2
import lzma
import os
import zlib
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
    (b"\x5d\x00\x00", Compression.LZMA),
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


def inflate(data: memoryview, kind: Compression, cap: int, *, partial: bool) -> bytearray:
    """Inflate ``data`` chunk by chunk; past ``cap`` bytes: stop (``partial``) or raise."""
    if kind is Compression.JOBLIB_ZF:
        declared, data = _zf_payload(data)
        if declared > cap and not partial:
            raise LimitExceededError("declared decompressed size", cap, declared)
    out = bytearray()
    engine = _decompressor(kind)
    position, pending, limited = 0, b"", False  # input is fed in bounded pieces
    while True:
        is_zlib = isinstance(engine, _ZLIB_TYPE)
        if not pending and (not limited if is_zlib else engine.needs_input):
            if position >= len(data):
                break
            pending = bytes(data[position : position + DECOMPRESS_CHUNK])
            position += len(pending)
        try:
            chunk = engine.decompress(pending, DECOMPRESS_CHUNK)
        except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
            raise CorruptFileError(f"{kind.value} stream is corrupt ({exc})") from None
        out += chunk
        if len(out) > cap:
            if partial:
                return out[:cap]
            raise LimitExceededError("decompressed pickle size (stopped there)", cap, len(out))
        pending, limited = (engine.unconsumed_tail if is_zlib else b""), len(chunk) > 0
        if engine.eof:  # another stream may follow (concatenated gzip / xz / bz2)
            rest = position - len(engine.unused_data) - len(pending)
            if compression_of(bytes(data[rest : rest + 8])) is not kind:
                break
            engine, position, pending, limited = _decompressor(kind), rest, b"", False
    if not engine.eof and not partial:
        raise TruncatedFileError(
            f"{kind.value} stream ends before its end marker (truncated file?)",
            expected=len(data) + 1,
            actual=len(data),
        )
    return out
