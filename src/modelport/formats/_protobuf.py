"""A minimal protobuf wire-format walker: fields and their byte positions, nothing decoded eagerly.

Wire format (protobuf.dev/programming-guides/encoding):

- a message is a run of fields; each MUST start with a varint tag ``number << 3 | wire_type``,
  field number >= 1;
- wire type 0 (VARINT) is a varint of at most 10 bytes; 1 (I64) and 5 (I32) are 8 and 4
  little-endian bytes; 2 (LEN) is a varint length then that many bytes (strings, bytes,
  sub-messages, packed repeated scalars); 3 and 4 (groups) are obsolete and rejected;
- a repeated scalar MAY appear packed (one LEN field) or unpacked (one field per element),
  and MAY be split over several fields: readers concatenate them.

``Message.fields`` yields each field (``field_at`` decodes one) with the offsets of its
payload in the buffer, so a ``bytes`` field (an ONNX ``raw_data``) is a byte range of the
file, never a copy. Every
length is checked against the enclosing message before it is used, and a shared budget caps
the number of fields one file may make us visit.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError

if TYPE_CHECKING:
    import numpy as np

MAX_VARINT_BYTES = 10
MASK64 = (1 << 64) - 1
CONTINUATION_BYTES = bytes(range(0x80, 0x100))


class WireType(IntEnum):
    VARINT = 0
    I64 = 1
    LEN = 2
    SGROUP = 3
    EGROUP = 4
    I32 = 5


class Field(NamedTuple):
    """One field: for VARINT/I64/I32 ``value`` is the (unsigned) number; for LEN the payload
    is ``buffer[start:end]``. ``start``/``end`` always bound the value's bytes. (A NamedTuple,
    immutable like a frozen dataclass and several times cheaper to build: one per field.)"""

    number: int
    wire: int  # a WireType value
    value: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


# new_tuple(Field, (...)) builds a NamedTuple in C, without its Python-level __new__: readers
# make one per field, or per tensor, so this is most of what building one costs.
new_tuple: Final = tuple.__new__


class Message:
    """A buffer (bytes or an mmap) and the budget shared by every walk over it."""

    def __init__(self, data: Any, path: Path | None, max_fields: int) -> None:
        self.data = data
        self.size = len(data)
        self.path = path
        self.budget = max_fields
        self.max_fields = max_fields

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        """(value, position after it) of the varint at ``pos``, which must end before ``end``."""
        data = self.data
        result = 0
        for shift in range(0, 7 * MAX_VARINT_BYTES, 7):
            if pos >= end:
                raise self.truncated("a varint runs past the end of its message", end + 1, end)
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result & MASK64, pos
        raise CorruptFileError("varint longer than 10 bytes", path=self.path)

    def fields(self, start: int, end: int) -> Iterator[Field]:
        """Every field of the message occupying ``[start, end)``, in file order."""
        if not 0 <= start <= end <= self.size:
            raise CorruptFileError(
                f"message [{start}, {end}) lies outside the data", path=self.path
            )
        pos = start
        field_at = self.field_at
        while pos < end:
            self.budget -= 1
            if self.budget < 0:
                raise self.over_budget()
            field = field_at(pos, end)
            yield field
            pos = field.end

    def field_at(self, pos: int, end: int) -> Field:
        """The field whose tag starts at ``pos``, checked to end by ``end`` (no budget spent)."""
        data = self.data
        tag = data[pos]  # one-byte tags (fields 1..15) are the common case
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = self.varint(pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0 or wire not in (0, 1, 2, 5):  # 3/4: obsolete groups
            raise CorruptFileError(
                f"invalid protobuf tag {tag:#x} before byte {pos}", path=self.path
            )
        if wire == 2:
            value = data[pos] if pos < end else 0x80
            if value < 0x80:
                pos += 1
            else:
                value, pos = self.varint(pos, end)
            after = pos + value
        elif wire == 0:
            value = data[pos] if pos < end else 0x80
            if value < 0x80:
                after = pos + 1
            else:
                value, after = self.varint(pos, end)
        else:
            after = pos + (8 if wire == 1 else 4)
            value = int.from_bytes(data[pos:after], "little") if after <= end else 0
        if after > end:
            raise self.truncated(
                f"field {number} at byte {pos} needs {after - pos} bytes, "
                f"its message has {end - pos} left",
                after,
                end,
            )
        return new_tuple(Field, (number, wire, value, pos, after))

    def spend(self) -> None:
        """Count one field visited against the file's budget."""
        self.budget -= 1
        if self.budget < 0:
            raise self.over_budget()

    def over_budget(self) -> LimitExceededError:
        return LimitExceededError("protobuf fields", self.max_fields, self.max_fields + 1)

    def text(self, field: Field, limit: int = limits.MAX_PROTOBUF_TEXT) -> str:
        """A string field, decoded leniently; anything past ``limit`` bytes is dropped."""
        if field.wire != WireType.LEN:
            self.expect(field, WireType.LEN)
        start, end = field.start, field.end
        return str(self.data[start : min(end, start + limit)], "utf-8", "replace")

    def expect(self, field: Field, *wires: WireType) -> None:
        if field.wire not in wires:
            names = "/".join(w.name for w in wires)
            raise CorruptFileError(
                f"field {field.number} has wire type {WireType(field.wire).name}, expected {names}",
                path=self.path,
            )

    def ints(self, field: Field, limit: int) -> list[int]:
        """A repeated integer field's values (one unpacked element, or a packed run)."""
        if field.wire == WireType.VARINT:
            return [field.value]
        self.expect(field, WireType.LEN)
        values: list[int] = []
        pos = field.start
        while pos < field.end:
            if len(values) >= limit:
                raise LimitExceededError("packed integers in one field", limit, len(values) + 1)
            value, pos = self.varint(pos, field.end)
            values.append(value)
        return values

    def truncated(self, message: str, expected: int, actual: int) -> TruncatedFileError:
        return TruncatedFileError(message, expected=expected, actual=actual, path=self.path)


def signed64(value: int) -> int:
    """An int64 field's value from its unsigned varint form (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def count_varints(data: bytes) -> int:
    """How many varints a packed run holds: one per byte without the continuation bit."""
    return len(data.translate(None, CONTINUATION_BYTES))


def decode_varints(data: np.ndarray[Any, np.dtype[np.uint8]]) -> np.ndarray[Any, Any]:
    """A packed run of varints as uint64 values, vectorised; raises on a malformed run."""
    import numpy as np

    if data.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(data < 0x80)
    if ends.size == 0 or ends[-1] != data.size - 1:
        raise CorruptFileError("packed varints end in the middle of a value")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise CorruptFileError("varint longer than 10 bytes in a packed field")
    values = np.zeros(ends.size, dtype=np.uint64)
    for k in range(int(lengths.max())):
        present = lengths > k
        chunk = (data[starts[present] + k] & 0x7F).astype(np.uint64)
        values[present] |= chunk << np.uint64(7 * k)
    return values
