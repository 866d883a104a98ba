"""ONNX ``TensorProto``: where a tensor's elements lie, found without decoding them.

Layout (onnx/onnx.proto, ``message TensorProto``; field numbers in ``TensorField``):

- ``dims`` (1) MUST be non-negative; ``data_type`` (2) is a ``DataType`` code;
- the elements MUST be in exactly one place, looked up in this order:
  ``data_location`` (14) = EXTERNAL: ``external_data`` (13) entries ``location`` (a path
  relative to the model's folder), ``offset``, ``length`` (decimal strings);
  ``raw_data`` (9): fixed-width little-endian bytes, bool one byte each (a byte range of the
  .onnx file: zero-copy);
  a typed repeated field: ``float_data`` (4, FLOAT/COMPLEX64), ``double_data`` (10,
  DOUBLE/COMPLEX128), ``int64_data`` (7, INT64), ``uint64_data`` (11, UINT32/UINT64), and
  ``int32_data`` (5) for every other type, 16-bit floats and float8 as bit patterns;
- packed ``float_data``/``double_data`` are already the little-endian element bytes (one run
  is zero-copy); varint fields are decoded and narrowed on first read;
- STRING (``string_data``, 6) has no numeric data; 2/4/6-bit types and ``segment`` (3) are
  not supported.

A tensor of only ``dims``, ``data_type``, ``name`` and ``raw_data`` with one-byte tags (what
onnx writes for an initializer) is decoded in one loop that builds no per-field object and
skips raw_data by its length; any other tensor is read field by field. Both apply the same
checks, and protobuf's rules: fields in any order, the last of a repeated scalar wins.

An external ``location`` that is absolute, has a drive, or contains ``..`` is refused, never
followed; a missing external file is a clear error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import Final, NamedTuple

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    EscapingReferenceError,
    LimitExceededError,
    ModelFileNotFoundError,
    TruncatedFileError,
)
from modelport.formats._protobuf import (
    Field,
    Message,
    WireType,
    count_varints,
    decode_varints,
    new_tuple,
)
from modelport.formats._protobuf import signed64 as s64
from modelport.tensors import NDArray, Storage, TensorRef

CHUNK = 1 << 24
EXTERNAL = 1
STRING = "string"


class TensorField(IntEnum):
    DIMS = 1
    DATA_TYPE = 2
    SEGMENT = 3
    FLOAT_DATA = 4
    INT32_DATA = 5
    STRING_DATA = 6
    INT64_DATA = 7
    NAME = 8
    RAW_DATA = 9
    DOUBLE_DATA = 10
    UINT64_DATA = 11
    EXTERNAL_DATA = 13
    DATA_LOCATION = 14


class DataType(IntEnum):
    UNDEFINED = 0
    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23
    FLOAT8E8M0 = 24
    UINT2 = 25
    INT2 = 26
    FLOAT6E2M3 = 27
    FLOAT6E3M2 = 28


D = DataType
T = TensorField
DTYPE_NAMES: Final = MappingProxyType(
    {
        D.FLOAT: "float32", D.UINT8: "uint8", D.INT8: "int8", D.UINT16: "uint16",
        D.INT16: "int16", D.INT32: "int32", D.INT64: "int64", D.BOOL: "bool",
        D.FLOAT16: "float16", D.DOUBLE: "float64", D.UINT32: "uint32", D.UINT64: "uint64",
        D.COMPLEX64: "complex64", D.COMPLEX128: "complex128", D.BFLOAT16: "bfloat16",
        D.FLOAT8E4M3FN: "float8_e4m3fn", D.FLOAT8E4M3FNUZ: "float8_e4m3fnuz",
        D.FLOAT8E5M2: "float8_e5m2", D.FLOAT8E5M2FNUZ: "float8_e5m2fnuz",
        D.FLOAT8E8M0: "float8_e8m0fnu",
    }
)  # fmt: skip
# The typed field holding each type's elements when raw_data is absent (int32_data if unlisted).
TYPED_FIELD: Final = MappingProxyType(
    {
        D.FLOAT: T.FLOAT_DATA, D.COMPLEX64: T.FLOAT_DATA, D.DOUBLE: T.DOUBLE_DATA,
        D.COMPLEX128: T.DOUBLE_DATA, D.INT64: T.INT64_DATA, D.UINT32: T.UINT64_DATA,
        D.UINT64: T.UINT64_DATA,
    }
)  # fmt: skip
TYPED_FIELDS: Final = frozenset(
    {T.FLOAT_DATA, T.INT32_DATA, T.INT64_DATA, T.DOUBLE_DATA, T.UINT64_DATA}
)
FIXED_WIDTH: Final = MappingProxyType({T.FLOAT_DATA: 4, T.DOUBLE_DATA: 8})
KNOWN_TYPES: Final = frozenset(int(t) for t in DataType)
# by plain int and with each itemsize, for the per-tensor lookups of a million-tensor graph
_DTYPE_BY_CODE: Final = MappingProxyType({int(k): v for k, v in DTYPE_NAMES.items()})
_ITEMSIZE: Final = MappingProxyType({v: dtypes.dtype(v).itemsize for v in DTYPE_NAMES.values()})
_NOTHING_TYPED: Final[Mapping[int, tuple[Field, ...]]] = MappingProxyType({})
_NOTHING_EXTERNAL: Final[Mapping[str, str]] = MappingProxyType({})
# One-byte tags (field number << 3 | wire type) of the fields a plain tensor holds.
_DIMS_TAG: Final = T.DIMS << 3 | WireType.VARINT
_DATA_TYPE_TAG: Final = T.DATA_TYPE << 3 | WireType.VARINT
_NAME_TAG: Final = T.NAME << 3 | WireType.LEN
_RAW_DATA_TAG: Final = T.RAW_DATA << 3 | WireType.LEN
_PLAIN_TAGS: Final = frozenset({_DIMS_TAG, _DATA_TYPE_TAG, _NAME_TAG, _RAW_DATA_TAG})
_TWO_63: Final = 1 << 63
_TEXT_LIMIT: Final = limits.MAX_PROTOBUF_TEXT
_MAX_RANK: Final = limits.MAX_RANK
_SHARED_SHAPES: Final = 4096


def dtype_label(code: int) -> str:
    """modelport's name for an ONNX element type, or the ONNX name when there is none."""
    if code in KNOWN_TYPES:
        return DTYPE_NAMES.get(DataType(code), DataType(code).name.lower())
    return f"onnx-type-{code}"


