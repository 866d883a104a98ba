"""What a writer is asked to write: the tensors in file order, each with the dtype it is stored
as, and the file's metadata. The formats' writers take it and the byte movers stream it, so
it lives below both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelport import dtypes
from modelport.tensors import TensorRef


@dataclass(frozen=True)
class OutputTensor:
    """One tensor as a writer will store it: its name, the dtype written, and its source."""

    name: str
    dtype: str
    source: TensorRef

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return dtypes.dtype(self.dtype).nbytes(self.source.numel)

    @property
    def is_cast(self) -> bool:
        return self.dtype != self.source.dtype


@dataclass(frozen=True)
class WritePlan:
    """What to write: tensors in file order (aliases already removed) and string metadata.

    ``tree`` (``convert --all`` of a nested checkpoint) is the structure to restore: plain
    data (``typed_json``) with the plan's ``OutputTensor``s at its leaves, one tensor at
    several leaves where tied. None means a flat dict of ``tensors`` in order. Writers that
    store a pickle write it; the others find it as typed JSON in ``metadata``."""

    tensors: tuple[OutputTensor, ...]
    metadata: dict[str, str]
    tree: Any = None
