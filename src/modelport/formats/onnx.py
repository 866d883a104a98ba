"""ONNX: one protobuf ``ModelProto``, parsed here without the ``onnx`` package.

Layout (onnx/onnx.proto; field numbers in the enums below):

- the file MUST be a serialized ``ModelProto``: ``ir_version`` (1), producer (2, 3),
  ``domain`` (4), ``model_version`` (5), ``doc_string`` (6), ``graph`` (7),
  ``opset_import`` (8), ``metadata_props`` (14), ``functions`` (25); writers emit fields in
  number order, so ``ir_version`` comes first and the graph soon after;
- a ``GraphProto`` holds ``node`` (1), ``initializer`` (5, ``TensorProto``),
  ``sparse_initializer`` (15), ``input``/``output`` (11, 12, ``ValueInfoProto``);
- a node's attributes MAY hold tensors (``t``, a ``Constant``'s ``value``) and subgraphs
  (``g``/``graphs``: If, Loop, Scan bodies), which hold nodes and initializers in turn;
- a ``TensorProto`` keeps its elements in ONE of: ``raw_data`` (little-endian, fixed
  width: here a zero-copy byte range of the file), a typed repeated field (``float_data``,
  ``int32_data`` which also carries 8/16-bit ints, bool, float16, bfloat16 and float8 bit
  patterns, ``int64_data``, ``double_data``, ``uint64_data``; decoded on first read), or an
  external file (``data_location`` = EXTERNAL with ``location``/``offset``/``length``);
- ``location`` is relative to the model's folder; absolute locations and ``..`` are refused,
  never followed.

Edge cases: 0-d and empty tensors; STRING tensors are listed in ``details`` (no numeric
data); 2/4/6-bit types are reported as unsupported; subgraph nesting is walked with an
explicit stack to depth ``limits.MAX_DEPTH``. ``onnx.load`` accepts any protobuf, so sniffing is
strict: only known ``ModelProto`` fields, ``ir_version`` first, then a graph.
"""

from __future__ import annotations

import mmap
from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from modelport import limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
)
from modelport.formats._onnx_tensors import (
    STRING,
    DataType,
    TensorData,
    TensorField,
    TensorRecord,
)
from modelport.formats._onnx_values import value_info
from modelport.formats._protobuf import Field, Message, WireType
from modelport.formats._protobuf import signed64 as s64
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import TensorRef, collector_paused

MAX_IR_VERSION = 100


class ModelField(IntEnum):
    IR_VERSION = 1
    PRODUCER_NAME = 2
    PRODUCER_VERSION = 3
    DOMAIN = 4
    MODEL_VERSION = 5
    DOC_STRING = 6
    GRAPH = 7
    OPSET_IMPORT = 8
    METADATA_PROPS = 14
    TRAINING_INFO = 20
    FUNCTIONS = 25
    CONFIGURATION = 26


class GraphField(IntEnum):
    NODE = 1
    NAME = 2
    INITIALIZER = 5
    DOC_STRING = 10
    INPUT = 11
    OUTPUT = 12
    VALUE_INFO = 13
    QUANTIZATION_ANNOTATION = 14
    SPARSE_INITIALIZER = 15
    METADATA_PROPS = 16


class NodeField(IntEnum):
    INPUT = 1
    OUTPUT = 2
    NAME = 3
    OP_TYPE = 4
    ATTRIBUTE = 5
    DOMAIN = 7


class AttributeField(IntEnum):
    NAME = 1
    F = 2
    I = 3  # noqa: E741
    S = 4
    T = 5
    G = 6
    FLOATS = 7
    INTS = 8
    STRINGS = 9
    GRAPHS = 11
    TYPE = 20
    SPARSE_TENSOR = 22


GRAPH_FIELDS: Final = frozenset(int(f) for f in GraphField)
_NODE: Final = int(GraphField.NODE)
_INITIALIZER: Final = int(GraphField.INITIALIZER)
_INITIALIZER_TAG: Final = _INITIALIZER << 3 | WireType.LEN
# ModelProto fields and their wire types: anything else at the top level is not ONNX.
MODEL_WIRES: Final = MappingProxyType(
    {f: WireType.LEN for f in ModelField}
    | {ModelField.IR_VERSION: WireType.VARINT, ModelField.MODEL_VERSION: WireType.VARINT}
)


