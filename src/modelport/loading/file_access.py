"""The pieces of ``safe_open``'s interface that ``ModelFile`` offers for every format: tensors
as numpy arrays or torch tensors, slices that read only the bytes they select, metadata.

Names follow ``safetensors.safe_open`` so that code written for it works unchanged:
``get_slice(name)[...]``, ``get_shape()``, ``get_dtype()`` (safetensors' dtype codes where the
type has one, torch's name otherwise) and ``metadata()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelport import dtypes
from modelport.errors import UnsupportedDtypeError, UsageError
from modelport.tensors import NDArray, TensorRef
from modelport.transfer.streaming import dequantize

if TYPE_CHECKING:
    import torch

FRAMEWORKS = {"np": "np", "numpy": "np", "pt": "pt", "torch": "pt"}
_SAFETENSORS_CODE_OF = {name: code for code, name in dtypes.SAFETENSORS_CODES.items()}


def framework_of(text: str) -> str:
    """``"np"`` or ``"pt"`` for the spellings safe_open takes; anything else is refused."""
    found = FRAMEWORKS.get(text)
    if found is None:
        raise UsageError(f"framework must be one of {', '.join(FRAMEWORKS)}; got {text!r}")
    return found


def tensor_value(ref: TensorRef, framework: str, device: str, *, dequantize_blocks: bool) -> Any:
    """The whole tensor: a read-only numpy view of the file, or a torch tensor on ``device``.

    GGML block-quantized tensors have no array type; ``dequantize_blocks`` gives their float32
    values, computed with gguf-py's reference dequantizer as ``convert --dequantize`` does."""
    if dtypes.dtype(ref.dtype).block is not None:
        if not dequantize_blocks:
            raise UnsupportedDtypeError(
                f"{ref.dtype} is a GGML block type with no array equivalent: pass "
                "dequantize=True for its float32 values"
            )
        values = dequantize(ref.raw_bytes(), ref.dtype).reshape(ref.shape)
        return values if framework == "np" else _torch_from(values, device)
    if framework == "np":
        return ref.numpy()
    return ref.torch(device)


def _torch_from(values: NDArray, device: str) -> torch.Tensor:
    import torch

    tensor = torch.from_numpy(values)
    return tensor.to(device) if device != "cpu" else tensor


class TensorSlice:
    """One tensor of an open file, read when indexed: ``safe_open``'s ``get_slice``.

    Indexing maps the file and copies out the selected elements only, so the pages that hold
    nothing selected are never read. Tensors not stored flat (a compressed zip member, an
    ONNX tensor split over files) are produced whole first, then indexed."""

    def __init__(self, name: str, ref: TensorRef, framework: str, device: str) -> None:
        self.name = name
        self._ref = ref
        self._framework = framework
        self._device = device

    def get_shape(self) -> list[int]:
        return list(self._ref.shape)

    def get_dtype(self) -> str:
        """safetensors' code (``F32``, ``BF16``) where it has one, else torch's (or GGML's) name."""
        return _SAFETENSORS_CODE_OF.get(self._ref.dtype, self._ref.dtype)

    def __getitem__(self, index: Any) -> Any:
        import numpy as np

        if self._framework == "np":
            return np.array(self._ref.numpy()[index])
        selected: torch.Tensor = self._ref.torch()[index].clone()
        return selected.to(self._device) if self._device != "cpu" else selected

    def __len__(self) -> int:
        if not self._ref.shape:
            raise TypeError("len() of a 0-d tensor")
        return self._ref.shape[0]

    def __repr__(self) -> str:
        return f"<TensorSlice {self.name} {self.get_dtype()}{self.get_shape()}>"


class FileMetadata(dict[str, Any]):
    """A file's metadata: a dict, and callable as ``safe_open``'s ``metadata()`` is, which
    gives ``None`` for a file that has none."""

    def __call__(self) -> dict[str, Any] | None:
        return dict(self) or None
