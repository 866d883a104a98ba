"""The frozen report ``inspect`` returns, and its JSON form (the contract of ``--json``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, init=False, unsafe_hash=True)
class TensorSummary:
    """One tensor as ``inspect`` lists it. Not frozen, as a report lists a million of them and a
    frozen dataclass's ``__init__`` costs four times a plain one's; nothing assigns to one once
    made, so it hashes by value as a frozen one does."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    note: str = ""  # what the reader knows beyond dtype and shape (quantized, saved without data)

    def __init__(
        self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, note: str = ""
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self.note = note

    def to_json(self) -> dict[str, Any]:
        found = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
        }
        return {**found, "note": self.note} if self.note else found


@dataclass(frozen=True)
class InspectReport:
    """What is in a model file. ``parameters`` counts the elements of every listed name (a
    tied tensor counts under each of its names, as ``state_dict`` lists it), a quantized
    layer's logical weight for its packed parts (``quantization``: scheme, bits, group size,
    its layers; None when nothing is quantized); ``bytes_by_dtype`` counts what is stored, so
    a tied tensor counts once. ``weights_only`` (torch files only): whether
    ``torch.load(weights_only=True)`` would load it, what it refuses, and the globals
    ``torch.serialization.add_safe_globals`` would need (None when it cannot be admitted)."""

    path: str
    format: str
    size_bytes: int
    parameters: int
    tensors: tuple[TensorSummary, ...]
    metadata: dict[str, Any]
    extras: Any
    aliases: tuple[tuple[str, ...], ...]
    warnings: tuple[str, ...]
    details: dict[str, Any]
    modules: dict[str, Any] | None
    weights_source: str
    weights_note: str
    code_files: tuple[str, ...]
    safety: dict[str, Any]  # the scanner's verdict and findings above info
    bytes_by_dtype: dict[str, int]
    quantization: dict[str, Any] | None = None
    weights_only: dict[str, Any] | None = None
    bytes_fetched: int | None = None  # an object behind a URL: the bytes read to inspect it

    def to_json(self, *, with_tensors: bool = True) -> dict[str, Any]:
        """The ``--json`` object; ``with_tensors=False`` leaves ``tensors`` an empty list, in
        its place, for a caller that writes a million of them itself, one at a time."""
        found = {
            "path": self.path,
            "format": self.format,
            "size_bytes": self.size_bytes,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "tensor_count": len(self.tensors),
            "bytes_by_dtype": self.bytes_by_dtype,
            "metadata": self.metadata,
            "extras": self.extras,
            "aliases": [list(group) for group in self.aliases],
            "warnings": list(self.warnings),
            "details": self.details,
            "modules": self.modules,
            "weights": {"source": self.weights_source, "note": self.weights_note},
            "code_files": list(self.code_files),
            "safety": self.safety,
            "weights_only": self.weights_only,
            "tensors": [t.to_json() for t in self.tensors] if with_tensors else [],
        }
        return (
            found if self.bytes_fetched is None else {**found, "bytes_fetched": self.bytes_fetched}
        )
