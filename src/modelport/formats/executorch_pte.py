"""ExecuTorch ``.pte``: a FlatBuffer ``Program`` (executorch/schema/program.fbs), then segments.

Layout (slot ids in schema order; a union takes two slots, its type then its value):

- bytes 0..4 MUST be the u32 offset of the root ``Program`` table; bytes 4..8 MUST be the
  file identifier ``ET12``;
- an extended header MAY follow at 8: ``eh00``, a u32 length (at least 24), u64
  ``program_size`` (the flatbuffer's bytes), u64 ``segment_base_offset`` and, when the
  length is 32 or more, u64 ``segment_data_size``; all little-endian. Segments lie at
  ``segment_base_offset`` plus their own offset;
- ``Program``: ``version`` (0), ``execution_plan`` (1), ``constant_buffer`` (2: ``Buffer``
  tables whose ``storage`` (0) vector holds the bytes inside the flatbuffer; entry 0 is
  empty), ``backend_delegate_data`` (3), ``segments`` (4: ``DataSegment`` ``offset`` (0),
  ``size`` (1)), ``constant_segment`` (5: ``SubsegmentOffsets`` ``segment_index`` (0),
  ``offsets`` (1)), ``mutable_data_segments`` (6), ``named_data`` (7: ``key`` (0),
  ``segment_index`` (1));
- ``ExecutionPlan``: ``name`` (0), ``values`` (2: ``EValue``, union ``val`` in slots 0-1,
  tensor type 5), ``operators`` (6: ``name`` (0), ``overload`` (1)), ``delegates`` (7: ``id``
  (0));
- ``Tensor``: ``scalar_type`` (0, torch's ``ScalarType`` codes), ``storage_offset`` (1),
  ``sizes`` (2, [int32]), ``dim_order`` (3, [ubyte]), ``data_buffer_idx`` (5),
  ``allocation_info`` (6: set for tensors the runtime allocates), ``extra_tensor_info``
  (9: ``mutable_data_segments_idx`` (0), ``fully_qualified_name`` (1), ``location`` (2,
  1 = in an external ``.ptd`` file)).

A constant is a tensor without ``allocation_info`` and with ``data_buffer_idx`` > 0: its
bytes are ``constant_buffer[idx]``, or, when ``constant_segment`` lists offsets, the bytes at
``offsets[idx]`` of that segment. A mutable buffer (``allocation_info`` set) takes its
initial value from ``mutable_data_segments[mutable_data_segments_idx]`` the same way.

Choices: the program keeps no names for its constants, so a tensor is named by its fully
qualified name when the file records one (external and mutable tensors), else
``<method>.values.<index>``; values that share a buffer share a ``Storage`` (aliases). A
``dim_order`` other than the identity becomes strides; a ``storage_offset`` other than 0 is
refused, as the runtime refuses it. Tensors in an external ``.ptd``
file and backend payloads (delegates, ``named_data``) are reported in ``details``.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from enum import IntEnum
from pathlib import Path
from typing import Any, Final

from modelport import dtypes, limits
from modelport.errors import CorruptFileError, TruncatedFileError, UnsupportedDtypeError
from modelport.formats._flatbuffers import FlatBuffer, Table
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import Storage, TensorRef

IDENTIFIER: Final = re.compile(rb"ET\d\d")
EXTENDED_MAGIC: Final = b"eh00"
_EXTENDED: Final = struct.Struct("<4sIQQ")
_MIN_EXTENDED_LENGTH: Final = 24
TENSOR_VALUE: Final = 5  # KernelTypes.Tensor
EXTERNAL: Final = 1  # TensorDataLocation.EXTERNAL
# ScalarType code -> modelport dtype (executorch/schema/scalar_type.fbs).
SCALAR_TYPES: Final = {
    0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
    7: "float64", 11: "bool", 12: "qint8", 13: "quint8", 14: "qint32", 15: "bfloat16",
    16: "quint4x2", 17: "quint2x4", 23: "float8_e5m2", 24: "float8_e4m3fn",
    25: "float8_e5m2fnuz", 26: "float8_e4m3fnuz", 27: "uint16", 28: "uint32", 29: "uint64",
}  # fmt: skip
_LISTED: Final = 50


class ProgramSlot(IntEnum):
    VERSION = 0
    EXECUTION_PLAN = 1
    CONSTANT_BUFFER = 2
    SEGMENTS = 4
    CONSTANT_SEGMENT = 5
    MUTABLE_DATA_SEGMENTS = 6
    NAMED_DATA = 7


class PlanSlot(IntEnum):
    NAME = 0
    VALUES = 2
    OPERATORS = 6
    DELEGATES = 7


class TensorSlot(IntEnum):
    SCALAR_TYPE = 0
    STORAGE_OFFSET = 1
    SIZES = 2
    DIM_ORDER = 3
    DATA_BUFFER_IDX = 5
    ALLOCATION_INFO = 6
    EXTRA_TENSOR_INFO = 9


class ExtraSlot(IntEnum):
    MUTABLE_DATA_SEGMENTS_IDX = 0
    FULLY_QUALIFIED_NAME = 1
    LOCATION = 2


def sniff(probe: Probe) -> bool:
    """The identifier at 4..8 and a root offset past it (a truncated file still sniffs)."""
    if probe.is_dir or len(probe.head) < 8 or not IDENTIFIER.fullmatch(probe.head[4:8]):
        return False
    root: int = struct.unpack_from("<I", probe.head, 0)[0]
    return 8 <= root < 1 << 31


def read(path: Path, probe: Probe) -> Contents:
    if probe.size < 16:
        raise TruncatedFileError(
            "ExecuTorch program shorter than its header", expected=16, actual=probe.size, path=path
        )
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        program_size, segment_base = _extended_header(m, path)
        buf = FlatBuffer(m, path)
        buf.size = program_size  # the flatbuffer's offsets stay inside it
        return _Reader(buf, path, segment_base, len(m)).program(bytes(m[4:8]))


def _extended_header(data: mmap.mmap, path: Path) -> tuple[int, int]:
    """(the flatbuffer's size, where segments start); a file without the header is all
    flatbuffer and has no segments."""
    if len(data) < 8 + _EXTENDED.size or data[8:12] != EXTENDED_MAGIC:
        return len(data), 0
    _, length, program_size, segment_base = _EXTENDED.unpack_from(data, 8)
    if length < _MIN_EXTENDED_LENGTH:
        return len(data), 0
    if program_size > len(data) or segment_base > len(data):
        raise TruncatedFileError(
            f"the extended header places {max(program_size, segment_base):,} bytes of program "
            "and segments",
            expected=max(program_size, segment_base),
            actual=len(data),
            path=path,
        )
    return program_size, segment_base


class _Reader:
    def __init__(self, buf: FlatBuffer, path: Path, segment_base: int, file_size: int) -> None:
        self.buf = buf
        self.path = path
        self.segment_base = segment_base
        self.file_size = file_size
        self.segments: list[tuple[int, int]] = []  # (absolute offset, size)
        self.constant_buffers: list[Table] = []
        self.constant_offsets: tuple[int, list[int]] | None = None  # (segment, offsets)
        self.mutable: list[tuple[int, list[int]]] = []
        self.storages: dict[tuple[str, int], Storage] = {}
        self.external: list[str] = []

    def corrupt(self, message: str) -> CorruptFileError:
        return CorruptFileError(message, path=self.path)

    def program(self, identifier: bytes) -> Contents:
        program = self.buf.root("Program")
        for table in program.tables(ProgramSlot.SEGMENTS, "DataSegment"):
            offset, size = table.scalar(0, "<Q", 0), table.scalar(1, "<Q", 0)
            start = self.segment_base + offset
            if start + size > self.file_size:
                raise TruncatedFileError(
                    f"segment {len(self.segments)} needs bytes up to {start + size:,}",
                    expected=start + size,
                    actual=self.file_size,
                    path=self.path,
                )
            self.segments.append((start, size))
        self.constant_buffers = program.tables(ProgramSlot.CONSTANT_BUFFER, "Buffer")
        at = program.ref(ProgramSlot.CONSTANT_SEGMENT)
        if at:
            found = self.subsegment(self.buf.table(at, "SubsegmentOffsets"))
            self.constant_offsets = found if found[1] else None
        self.mutable = [
            self.subsegment(t)
            for t in program.tables(ProgramSlot.MUTABLE_DATA_SEGMENTS, "SubsegmentOffsets")
        ]
        tree: dict[str, TensorRef] = {}
        methods = [
            self.plan(plan, tree)
            for plan in program.tables(ProgramSlot.EXECUTION_PLAN, "ExecutionPlan")
        ]
        named = [t.string(0) for t in program.tables(ProgramSlot.NAMED_DATA, "NamedData")]
        details: dict[str, Any] = {
            "identifier": identifier.decode("ascii"),
            "version": program.scalar(ProgramSlot.VERSION, "<I", 0),
            "methods": methods,
            "segments": len(self.segments),
        }
        if named:
            details["named_data"] = named[:_LISTED]
        if self.external:
            details["external_tensors"] = self.external[:_LISTED]
        return Contents(Format.EXECUTORCH_PTE, tree, details=details)

    def subsegment(self, table: Table) -> tuple[int, list[int]]:
        index = table.scalar(0, "<I", 0)
        offsets = table.scalars(1, "<Q", limits.MAX_FLATBUFFER_ITEMS)
        if offsets and index >= len(self.segments):
            raise self.corrupt(f"data in segment {index} of {len(self.segments)}")
        return index, offsets

    def plan(self, plan: Table, tree: dict[str, TensorRef]) -> dict[str, Any]:
        name = plan.string(PlanSlot.NAME)
        values = plan.tables(PlanSlot.VALUES, "EValue")
        for index, value in enumerate(values):
            if value.scalar(0, "<B", 0) != TENSOR_VALUE or not value.ref(1):
                continue
            found = self.tensor(self.buf.table(value.ref(1), "Tensor"))
            if found is not None:
                fqn, ref = found
                tree.setdefault(fqn or f"{name}.values.{index}", ref)
        operators = plan.tables(PlanSlot.OPERATORS, "Operator")
        return {
            "name": name,
            "values": len(values),
            "operators": sorted({_operator(op) for op in operators})[:_LISTED],
            "delegates": [d.string(0) for d in plan.tables(PlanSlot.DELEGATES, "Delegate")],
        }

    def tensor(self, table: Table) -> tuple[str, TensorRef] | None:
        """(fully qualified name or "", the tensor) of a value with stored data, else None."""
        index = table.scalar(TensorSlot.DATA_BUFFER_IDX, "<I", 0)
        allocated = table.ref(TensorSlot.ALLOCATION_INFO) != 0
        at = table.ref(TensorSlot.EXTRA_TENSOR_INFO)
        extra = self.buf.table(at, "ExtraTensorInfo") if at else None
        fqn = extra.string(ExtraSlot.FULLY_QUALIFIED_NAME) if extra is not None else ""
        if extra is not None and extra.scalar(ExtraSlot.LOCATION, "<b", 0) == EXTERNAL:
            self.external.append(fqn)
            return None
        if index == 0 or (allocated and not self.mutable):
            return None
        code = table.scalar(TensorSlot.SCALAR_TYPE, "<b", 0)
        dtype = SCALAR_TYPES.get(code)
        if dtype is None:
            raise UnsupportedDtypeError(f"{self.path}: {fqn or 'a tensor'} has ScalarType {code}")
        sizes = table.scalars(TensorSlot.SIZES, "<i", limits.MAX_RANK)
        if any(n < 0 for n in sizes):
            raise self.corrupt(f"tensor of sizes {sizes} has a negative size")
        nbytes = dtypes.dtype(dtype).nbytes(math.prod(sizes))
        if allocated:
            slot = extra.scalar(ExtraSlot.MUTABLE_DATA_SEGMENTS_IDX, "<Q", 0) if extra else 0
            if slot >= len(self.mutable):
                raise self.corrupt(f"mutable data segment {slot} of {len(self.mutable)}")
            storage = self.subsegment_storage(f"mutable {slot}", self.mutable[slot], index, nbytes)
        elif self.constant_offsets is not None:
            storage = self.subsegment_storage("constant", self.constant_offsets, index, nbytes)
        else:
            storage = self.buffer_storage(index, nbytes)
        offset = table.scalar(TensorSlot.STORAGE_OFFSET, "<i", 0)
        if offset != 0:  # the runtime points a constant at its buffer's first byte
            raise self.corrupt(f"constant of sizes {sizes} has storage_offset {offset}")
        strides = _strides(sizes, table.scalars(TensorSlot.DIM_ORDER, "<B", limits.MAX_RANK))
        return fqn, TensorRef(dtype, tuple(sizes), storage, 0, strides)

    def buffer_storage(self, index: int, nbytes: int) -> Storage:
        if index >= len(self.constant_buffers):
            raise self.corrupt(f"constant buffer {index} of {len(self.constant_buffers)}")
        span = self.constant_buffers[index].vector(0, 1)
        start, size = span if span is not None else (0, 0)
        return self.shared(("buffer", index), start, size, nbytes)

    def subsegment_storage(
        self, kind: str, subsegment: tuple[int, list[int]], index: int, nbytes: int
    ) -> Storage:
        """Entry ``index`` of a segment cut at ``offsets``: up to the next offset, or the
        segment's end for the last."""
        segment, offsets = subsegment
        if index >= len(offsets):
            raise self.corrupt(f"{kind} data {index} of {len(offsets)} in segment {segment}")
        start, size = self.segments[segment]
        end = offsets[index + 1] if index + 1 < len(offsets) else size
        if offsets[index] > size or end > size or end < offsets[index]:
            raise self.corrupt(f"{kind} data {index} lies outside segment {segment}")
        return self.shared((kind, index), start + offsets[index], end - offsets[index], nbytes)

    def shared(self, key: tuple[str, int], start: int, size: int, nbytes: int) -> Storage:
        """One Storage per buffer, so values over the same bytes alias; the bytes MUST hold
        the tensor (writers pad buffers to their alignment, so they may hold more)."""
        if size < nbytes:
            raise self.corrupt(f"{key[0]} data {key[1]} holds {size:,} bytes, not {nbytes:,}")
        found = self.storages.get(key)
        if found is None:
            found = Storage(self.path, start, size, key=f"{key[0]} data {key[1]}")
            self.storages[key] = found
        return found


def _operator(table: Table) -> str:
    name, overload = table.string(0), table.string(1)
    return f"{name}.{overload}" if overload else name


def _strides(sizes: list[int], order: list[int]) -> tuple[int, ...] | None:
    """Element strides for a non-identity ``dim_order`` (the dims from outermost to
    innermost in memory); None (contiguous) for the identity."""
    if not order or order == list(range(len(sizes))):
        return None
    if sorted(order) != list(range(len(sizes))):
        raise CorruptFileError(f"dim_order {order} is not an order of {len(sizes)} dims")
    strides = [0] * len(sizes)
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(sizes[dim], 1)
    return tuple(strides)


READER = FormatReader(Format.EXECUTORCH_PTE, sniff, read, (".pte",))
