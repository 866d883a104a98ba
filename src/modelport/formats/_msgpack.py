"""MessagePack, read without the ``msgpack`` package: bounded, with typed errors.

Layout (github.com/msgpack/msgpack/blob/master/spec.md): every value opens with one format
byte; multi-byte numbers and lengths that follow it are big-endian.

- ``00..7f`` / ``e0..ff``: positive / negative fixint, the value in the byte itself;
- ``80..8f`` fixmap, ``90..9f`` fixarray (count in the low 4 bits), ``a0..bf`` fixstr
  (length in the low 5 bits);
- ``c0`` nil, ``c2`` false, ``c3`` true; ``c1`` is never used and MUST be rejected;
- ``c4..c6`` bin 8/16/32, ``d9..db`` str 8/16/32 (UTF-8), ``dc``/``dd`` array 16/32,
  ``de``/``df`` map 16/32: a length or count of 1, 2 or 4 bytes;
- ``ca``/``cb`` float 32/64, ``cc..cf`` uint 8..64, ``d0..d3`` int 8..64;
- ``c7..c9`` ext 8/16/32: a length, a signed type code, then the payload; ``d4..d8`` fixext
  1/2/4/8/16: a code and a payload of that many bytes.

Choices and edge cases:

- the buffer may be a memory map of the whole file: only what is decoded (numbers, strings,
  map keys, small bins) is copied out; an ext payload goes to the caller's hook as
  ``(code, offset, length)``, so arrays packed in ext payloads are never read here;
- every declared length or count is checked against the bytes left before anything is
  decoded (``TruncatedFileError``); nesting stops at ``limits.MAX_DEPTH`` and the values
  decoded by one call at ``limits.MAX_TREE_NODES`` (``LimitExceededError``);
- ``c1``, invalid UTF-8 and map keys other than nil, numbers, str and bin (a map, an
  array, an ext) are ``CorruptFileError``;
- a key that comes twice keeps its last value, as ``msgpack.unpackb`` does.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, TypeAlias

from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError

Buffer: TypeAlias = "bytes | bytearray | memoryview | mmap.mmap"
# (type code, payload offset, payload length) -> the value the ext stands for.
ExtHook: TypeAlias = Callable[[int, int, int], Any]

# One string or bin value decoded into memory; model files keep names and configs far below.
MAX_DECODED_BYTES: Final = 64 << 20


class Kind(Enum):
    NIL = "nil"
    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    STR = "str"
    BIN = "bin"
    ARRAY = "array"
    MAP = "map"
    EXT = "ext"


@dataclass(frozen=True, slots=True)
class Token:
    """One value's header. ``end`` is where its payload (str, bin, ext) or first element
    (array, map) begins; ``size`` counts payload bytes or elements; ``value`` is a scalar's
    value, or an ext's type code."""

    kind: Kind
    offset: int
    end: int
    size: int = 0
    value: Any = None


_CONSTANTS: Final = {0xC0: (Kind.NIL, None), 0xC2: (Kind.BOOL, False), 0xC3: (Kind.BOOL, True)}
_NUMBERS: Final = {
    0xCA: (Kind.FLOAT, struct.Struct(">f")),
    0xCB: (Kind.FLOAT, struct.Struct(">d")),
    0xCC: (Kind.INT, struct.Struct(">B")),
    0xCD: (Kind.INT, struct.Struct(">H")),
    0xCE: (Kind.INT, struct.Struct(">I")),
    0xCF: (Kind.INT, struct.Struct(">Q")),
    0xD0: (Kind.INT, struct.Struct(">b")),
    0xD1: (Kind.INT, struct.Struct(">h")),
    0xD2: (Kind.INT, struct.Struct(">i")),
    0xD3: (Kind.INT, struct.Struct(">q")),
}
_SIZED: Final = {
    0xC4: (Kind.BIN, struct.Struct(">B")),
    0xC5: (Kind.BIN, struct.Struct(">H")),
    0xC6: (Kind.BIN, struct.Struct(">I")),
    0xD9: (Kind.STR, struct.Struct(">B")),
    0xDA: (Kind.STR, struct.Struct(">H")),
    0xDB: (Kind.STR, struct.Struct(">I")),
    0xDC: (Kind.ARRAY, struct.Struct(">H")),
    0xDD: (Kind.ARRAY, struct.Struct(">I")),
    0xDE: (Kind.MAP, struct.Struct(">H")),
    0xDF: (Kind.MAP, struct.Struct(">I")),
}
_EXTS: Final = {0xC7: struct.Struct(">Bb"), 0xC8: struct.Struct(">Hb"), 0xC9: struct.Struct(">Ib")}
_FIXEXTS: Final = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_EXT_CODE: Final = struct.Struct(">b")
_PAYLOADS: Final = (Kind.STR, Kind.BIN, Kind.EXT)
_KEY_TYPES: Final = (str, bytes, int, float)  # and nil: what can key a dict


def _truncated(what: str, needed: int, end: int) -> TruncatedFileError:
    return TruncatedFileError(
        f"msgpack {what} needs bytes up to offset {needed:,}, the data ends at {end:,} "
        "(truncated download?)",
        expected=needed,
        actual=end,
    )


def _unpack(layout: struct.Struct, buf: Buffer, pos: int, end: int, what: str) -> tuple[Any, ...]:
    if pos + layout.size > end:
        raise _truncated(what, pos + layout.size, end)
    return layout.unpack_from(buf, pos)


