"""modelport's own versions of the torch functions that torch pickles call to rebuild tensors.

Each function takes the arguments torch's ``torch._utils._rebuild_*`` would take and returns
a ``TensorRef`` describing the tensor, after checking the arguments are plain data. None of
them imports torch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from modelport import dtypes
from modelport.errors import CorruptFileError
from modelport.pickles.interface import Value, fill
from modelport.tensors import Storage, TensorRef, contiguous_strides


class TorchDType(Value):
    """``torch.float32`` and friends, as a pickle names them."""

    FIELDS = ("name",)
    __slots__ = FIELDS
    name: str

    def __init__(self, name: str) -> None:
        fill(self, name=name)

    def __str__(self) -> str:
        return f"torch.{self.name}"


class TorchConstant(Value):
    """``torch.sparse_coo``, ``torch.channels_last``, ``torch.per_tensor_affine``: named values."""

    FIELDS = ("name",)
    __slots__ = FIELDS
    name: str

    def __init__(self, name: str) -> None:
        fill(self, name=name)

    def __str__(self) -> str:
        return f"torch.{self.name}"


class StorageType(Value):
    """``torch.FloatStorage`` and friends: tells the dtype of a persistent storage id."""

    FIELDS = ("dtype",)
    __slots__ = FIELDS
    dtype: str

    def __init__(self, dtype: str) -> None:
        fill(self, dtype=dtype)


class TypedStorage(Value):
    """A storage resolved from a persistent id, with the element type it was saved as."""

    FIELDS = ("storage", "dtype", "numel", "location")
    __slots__ = FIELDS
    storage: Storage
    dtype: str
    numel: int
    location: str

    def __init__(self, storage: Storage, dtype: str, numel: int, location: str) -> None:
        fill(self, storage=storage, dtype=dtype, numel=numel, location=location)


class TorchDevice(Value):
    """``torch.device('cuda:0')``: kept as text; reading never needs the device."""

    FIELDS = ("spec",)
    __slots__ = FIELDS
    spec: str

    def __init__(self, spec: str) -> None:
        fill(self, spec=spec)

    def __str__(self) -> str:
        return self.spec


class SparseTensor:
    """A sparse tensor saved by ``_rebuild_sparse_tensor``: its dense parts are ordinary
    tensors. Equal only to itself."""

    def __init__(self, layout: str, parts: dict[str, Any]) -> None:
        self.layout = layout
        self.parts = parts

    def __repr__(self) -> str:
        return f"SparseTensor(layout={self.layout!r}, parts={self.parts!r})"


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CorruptFileError(f"torch pickle: {what} must be a tuple of non-negative ints")
    return tuple(value)


def _typed(storage: Any) -> TypedStorage:
    if not isinstance(storage, TypedStorage):
        raise CorruptFileError(f"torch pickle: expected a storage, got {type(storage).__name__}")
    return storage


def tensor_from_storage(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None
) -> TensorRef:
    typed = _typed(storage)
    shape = _ints(size, "size")
    strides = _ints(stride, "stride") if stride is not None else contiguous_strides(shape)
    if not isinstance(offset, int) or offset < 0:
        raise CorruptFileError("torch pickle: storage offset must be a non-negative int")
    elem_dtype = dtype or typed.dtype
    if len(strides) != len(shape):
        raise CorruptFileError("torch pickle: size and stride differ in length")
    numel = 1
    for n in shape:
        numel *= n
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        capacity = typed.storage.nbytes // dtypes.dtype(elem_dtype).itemsize
        if last >= capacity:
            raise CorruptFileError(
                f"torch pickle: tensor of shape {list(shape)} reaches element {last} of a "
                f"storage holding {capacity}"
            )
    return TensorRef(
        elem_dtype,
        shape,
        typed.storage,
        offset,
        None if strides == contiguous_strides(shape) else strides,
    )


def rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    return tensor_from_storage(storage, offset, size, stride)


def rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any
) -> TensorRef:
    return tensor_from_storage(storage, offset, size, stride)


def rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: Any,
    *_: Any,
) -> TensorRef:
    name = dtype.name if isinstance(dtype, TorchDType) else None
    return tensor_from_storage(storage, offset, size, stride, name)


def rebuild_parameter(data: Any, *_: Any) -> Any:
    """An ``nn.Parameter`` reads as the tensor it wraps (a state_dict holds tensors)."""
    return data


def rebuild_qtensor(
    storage: Any, offset: Any, size: Any, stride: Any, quantizer: Any, *_: Any
) -> TensorRef:
    tensor = tensor_from_storage(storage, offset, size, stride)
    return replace(tensor, note=f"quantized ({_describe_quantizer(quantizer)})")


def _describe_quantizer(params: Any) -> str:
    if isinstance(params, tuple) and params:
        return str(params[0])
    return "unknown scheme"


def rebuild_meta_tensor(
    dtype: Any, size: Any, stride: Any, requires_grad: Any = False
) -> TensorRef:
    name = dtype.name if isinstance(dtype, TorchDType) else "float32"
    return TensorRef(name, _ints(size, "size"), None, note="saved without data (meta)")


def rebuild_from_numpy(data: Any, dtype: Any, device: Any, requires_grad: Any) -> Any:
    return data


def rebuild_sparse_tensor(layout: Any, data: Any) -> SparseTensor:
    parts: dict[str, Any] = {}
    names = (
        ("indices", "values", "size")
        if len(data) == 3
        else ("crow_indices", "col_indices", "values", "size")
    )
    if isinstance(data, tuple):
        parts = dict(zip(names, data, strict=False))
    return SparseTensor(str(layout), parts)


def torch_size(values: Any = ()) -> tuple[int, ...]:
    return _ints(values, "torch.Size")


def torch_device(spec: Any, index: Any = None) -> TorchDevice:
    if not isinstance(spec, str):
        raise CorruptFileError("torch pickle: torch.device() takes a string")
    return TorchDevice(spec if index is None else f"{spec}:{index}")