def sniff(probe: Probe) -> bool:
    """ir_version first, then only known ModelProto fields, until a graph whose first field
    is a GraphProto field."""
    head = probe.head
    if probe.is_dir or len(head) < 4 or head[0] != 0x08:
        return False
    walker = Message(head, None, 1)
    pos, end = 0, len(head)
    try:
        while pos < end:
            tag, pos = walker.varint(pos, end)
            number, wire = tag >> 3, tag & 7
            if number not in MODEL_WIRES or MODEL_WIRES[ModelField(number)] != wire:
                return False
            value, pos = walker.varint(pos, end)
            if number == ModelField.IR_VERSION and not 1 <= value <= MAX_IR_VERSION:
                return False
            if wire == WireType.LEN:
                if number == ModelField.GRAPH:  # may run past a truncated file's end: read says so
                    return value == 0 or (pos < end and _graph_tag_ok(walker, pos, end))
                if pos + value > probe.size:
                    return False
                pos += value
    except ModelportError:
        return False
    return False


def _graph_tag_ok(walker: Message, pos: int, end: int) -> bool:
    tag, _ = walker.varint(pos, end)
    return tag & 7 == WireType.LEN and tag >> 3 in GRAPH_FIELDS


@dataclass(frozen=True)
class _Item:
    """A graph (or a function body's node) waiting on the walk's stack."""

    is_graph: bool
    start: int
    end: int
    depth: int
    prefix: str  # prepended to tensor names (function bodies)
    counted: bool  # whether its nodes count in op_counts (the main graph's tree)

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