def token_at(buf: Buffer, pos: int, end: int, *, whole: bool = True) -> Token:
    """The header of the value at ``pos``, which MUST fit before ``end``; so MUST the payload
    it declares, unless ``whole`` is false (a caller that reads only the header)."""
    if pos >= end:
        raise _truncated("value", pos + 1, end)
    first = buf[pos]
    start = pos + 1
    if first <= 0x7F or first >= 0xE0:
        return Token(Kind.INT, pos, start, value=first if first <= 0x7F else first - 0x100)
    if first <= 0x8F:
        return Token(Kind.MAP, pos, start, first & 0x0F)
    if first <= 0x9F:
        return Token(Kind.ARRAY, pos, start, first & 0x0F)
    if first <= 0xBF:
        token = Token(Kind.STR, pos, start, first & 0x1F)
    elif first in _CONSTANTS:
        kind, constant = _CONSTANTS[first]
        return Token(kind, pos, start, value=constant)
    elif first in _NUMBERS:
        kind, layout = _NUMBERS[first]
        (number,) = _unpack(layout, buf, start, end, "number")
        return Token(kind, pos, start + layout.size, value=number)
    elif first in _SIZED:
        kind, layout = _SIZED[first]
        (size,) = _unpack(layout, buf, start, end, f"{kind.value} length")
        token = Token(kind, pos, start + layout.size, size)
    elif first in _EXTS:
        size, code = _unpack(_EXTS[first], buf, start, end, "ext header")
        token = Token(Kind.EXT, pos, start + _EXTS[first].size, size, code)
    elif first in _FIXEXTS:
        (code,) = _unpack(_EXT_CODE, buf, start, end, "ext header")
        token = Token(Kind.EXT, pos, start + 1, _FIXEXTS[first], code)
    else:
        raise CorruptFileError(f"msgpack byte 0x{first:02x} at offset {pos:,} is never used")
    if whole and token.kind in _PAYLOADS and token.end + token.size > end:
        raise _truncated(f"{token.kind.value} of {token.size:,} bytes", token.end + token.size, end)
    return token


def tokens(buf: Buffer, pos: int, end: int) -> Iterator[Token]:
    """Every header from ``pos`` on, in file order (a depth-first walk of the values),
    skipping payloads: it ends where a payload runs past ``end``, and raises where a header
    is cut or malformed."""
    while pos < end:
        token = token_at(buf, pos, end, whole=False)
        yield token
        pos = token.end + token.size if token.kind in _PAYLOADS else token.end


class Decoder:
    """Decodes values from ``buf[..end]`` into Python objects; ext payloads go to ``ext``."""

    def __init__(self, buf: Buffer, end: int, ext: ExtHook, *, budget: int = -1) -> None:
        self.buf = buf
        self.end = end
        self.ext = ext
        self.budget = limits.MAX_TREE_NODES if budget < 0 else budget

    def value(self, pos: int, depth: int = 0) -> tuple[Any, int]:
        """(the value at ``pos``, the offset after it)."""
        self.budget -= 1
        if self.budget < 0:
            raise LimitExceededError(
                "msgpack values in one file", limits.MAX_TREE_NODES, limits.MAX_TREE_NODES + 1
            )
        token = token_at(self.buf, pos, self.end)
        if token.kind is Kind.ARRAY or token.kind is Kind.MAP:
            if depth >= limits.MAX_DEPTH:
                raise LimitExceededError("msgpack nesting depth", limits.MAX_DEPTH, depth + 1)
            return self._container(token, depth + 1)
        if token.kind is Kind.EXT:
            return self.ext(token.value, token.end, token.size), token.end + token.size
        if token.kind is Kind.STR or token.kind is Kind.BIN:
            return self._payload(token), token.end + token.size
        return token.value, token.end

    def _payload(self, token: Token) -> str | bytes:
        if token.size > MAX_DECODED_BYTES:
            raise LimitExceededError(
                f"msgpack {token.kind.value} at offset {token.offset:,}",
                MAX_DECODED_BYTES,
                token.size,
            )
        raw = bytes(self.buf[token.end : token.end + token.size])
        if token.kind is Kind.BIN:
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(
                f"msgpack str at offset {token.offset:,} is not valid UTF-8"
            ) from None

    def _container(self, token: Token, depth: int) -> tuple[Any, int]:
        per_item = 2 if token.kind is Kind.MAP else 1  # the smallest value is one byte
        if token.end + token.size * per_item > self.end:
            raise _truncated(
                f"{token.kind.value} of {token.size:,} entries",
                token.end + token.size * per_item,
                self.end,
            )
        pos = token.end
        if token.kind is Kind.ARRAY:
            items = []
            for _ in range(token.size):
                item, pos = self.value(pos, depth)
                items.append(item)
            return items, pos
        mapping: dict[Any, Any] = {}
        for _ in range(token.size):
            key_at = pos
            key, pos = self.value(pos, depth)
            if key is not None and not isinstance(key, _KEY_TYPES):
                raise CorruptFileError(
                    f"msgpack map key at offset {key_at:,} is a {type(key).__name__}"
                )
            mapping[key], pos = self.value(pos, depth)
        return mapping, pos


def decode(buf: Buffer, ext: ExtHook, *, start: int = 0, end: int = -1) -> tuple[Any, int]:
    """(the value at ``start``, the offset after it): bytes past it are the caller's to judge."""
    return Decoder(buf, len(buf) if end < 0 else end, ext).value(start)
