"""FlatBuffers tables read in place, with every offset checked against the buffer.

Layout (flatbuffers.dev, "Internals"), all little-endian:

- bytes 0..4 MUST be a u32 ``uoffset`` from 0 to the root table; a file identifier MAY
  follow at 4..8;
- a table at ``pos`` MUST start with an i32 ``soffset``: its vtable is at ``pos - soffset``;
- a vtable is u16 ``vtable_size`` (bytes, even, >= 4), u16 ``table_size`` (the table's
  inline bytes), then one u16 per field id: the field's offset inside the table, 0 when the
  field is absent (its default applies); ids past the vtable's end are absent too;
- a reference field (table, vector, string) holds a u32 ``uoffset`` relative to its own
  position; offsets are unsigned, so references only point forward and cannot loop;
- a vector is a u32 element count then the elements; a string is a byte vector plus NUL.

Tables may be shared (many vector slots pointing at one table), so a walk can visit far
more than the file's size: every table and element visited spends one unit of a budget.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError

WIDTHS = {"b": 1, "B": 1, "?": 1, "h": 2, "H": 2, "i": 4, "I": 4, "f": 4, "q": 8, "Q": 8, "d": 8}
_STRUCTS: dict[str, struct.Struct] = {}


class FlatBuffer:
    """A buffer (bytes or an mmap) of ``size`` bytes and the budget of walks over it."""

    def __init__(self, data: Any, path: Path | None) -> None:
        self.data = data
        self.size = len(data)
        self.path = path
        self.items = limits.MAX_FLATBUFFER_ITEMS
        self.text = limits.MAX_FLATBUFFER_TEXT

    def need(self, pos: int, length: int, what: str) -> None:
        if pos < 0 or length < 0 or pos + length > self.size:
            raise TruncatedFileError(
                f"{what} at byte {pos} needs {length} bytes; the file has {self.size} "
                "(truncated download?)",
                expected=pos + length,
                actual=self.size,
                path=self.path,
            )

    def unpack(self, fmt: str, pos: int, what: str) -> Any:
        packer = _STRUCTS.get(fmt) or _STRUCTS.setdefault(fmt, struct.Struct(fmt))
        if pos < 0 or pos + packer.size > self.size:
            self.need(pos, packer.size, what)
        return packer.unpack_from(self.data, pos)[0]

    def spend(self, count: int) -> None:
        self.items -= count
        if self.items < 0:
            raise LimitExceededError(
                "flatbuffer tables and elements",
                limits.MAX_FLATBUFFER_ITEMS,
                limits.MAX_FLATBUFFER_ITEMS + 1,
            )

    def table(self, pos: int, what: str) -> Table:
        self.spend(1)
        vtable = pos - self.unpack("<i", pos, what)
        vsize = self.unpack("<H", vtable, f"vtable of {what}")
        tsize = self.unpack("<H", vtable + 2, f"vtable of {what}")
        if vsize < 4 or vsize % 2 or tsize < 4:
            raise CorruptFileError(f"{what} at byte {pos} has a malformed vtable", path=self.path)
        self.need(vtable, vsize, f"vtable of {what}")
        self.need(pos, tsize, what)
        return Table(self, pos, vtable, vsize, tsize, what)

    def root(self, what: str) -> Table:
        return self.table(self.unpack("<I", 0, "root offset"), what)


@dataclass(frozen=True)
class Table:
    buf: FlatBuffer
    pos: int
    vtable: int
    vsize: int
    tsize: int
    what: str

    def field(self, slot: int, width: int) -> int:
        """Absolute position of field ``slot`` (``width`` bytes inline), or 0 when absent."""
        entry = 4 + 2 * slot
        if entry >= self.vsize:
            return 0
        offset: int = self.buf.unpack("<H", self.vtable + entry, self.what)
        if offset == 0:
            return 0
        if offset + width > self.tsize:
            raise CorruptFileError(
                f"{self.what}: field {slot} lies outside its table", path=self.buf.path
            )
        return self.pos + offset

    def scalar(self, slot: int, fmt: str, default: int) -> int:
        at = self.field(slot, WIDTHS[fmt[-1]])
        return default if at == 0 else int(self.buf.unpack(fmt, at, self.what))

    def ref(self, slot: int) -> int:
        """Where a reference field points, or 0 when absent."""
        at = self.field(slot, 4)
        return 0 if at == 0 else at + self.buf.unpack("<I", at, self.what)

    def vector(self, slot: int, width: int) -> tuple[int, int] | None:
        """(start of the elements, count) of a vector field, checked to fit the file."""
        at = self.ref(slot)
        if at == 0:
            return None
        count: int = self.buf.unpack("<I", at, f"{self.what} vector {slot}")
        self.buf.need(at + 4, count * width, f"{self.what} vector {slot} of {count} elements")
        return at + 4, count

    def string(self, slot: int) -> str:
        span = self.vector(slot, 1)
        if span is None:
            return ""
        start, length = span
        self.buf.text -= length
        if self.buf.text < 0:
            raise LimitExceededError(
                "bytes of flatbuffer strings",
                limits.MAX_FLATBUFFER_TEXT,
                limits.MAX_FLATBUFFER_TEXT + length,
            )
        return bytes(self.buf.data[start : start + length]).decode("utf-8", "replace")

    def scalars(self, slot: int, fmt: str, limit: int) -> list[Any]:
        width = WIDTHS[fmt[-1]]
        span = self.vector(slot, width)
        if span is None:
            return []
        start, count = span
        if count > limit:
            raise LimitExceededError(f"{self.what} vector {slot} length", limit, count)
        self.buf.spend(count)
        return list(struct.unpack_from(f"<{count}{fmt.lstrip('<')}", self.buf.data, start))

    def tables(self, slot: int, what: str) -> list[Table]:
        span = self.vector(slot, 4)
        if span is None:
            return []
        start, count = span
        self.buf.spend(count)
        found = []
        for index in range(count):
            at = start + 4 * index
            found.append(self.buf.table(at + self.buf.unpack("<I", at, what), f"{what} {index}"))
        return found