class TensorRecord(NamedTuple):
    """A ``TensorProto`` as found: shape, type and where its elements are. (A NamedTuple:
    immutable, and a graph of a million initializers builds a million of them.)"""

    name: str
    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None = None
    typed: Mapping[int, tuple[Field, ...]] = _NOTHING_TYPED
    external: Mapping[str, str] = _NOTHING_EXTERNAL
    location: int = 0
    segmented: bool = False


class TensorData:
    """Turns ``TensorProto`` fields of one file into records, and records into tensors."""

    def __init__(self, msg: Message, path: Path) -> None:
        self.msg = msg
        self.path = path
        self.external_files: set[str] = set()
        self.kept = 0
        # One tuple per distinct shape (the first _SHARED_SHAPES of them): a million tensors
        # of a few shapes then hold a few tuples, not a million.
        self.shapes: dict[tuple[int, ...], tuple[int, ...]] = {}

    def keep(self) -> None:
        """Count one field kept for later (unpacked repeated values cost one each)."""
        self.kept += 1
        if self.kept > limits.MAX_ONNX_KEPT_FIELDS:
            raise LimitExceededError(
                "repeated tensor fields kept", limits.MAX_ONNX_KEPT_FIELDS, self.kept
            )

    def corrupt(self, message: str) -> CorruptFileError:
        return CorruptFileError(message, path=self.path)

    def record(self, item: Field) -> TensorRecord:
        """The ``TensorProto`` in ``item``: the common shape (dims, data_type, name, raw_data
        with one-byte tags) in one tight loop, anything else by the general field walk."""
        if item.wire != WireType.LEN:
            self.msg.expect(item, WireType.LEN)
        start, end = item.start, item.end
        return self.plain_record(start, end) or self.full_record(start, end)

    def plain_record(self, start: int, end: int) -> TensorRecord | None:
        """A tensor of only dims, data_type, name and raw_data fields, or None at the first
        other field or a length past the tensor's end (``full_record`` then reads it and says
        what is wrong). No Field is built and raw_data is skipped by its length, never read."""
        msg = self.msg
        data = msg.data
        budget = msg.budget
        dims: list[int] = []
        name, data_type = "", 0
        raw: tuple[int, int] | None = None
        pos, wide = start, False
        while pos < end:  # each turn moves on by two bytes or more: bounded by the tensor's size
            tag = data[pos]
            value = data[pos + 1] if pos + 1 < end else 0x80
            if value < 0x80:
                pos += 2
            elif tag in _PLAIN_TAGS:
                value, pos = msg.varint(pos + 1, end)
                wide = True
            else:
                return None
            budget -= 1
            if tag in (_RAW_DATA_TAG, _NAME_TAG):
                after = pos + value
                if after > end:
                    return None
                if tag == _RAW_DATA_TAG:
                    raw = (pos, after)
                else:
                    name = str(
                        data[pos : after if value <= _TEXT_LIMIT else pos + _TEXT_LIMIT],
                        "utf-8",
                        "replace",
                    )
                pos = after
            elif tag == _DIMS_TAG:
                dims.append(value)
                if len(dims) > _MAX_RANK:
                    raise LimitExceededError("ONNX tensor rank", _MAX_RANK, len(dims))
            elif tag == _DATA_TYPE_TAG:
                data_type = value
            else:
                return None
        if budget < 0:
            raise msg.over_budget()
        msg.budget = budget
        if wide:  # a negative int64 is a ten-byte varint
            data_type = s64(data_type)
            if dims and max(dims) >= _TWO_63:
                dims = [s64(d) for d in dims]
                raise self.corrupt(f"tensor {name!r} has a negative dimension in {dims}")
        shape, shapes = tuple(dims), self.shapes
        shape = shapes.setdefault(shape, shape) if len(shapes) < _SHARED_SHAPES else shape
        return new_tuple(
            TensorRecord,
            (name, shape, data_type, raw, _NOTHING_TYPED, _NOTHING_EXTERNAL, 0, False),
        )

    def full_record(self, start: int, end: int) -> TensorRecord:
        """Any ``TensorProto``, field by field."""
        msg = self.msg
        dims: list[int] = []
        name, data_type, location, segmented = "", 0, 0, False
        raw: tuple[int, int] | None = None
        typed: dict[int, list[Field]] = {}
        external: dict[str, str] = {}
        for part in msg.fields(start, end):
            number = part.number
            if number == T.DIMS:
                if part.wire == WireType.VARINT:  # one unpacked dimension, as protobuf writes
                    dims.append(s64(part.value))
                else:
                    dims.extend(s64(v) for v in msg.ints(part, limits.MAX_RANK + 1))
                if len(dims) > limits.MAX_RANK:
                    raise LimitExceededError("ONNX tensor rank", limits.MAX_RANK, len(dims))
            elif number == T.DATA_TYPE:
                msg.expect(part, WireType.VARINT)
                data_type = s64(part.value)
            elif number == T.NAME:
                name = msg.text(part)
            elif number == T.RAW_DATA:
                msg.expect(part, WireType.LEN)
                raw = (part.start, part.end)
            elif number in TYPED_FIELDS:
                self.keep()
                typed.setdefault(number, []).append(part)
            elif number == T.EXTERNAL_DATA:
                msg.expect(part, WireType.LEN)
                key = value = ""
                for entry in msg.fields(part.start, part.end):
                    if entry.number == 1:
                        key = msg.text(entry)
                    elif entry.number == 2:
                        value = msg.text(entry)
                external[key] = value
            elif number == T.DATA_LOCATION:
                msg.expect(part, WireType.VARINT)
                location = part.value
            elif number == T.SEGMENT:
                segmented = True
        if dims and min(dims) < 0:
            raise self.corrupt(f"tensor {name!r} has a negative dimension in {dims}")
        return TensorRecord(
            name,
            tuple(dims),
            data_type,
            raw,
            MappingProxyType({k: tuple(v) for k, v in typed.items()}) if typed else _NOTHING_TYPED,
            MappingProxyType(external) if external else _NOTHING_EXTERNAL,
            location,
            segmented,
        )

    def count(self, number: int, fields: tuple[Field, ...]) -> int:
        """Values held by a typed field's occurrences (packed runs or single values)."""
        width = FIXED_WIDTH.get(TensorField(number)) if number in TYPED_FIELDS else None
        total = 0
        for item in fields:
            if width is not None:
                self.msg.expect(item, WireType.LEN, WireType.I32 if width == 4 else WireType.I64)
                if item.length % width:
                    raise self.corrupt(f"packed field {number} is not a multiple of {width} bytes")
                total += item.length // width
            else:
                self.msg.expect(item, WireType.LEN, WireType.VARINT)
                for at in range(item.start, item.end, CHUNK):  # no copy of a whole huge field
                    chunk = self.msg.data[at : min(item.end, at + CHUNK)]
                    total += count_varints(bytes(chunk))
        return total

    def ref(self, record: TensorRecord, name: str) -> TensorRef | str:
        """The tensor, or why it is not one: ``STRING`` or the unsupported type's label."""
        code = record.data_type
        dtype = _DTYPE_BY_CODE.get(code)
        if dtype is None or record.segmented:
            return self.not_numeric(record, name)
        numel = math.prod(record.dims)
        nbytes = numel * _ITEMSIZE[dtype]
        raw = record.raw
        if record.location == EXTERNAL:
            storage = self.external(record, name, nbytes)
        elif raw is not None:
            start, end = raw
            if end - start != nbytes:
                raise self.corrupt(
                    f"tensor {name!r}: shape {list(record.dims)} of {dtype} needs {nbytes} "
                    f"bytes, raw_data holds {end - start}"
                )
            storage = Storage(self.path, start, nbytes, name)
        else:
            storage = self.typed_storage(record, name, DataType(code), numel, nbytes)
        return TensorRef(dtype, record.dims, storage)

    def not_numeric(self, record: TensorRecord, name: str) -> str:
        """Why a tensor with no numeric dtype (or in segments) is skipped; UNDEFINED is an
        error."""
        code = record.data_type
        if code == D.STRING:
            return STRING
        if code == D.UNDEFINED:
            raise self.corrupt(f"tensor {name!r} has data type UNDEFINED (0)")
        return "segmented" if record.segmented else dtype_label(code)

    def typed_storage(
        self, record: TensorRecord, name: str, code: DataType, numel: int, nbytes: int
    ) -> Storage:
        number = TYPED_FIELD.get(code, T.INT32_DATA)
        fields = record.typed.get(number, ())
        others = sorted(set(record.typed) - {number})
        if others and not fields:
            raise self.corrupt(
                f"tensor {name!r} of type {code.name} keeps its values in field {others[0]}, "
                f"where that type needs field {int(number)}"
            )
        expected = numel * (2 if code in (D.COMPLEX64, D.COMPLEX128) else 1)
        found = self.count(number, fields)
        if found != expected:
            raise self.corrupt(
                f"tensor {name!r}: shape {list(record.dims)} needs {expected} values, "
                f"field {int(number)} holds {found}"
            )
        spans = tuple((f.start, f.end) for f in fields)
        if numel == 0:
            return Storage(self.path, 0, 0, key=name)
        if number in FIXED_WIDTH and len(spans) == 1:
            return Storage(self.path, spans[0][0], nbytes, key=name)  # little-endian, in place
        width = None if number in FIXED_WIDTH else nbytes // numel
        return Storage(self.path, 0, nbytes, key=name, reader=_span_reader(self.path, spans, width))

    def external(self, record: TensorRecord, name: str, nbytes: int) -> Storage:
        entries = record.external
        location = entries.get("location", "")
        parts = re.split(r"[\\/]", location)
        if not location:
            raise self.corrupt(f"tensor {name!r} is EXTERNAL but names no location")
        if location[0] in "/\\" or ".." in parts or ":" in parts[0] or "\x00" in location:
            raise EscapingReferenceError(
                f"tensor {name!r}: external data location {location!r} points outside the "
                "model's folder; refusing to follow it",
                path=self.path,
            )
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries.get("length", str(nbytes)))
        except ValueError:
            raise self.corrupt(
                f"tensor {name!r}: external offset/length are not integers"
            ) from None
        if offset < 0 or length != nbytes:
            raise self.corrupt(
                f"tensor {name!r}: external data of {length} bytes at offset {offset}, "
                f"its shape needs {nbytes}"
            )
        target = self.path.parent / location
        if target.is_symlink() or (
            target.exists() and not target.resolve().is_relative_to(self.path.parent.resolve())
        ):
            raise EscapingReferenceError(
                f"tensor {name!r}: external data {location!r} is a symbolic link or leads "
                "outside the model's folder; refusing to follow it (onnx refuses it too)",
                path=self.path,
            )
        if not target.is_file():
            raise ModelFileNotFoundError(
                target,
                f"{self.path.name} keeps tensor {name!r} in {location!r}, which is not next to "
                "the model (copy the .onnx together with its data file)",
            )
        size = target.stat().st_size
        if offset + nbytes > size:
            raise TruncatedFileError(
                f"tensor {name!r} needs bytes {offset}..{offset + nbytes} of {location!r}, "
                f"which has {size} (truncated copy?)",
                expected=offset + nbytes,
                actual=size,
                path=target,
            )
        self.external_files.add(location)
        return Storage(target, offset, nbytes, key=name)


def _span_reader(
    path: Path, spans: tuple[tuple[int, int], ...], width: int | None
) -> Callable[[], NDArray]:
    """Typed fields decoded on first read: fixed-width runs joined, or varints narrowed."""

    def read_spans() -> NDArray:
        import numpy as np

        with open(path, "rb") as handle:
            chunks = []
            for start, end in spans:
                handle.seek(start)
                chunks.append(handle.read(end - start))
        data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        if width is None:
            return data
        return decode_varints(data).astype(f"<u{width}").view(np.uint8)

    return read_spans
