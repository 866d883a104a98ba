"""ONNX ``ValueInfoProto``: how a graph describes its inputs and outputs (onnx/onnx.proto).

- ``ValueInfoProto``: ``name`` (1), ``type`` (2, a ``TypeProto``);
- ``TypeProto`` holds ONE of ``tensor_type`` (1), ``sequence_type`` (4), ``map_type`` (5),
  ``opaque_type`` (7), ``sparse_tensor_type`` (8), ``optional_type`` (9); a tensor type has
  ``elem_type`` (1, a ``DataType`` code) and ``shape`` (2);
- a ``TensorShapeProto`` is repeated ``dim`` (1), each a number ``dim_value`` (1) or a name
  ``dim_param`` (2), or neither (an unknown size, listed as None); the rank is capped at
  ``limits.MAX_RANK``.

Only descriptions: nothing here locates tensor data.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Final

from modelport import limits
from modelport.errors import LimitExceededError
from modelport.formats._onnx_tensors import dtype_label
from modelport.formats._protobuf import Field, Message, WireType, signed64

OTHER_KINDS: Final = MappingProxyType({4: "sequence", 5: "map", 7: "opaque", 9: "optional"})
TENSOR_KINDS: Final = MappingProxyType({1: "tensor", 8: "sparse_tensor"})


def value_info(msg: Message, item: Field) -> dict[str, Any]:
    """An input or output: name, and dtype/shape when it is a tensor."""
    msg.expect(item, WireType.LEN)
    info: dict[str, Any] = {"name": ""}
    for part in msg.fields(item.start, item.end):
        if part.number == 1:
            info["name"] = msg.text(part)
        elif part.number == 2:
            info.update(type_proto(msg, part))
    return info


def type_proto(msg: Message, item: Field) -> dict[str, Any]:
    """The first type the ``TypeProto`` holds, with dtype and shape for tensors."""
    msg.expect(item, WireType.LEN)
    for part in msg.fields(item.start, item.end):
        if part.number in OTHER_KINDS:
            return {"type": OTHER_KINDS[part.number]}
        if part.number not in TENSOR_KINDS:
            continue
        result: dict[str, Any] = {"type": TENSOR_KINDS[part.number]}
        msg.expect(part, WireType.LEN)
        for sub in msg.fields(part.start, part.end):
            if sub.number == 1:
                msg.expect(sub, WireType.VARINT)
                result["dtype"] = dtype_label(signed64(sub.value))
            elif sub.number == 2:
                result["shape"] = shape(msg, sub)
        return result
    return {}


def shape(msg: Message, item: Field) -> list[int | str | None]:
    msg.expect(item, WireType.LEN)
    dims: list[int | str | None] = []
    for dim in msg.fields(item.start, item.end):
        if dim.number != 1:
            continue
        msg.expect(dim, WireType.LEN)
        value: int | str | None = None
        for part in msg.fields(dim.start, dim.end):
            if part.number == 1:
                msg.expect(part, WireType.VARINT)
                value = signed64(part.value)
            elif part.number == 2:
                value = msg.text(part)
        dims.append(value)
        if len(dims) > limits.MAX_RANK:
            raise LimitExceededError("ONNX value rank", limits.MAX_RANK, len(dims))
    return dims
