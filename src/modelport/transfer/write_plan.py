"""What a writer is asked to write: the tensors in file order, each with the dtype it is stored
as, and the file's metadata. The formats' writers take it and the byte movers stream it, so
it lives below both."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from modelport import dtypes
from modelport.tensors import TensorRef


@dataclass(frozen=True)
class OutputTensor:
    """One tensor as a writer will store it: its name, the dtype written, and its source.

    ``written_shape`` stores the source's elements, in its C order, under another shape of
    the same size: a permuted view of the source (4-d strides) written as the 2-d matrix a
    reader expects, still streamed chunk by chunk. None writes the source's own shape."""

    name: str
    dtype: str
    source: TensorRef
    written_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.written_shape is not None and math.prod(self.written_shape) != self.source.numel:
            raise ValueError(
                f"{self.name}: shape {list(self.written_shape)} cannot hold the "
                f"{self.source.numel} elements of {list(self.source.shape)}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape if self.written_shape is None else self.written_shape

    @property
    def nbytes(self) -> int:
        return dtypes.dtype(self.dtype).nbytes(self.source.numel)

    @property
    def is_cast(self) -> bool:
        return self.dtype != self.source.dtype


# the metadata value types GGUF defines, spelled as its ``gguf_type`` names in lower case
TypedKind = Literal[
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float32", "float64", "bool", "string",
]  # fmt: skip
TypedScalar = int | float | bool | str


@dataclass(frozen=True)
class TypedMetadata:
    """One typed key/value for formats whose metadata is typed (GGUF): a scalar of ``kind``,
    or, when ``value`` is a tuple, an array of ``kind`` elements."""

    key: str
    kind: TypedKind
    value: TypedScalar | tuple[TypedScalar, ...]


@dataclass(frozen=True)
class WritePlan:
    """What to write: tensors in file order (aliases already removed) and string metadata.

    ``tree`` (``convert --all`` of a nested checkpoint) is the structure to restore: plain
    data (``typed_json``) with the plan's ``OutputTensor``s at its leaves, one tensor at
    several leaves where tied. None means a flat dict of ``tensors`` in order. Writers that
    store a pickle write it; the others find it as typed JSON in ``metadata``.

    ``typed_metadata`` is written by the GGUF writer only (a key there wins over the same
    key in ``metadata``); the other formats' metadata is strings."""

    tensors: tuple[OutputTensor, ...]
    metadata: dict[str, str]
    tree: Any = None
    typed_metadata: tuple[TypedMetadata, ...] = ()