@dataclass
class _Walk:
    """What reading one file gathers."""

    initializers: dict[str, TensorRef] = field(default_factory=dict)
    constants: dict[str, TensorRef] = field(default_factory=dict)
    op_counts: Counter[str] = field(default_factory=Counter)
    nodes: int = 0
    graphs: int = 0
    strings: dict[str, list[int]] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    sparse: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read(path: Path, probe: Probe) -> Contents:
    if probe.size == 0:
        raise TruncatedFileError("empty ONNX file", expected=1, actual=0, path=path)
    with (
        collector_paused(),
        open(path, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m,
    ):
        return _Reader(Message(m, path, limits.MAX_ONNX_FIELDS), path).model()


class _Reader:
    def __init__(self, msg: Message, path: Path) -> None:
        self.msg = msg
        self.path = path
        self.walk = _Walk()
        self.data = TensorData(msg, path)

    def corrupt(self, message: str) -> CorruptFileError:
        return CorruptFileError(message, path=self.path)

    def varint(self, item: Field) -> int:
        self.msg.expect(item, WireType.VARINT)
        return item.value

    def model(self) -> Contents:
        msg, walk = self.msg, self.walk
        details: dict[str, Any] = {}
        metadata: dict[str, str] = {}
        opsets: dict[str, int] = {}
        graph: Field | None = None
        functions: list[Field] = []
        for item in msg.fields(0, msg.size):
            number = item.number
            if number == ModelField.IR_VERSION:
                details["ir_version"] = s64(self.varint(item))
            elif number in (ModelField.PRODUCER_NAME, ModelField.PRODUCER_VERSION):
                key = "producer" if number == ModelField.PRODUCER_NAME else "producer_version"
                details[key] = msg.text(item)
            elif number == ModelField.DOMAIN:
                details["domain"] = msg.text(item)
            elif number == ModelField.MODEL_VERSION:
                details["model_version"] = s64(self.varint(item))
            elif number == ModelField.DOC_STRING:
                details["doc_string"] = msg.text(item, 2000)[:500]
            elif number == ModelField.GRAPH:
                if graph is not None:
                    raise self.corrupt("ModelProto holds more than one graph")
                msg.expect(item, WireType.LEN)
                graph = item
            elif number == ModelField.OPSET_IMPORT:
                entry = self.pairs(item)
                domain = msg.text(entry[1]) if 1 in entry else ""
                opsets[domain or "ai.onnx"] = s64(self.varint(entry[2])) if 2 in entry else 0
            elif number == ModelField.METADATA_PROPS:
                entry = self.pairs(item)
                key = msg.text(entry[1]) if 1 in entry else ""
                metadata[key] = msg.text(entry[2]) if 2 in entry else ""
            elif number == ModelField.FUNCTIONS:
                functions.append(item)
        if graph is None:
            raise self.corrupt("ONNX model has no graph")
        details["opset"] = opsets
        details.update(self.graphs(graph, functions))
        tree = walk.initializers  # counted already: constants join it in place, no copy
        for name, ref in walk.constants.items():
            if tree.setdefault(name, ref) is not ref:
                walk.warnings.append(
                    f"constant {name!r} has an initializer's name; listed the initializer"
                )
        extra = {
            "string_tensors": walk.strings,
            "unsupported_tensors": walk.unsupported,
            "sparse_tensors": walk.sparse,
            "external_data": sorted(self.data.external_files),
        }
        details.update({key: value for key, value in extra.items() if value})
        return Contents(Format.ONNX, tree, metadata, details, warnings=walk.warnings)

    def pairs(self, item: Field) -> dict[int, Field]:
        """The fields of a two-field message (OperatorSetIdProto, StringStringEntryProto)."""
        self.msg.expect(item, WireType.LEN)
        return {f.number: f for f in self.msg.fields(item.start, item.end) if f.number in (1, 2)}

    def graphs(self, root: Field, functions: list[Field]) -> dict[str, Any]:
        """Walk the main graph, every subgraph under it and function bodies, with a stack."""
        walk = self.walk
        top: dict[str, Any] = {"graph_name": "", "inputs": [], "outputs": []}
        stack: list[_Item] = [_Item(True, root.start, root.end, 0, "", True)]
        names: list[str] = []
        for function in functions:
            fname, nodes = self.function(function)
            names.append(fname)
            stack.extend(_Item(False, f.start, f.end, 1, f"{fname}/", False) for f in nodes)
        while stack:
            item = stack.pop()
            if item.depth > limits.MAX_DEPTH:
                raise LimitExceededError(
                    "nesting depth of ONNX subgraphs", limits.MAX_DEPTH, item.depth
                )
            if not item.is_graph:  # a function body's node
                node = Field(GraphField.NODE, WireType.LEN, item.end - item.start, *item.span)
                stack.extend(reversed(self.node(node, item)))
                continue
            walk.graphs += 1
            stack.extend(reversed(self.graph(item, top)))
        top.update(
            node_count=walk.nodes,
            op_counts=dict(walk.op_counts.most_common()),
            subgraphs=walk.graphs - 1,
            initializers=len(walk.initializers),
            constants=len(walk.constants),
        )
        if names:
            top["functions"] = names
        return top

    def graph(self, item: _Item, top: dict[str, Any]) -> list[_Item]:
        """One graph's fields; returns its subgraphs. Initializers, which a graph may hold
        by the million, are read in runs without a Field each."""
        msg, data = self.msg, self.msg.data
        subgraphs: list[_Item] = []
        pos, end = item.span
        while pos < end:
            if data[pos] == _INITIALIZER_TAG:
                pos = self.initializers(pos, end, item.prefix)
                continue
            msg.spend()
            part = msg.field_at(pos, end)
            pos, number = part.end, part.number
            if number == _NODE:
                subgraphs.extend(self.node(part, item))
            elif number == _INITIALIZER:  # a tag written in more than one byte
                self.add(self.data.record(part), "", self.walk.initializers, item.prefix)
            elif number == GraphField.SPARSE_INITIALIZER:
                self.sparse(part, "", item.prefix)
            elif item.depth == 0 and number == GraphField.NAME:
                top["graph_name"] = msg.text(part)
            elif item.depth == 0 and number in (GraphField.INPUT, GraphField.OUTPUT):
                key = "inputs" if number == GraphField.INPUT else "outputs"
                top[key].append(value_info(msg, part))
        return subgraphs

    def initializers(self, pos: int, end: int, prefix: str) -> int:
        """The run of initializer fields (one-byte tags) from ``pos``; returns where it ends."""
        msg, data, tensors = self.msg, self.msg.data, self.data
        into = self.walk.initializers
        while pos < end and data[pos] == _INITIALIZER_TAG:
            msg.spend()
            length = data[pos + 1] if pos + 1 < end else 0x80
            if length < 0x80:
                start = pos + 2
            else:
                length, start = msg.varint(pos + 1, end)
            pos = start + length
            if pos > end:
                raise msg.truncated(
                    f"field 5 at byte {start} needs {length} bytes, "
                    f"its message has {end - start} left",
                    pos,
                    end,
                )
            record = tensors.plain_record(start, pos) or tensors.full_record(start, pos)
            self.add(record, "", into, prefix)
        return pos

    def function(self, item: Field) -> tuple[str, list[Field]]:
        msg = self.msg
        msg.expect(item, WireType.LEN)
        name, domain, nodes = "", "", []
        for part in msg.fields(item.start, item.end):
            if part.number == 1:
                name = msg.text(part)
            elif part.number == 10:
                domain = msg.text(part)
            elif part.number == 7:
                msg.expect(part, WireType.LEN)
                nodes.append(part)
        return (f"{domain}.{name}" if domain else name), nodes

    def node(self, item: Field, where: _Item) -> list[_Item]:
        """Count the node, register a Constant's tensor; return its subgraphs to walk."""
        msg = self.msg
        msg.expect(item, WireType.LEN)
        outputs: list[str] = []
        op_type, domain = "", ""
        attributes: list[Field] = []
        for part in msg.fields(item.start, item.end):
            if part.number == NodeField.OUTPUT:
                outputs.append(msg.text(part))
            elif part.number == NodeField.OP_TYPE:
                op_type = msg.text(part)
            elif part.number == NodeField.DOMAIN:
                domain = msg.text(part)
            elif part.number == NodeField.ATTRIBUTE:
                msg.expect(part, WireType.LEN)
                attributes.append(part)
        standard = domain in ("", "ai.onnx")
        if where.counted:
            self.walk.nodes += 1
            self.walk.op_counts[op_type if standard else f"{domain}.{op_type}"] += 1
        found: list[_Item] = []
        constant = op_type == "Constant" and standard
        for attribute in attributes:
            name, parts = self.attribute(attribute, values=constant)
            for graph in parts.get(AttributeField.G, []) + parts.get(AttributeField.GRAPHS, []):
                msg.expect(graph, WireType.LEN)
                found.append(
                    _Item(
                        True, graph.start, graph.end, where.depth + 1, where.prefix, where.counted
                    )
                )
            if constant:
                self.constant(outputs[0] if outputs else "", name, parts, where.prefix)
        return found

    def attribute(self, item: Field, values: bool) -> tuple[str, dict[int, list[Field]]]:
        """Name and fields of an attribute: subgraphs always, values only when asked."""
        name = ""
        parts: dict[int, list[Field]] = {}
        for part in self.msg.fields(item.start, item.end):
            if part.number == AttributeField.NAME:
                name = self.msg.text(part)
            elif values or part.number in (AttributeField.G, AttributeField.GRAPHS):
                self.data.keep()
                parts.setdefault(part.number, []).append(part)
        return name, parts

    def constant(self, output: str, attr: str, parts: dict[int, list[Field]], prefix: str) -> None:
        """A Constant node's value: a tensor, a float/int (list), or strings (listed only)."""
        walk = self.walk
        if attr == "value" and AttributeField.T in parts:
            self.add(self.data.record(parts[AttributeField.T][-1]), output, walk.constants, prefix)
        elif attr == "sparse_value" and AttributeField.SPARSE_TENSOR in parts:
            self.sparse(parts[AttributeField.SPARSE_TENSOR][-1], output, prefix)
        elif attr in ("value_string", "value_strings"):
            count = len(parts.get(AttributeField.STRINGS, []))
            walk.strings[prefix + output] = [] if attr == "value_string" else [count]
        elif attr in ("value_float", "value_floats", "value_int", "value_ints"):
            scalar = attr in ("value_float", "value_int")
            is_float = attr.startswith("value_float")
            number = {
                "value_float": AttributeField.F, "value_floats": AttributeField.FLOATS,
                "value_int": AttributeField.I, "value_ints": AttributeField.INTS,
            }[attr]  # fmt: skip
            stored = TensorField.FLOAT_DATA if is_float else TensorField.INT64_DATA
            fields = tuple(parts.get(number, [])[-1:] if scalar else parts.get(number, []))
            dims = () if scalar else (self.data.count(stored, fields),)
            code = DataType.FLOAT if is_float else DataType.INT64
            typed = MappingProxyType({int(stored): fields})
            record = TensorRecord(output, dims, code, typed=typed)
            self.add(record, output, walk.constants, prefix)

    def add(
        self, record: TensorRecord, output: str, into: dict[str, TensorRef], prefix: str
    ) -> None:
        name = prefix + (output or record.name or f"tensor_{len(into)}")
        ref = self.data.ref(record, name)
        if isinstance(ref, str):
            if ref == STRING:
                self.walk.strings[name] = list(record.dims)
            else:
                self.walk.unsupported[name] = ref
                self.walk.warnings.append(
                    f"tensor {name!r}: {ref} tensors are not supported; skipped"
                )
        elif into.setdefault(name, ref) is not ref:
            self.walk.warnings.append(f"tensor name {name!r} appears twice; kept the first")

    def sparse(self, item: Field, output: str, prefix: str) -> None:
        """SparseTensorProto: values (1) and indices (2) are listed as two dense tensors."""
        self.msg.expect(item, WireType.LEN)
        parts: dict[int, list[Field]] = {}
        for part in self.msg.fields(item.start, item.end):
            parts.setdefault(part.number, []).append(part)
        if 1 not in parts:
            raise self.corrupt("sparse tensor without values")
        values = self.data.record(parts[1][-1])
        name = prefix + (output or values.name or f"sparse_{len(self.walk.sparse)}")
        dims = [s64(v) for f in parts.get(3, []) for v in self.msg.ints(f, limits.MAX_RANK + 1)]
        self.walk.sparse[name] = dims[: limits.MAX_RANK + 1]
        self.add(values, f"{name}.values", self.walk.initializers, "")
        if 2 in parts:
            self.add(self.data.record(parts[2][-1]), f"{name}.indices", self.walk.initializers, "")


READER = FormatReader(Format.ONNX, sniff, read, (".onnx",))
