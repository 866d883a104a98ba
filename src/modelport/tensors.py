"""Lazy tensor references: where a tensor's bytes lie, never the bytes themselves.

A ``Storage`` is a run of bytes in one file (or, for data that is not stored plainly, a
callable that produces it). A ``TensorRef`` is a typed, shaped, possibly strided view of a
storage. Reading one maps the file (``numpy.memmap``, copy-on-write) and returns a view at
the stored offset, so opening a file costs the same whatever its size, and two tensors that
share a storage share memory exactly as they did when they were saved.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from modelport import dtypes
from modelport.errors import CorruptFileError, MissingDependencyError, UnsupportedDtypeError

if TYPE_CHECKING:
    from typing import Any

    import numpy as np
    import torch

# A string at run time, so that importing this module (every format does) imports no numpy:
# numpy loads when a tensor's bytes are first read.
NDArray: TypeAlias = "np.ndarray[Any, np.dtype[Any]]"


# Storage and TensorRef have their own ``__init__`` and are not frozen: a file of a million
# tensors builds a million of each, and a frozen dataclass's ``object.__setattr__`` per field
# would make that four times slower. Nothing assigns to one once it is made; equality and
# hashing are by identity (``eq=False``), so sharing one stays safe.
@dataclass(eq=False, slots=True, init=False)
class Storage:
    """``nbytes`` bytes at ``offset`` in ``path``, or produced by ``reader`` when not stored flat.

    Identity matters: tensors that hold the same ``Storage`` object share memory (tied weights,
    views). ``key`` names the storage inside its container (a zip record, a safetensors tensor).
    """

    path: Path | None
    offset: int
    nbytes: int
    key: str = ""
    reader: Callable[[], NDArray] | None = None  # returns a 1-d uint8 array of nbytes
    location: str = ""  # the device torch saved it from ("cuda:0"); "" if not recorded

    def __init__(
        self,
        path: Path | None,
        offset: int,
        nbytes: int,
        key: str = "",
        reader: Callable[[], NDArray] | None = None,
        location: str = "",
    ) -> None:
        self.path = path
        self.offset = offset
        self.nbytes = nbytes
        self.key = key
        self.reader = reader
        self.location = location

    def bytes_view(self) -> NDArray:
        """The storage as a 1-d uint8 array: a memory map when the bytes lie flat in a file."""
        import numpy as np

        if self.reader is not None:
            data = self.reader()
            if data.nbytes != self.nbytes:
                raise CorruptFileError(
                    f"storage {self.key!r} produced {data.nbytes} bytes, expected {self.nbytes}",
                    path=self.path,
                )
            return data.reshape(-1).view(np.uint8)
        if self.nbytes == 0 or self.path is None:
            return np.zeros(0, dtype=np.uint8)
        mapped: NDArray = np.memmap(
            self.path, dtype=np.uint8, mode="c", offset=self.offset, shape=(self.nbytes,)
        )
        return mapped


@dataclass(eq=False, slots=True, init=False)
class TensorRef:
    """A tensor as the file describes it: dtype, shape and where its elements lie.

    ``element_offset`` and ``strides`` (in elements, torch's convention) place the tensor inside
    its storage; ``strides=None`` means C-contiguous. ``storage=None`` marks a tensor saved
    without data (torch's meta tensors).
    """

    dtype: str
    shape: tuple[int, ...]
    storage: Storage | None
    element_offset: int = 0
    strides: tuple[int, ...] | None = None
    note: str = ""
    nbytes: int = field(init=False)

    def __init__(
        self,
        dtype: str,
        shape: tuple[int, ...],
        storage: Storage | None,
        element_offset: int = 0,
        strides: tuple[int, ...] | None = None,
        note: str = "",
    ) -> None:
        self.dtype = dtype
        self.shape = shape
        self.storage = storage
        self.element_offset = element_offset
        self.strides = strides
        self.note = note
        itemsize = _ITEMSIZES.get(dtype)
        if itemsize is not None:
            self.nbytes = itemsize * math.prod(shape)
        else:  # block-quantized, or unknown: the lookup that names it in its error
            self.nbytes = dtypes.dtype(dtype).nbytes(math.prod(shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_contiguous(self) -> bool:
        return self.strides is None or self.strides == contiguous_strides(self.shape)

    def byte_range(self) -> tuple[int, int] | None:
        """(file offset, length) of a contiguous tensor stored flat in its file; else None."""
        st = self.storage
        if st is None or st.reader is not None or not self.is_contiguous:
            return None
        itemsize = dtypes.dtype(self.dtype).itemsize
        return st.offset + self.element_offset * itemsize, self.nbytes

    def byte_start(self) -> int:
        """Where the tensor's first element lies: a file offset for storages stored flat."""
        offset = self.storage.offset if self.storage is not None else 0
        return offset + self.element_offset * dtypes.dtype(self.dtype).itemsize

    def numpy(self) -> NDArray:
        """A read-only, zero-copy numpy view (bfloat16 and float8 as ``ml_dtypes`` types)."""
        array = self._view()
        array.flags.writeable = False
        return array

    def torch(self, device: str = "cpu") -> torch.Tensor:
        """A torch tensor over the same memory (copy-on-write map), moved to ``device``."""
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("torch", "torch", "Making torch tensors") from None
        import numpy as np

        if self.storage is None:
            return torch.empty(self.shape, dtype=getattr(torch, self.dtype), device="meta")
        array = self._view()
        if not array.flags.writeable:  # storages read from memory; torch warns on read-only
            array = array.copy()
        torch_dtype = getattr(torch, self.dtype)
        if array.dtype.type.__module__.startswith("ml_dtypes"):
            # torch cannot import ml_dtypes arrays: reinterpret same-width integers instead.
            carrier = {1: np.uint8, 2: np.int16, 4: np.int32}[array.dtype.itemsize]
            tensor = torch.from_numpy(array.view(carrier)).view(torch_dtype)
        else:
            tensor = torch.from_numpy(array)
        return tensor.to(device) if device != "cpu" else tensor

    def _view(self) -> NDArray:
        import numpy as np
        from numpy.lib.stride_tricks import as_strided

        info = dtypes.dtype(self.dtype)
        if info.numpy is None or self.dtype.startswith(("q", "float4")):
            raise UnsupportedDtypeError(
                f"{self.dtype} tensors have no numpy equivalent; read their raw bytes with "
                "raw_bytes() or convert them with --dequantize"
            )
        if self.storage is None:
            raise UnsupportedDtypeError("this tensor was saved without data (a meta tensor)")
        raw = self.storage.bytes_view()
        usable = raw.nbytes - raw.nbytes % info.itemsize
        flat = raw[:usable].view(info.numpy)
        if self.numel == 0:
            return np.zeros(self.shape, dtype=info.numpy)
        if self.strides is None:
            end = self.element_offset + self.numel
            _check_extent(end, flat.size, self)
            return flat[self.element_offset : end].reshape(self.shape)
        last = self.element_offset + sum(
            (n - 1) * s for n, s in zip(self.shape, self.strides, strict=True)
        )
        _check_extent(last + 1, flat.size, self)
        base = flat[self.element_offset :]
        byte_strides = tuple(s * info.itemsize for s in self.strides)
        return as_strided(base, shape=self.shape, strides=byte_strides, writeable=True)

    def raw_bytes(self) -> NDArray:
        """The tensor's stored bytes as uint8 (for contiguous tensors and quantized blocks)."""
        import numpy as np

        if self.storage is None:
            return np.zeros(0, dtype=np.uint8)
        itemsize = dtypes.dtype(self.dtype).itemsize
        start = self.element_offset * itemsize
        raw = self.storage.bytes_view()
        if not self.is_contiguous:
            return np.ascontiguousarray(self._view()).reshape(-1).view(np.uint8)
        if start + self.nbytes > raw.nbytes:
            raise CorruptFileError(f"tensor of {self.nbytes} bytes runs past its storage")
        return raw[start : start + self.nbytes]


# Each plain dtype's bytes per element, looked up once: a file of a million tensors builds a
# million references, so their construction is kept to a dict lookup and one product.
_ITEMSIZES: dict[str, int] = {
    name: d.itemsize for name, d in dtypes.DTYPES.items() if d.block is None
}


def byte_array(data: bytes | bytearray | memoryview) -> NDArray:
    """``data`` as a 1-d uint8 array without copying: what a ``Storage.reader`` returns for
    bytes already in memory (numpy is imported here, when the bytes are read)."""
    import numpy as np

    return np.frombuffer(data, np.uint8)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _check_extent(end: int, available: int, tensor: TensorRef) -> None:
    if end > available or tensor.element_offset < 0:
        raise CorruptFileError(
            f"tensor of shape {list(tensor.shape)} reaches element {end} of a storage "
            f"holding {available}"
        )


@contextmanager
def collector_paused() -> Iterator[None]:
    """A file of a million tensors makes millions of small objects that form no cycles;
    Python's cycle collector would walk them again and again (a third of reading such a
    header), for nothing it could free."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
