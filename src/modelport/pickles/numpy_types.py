"""modelport's own versions of what numpy pickles call to rebuild arrays, dtypes and scalars.

``numpy.dtype`` and ``numpy.ndarray`` objects arrive in two steps (a REDUCE that makes an
empty object, then a BUILD with its state), so the builders here are mutable holders that
BUILD fills in place, exactly as the memo expects. Raw array bytes become a ``Storage`` at
their offset in the file when the pickle lies flat in one, so arrays stay lazy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from modelport import dtypes
from modelport.errors import CorruptFileError, UnsupportedDtypeError
from modelport.pickles.records import ByteSpan
from modelport.tensors import Storage, TensorRef

if TYPE_CHECKING:
    import numpy as np

_SIMPLE_DTYPE = re.compile(r"^[<>|=]?[biufcV?][0-9]{0,2}$")
_BYTE_ORDERS = {"<", ">", "|", "="}

SpanResolver = Callable[[ByteSpan | bytes | bytearray], Storage]


class NumpyDType:
    """A ``numpy.dtype`` being rebuilt; only plain numeric and bool types ever become real."""

    def __init__(self, spec: Any, *_: Any) -> None:
        if not isinstance(spec, str):
            raise CorruptFileError("numpy pickle: dtype spec must be a string")
        self.spec = spec
        self.byteorder = "|"
        self.structured = False

    def setstate(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in _BYTE_ORDERS:
            self.byteorder = state[1]
            if len(state) >= 5 and (state[3] is not None or state[4] is not None):
                self.structured = True  # named fields: left as a record

    def resolve(self) -> np.dtype[Any] | None:
        """The numpy dtype, or None when it is not a plain element type (objects, records).
        numpy is imported here: only a pickle that holds numpy arrays or scalars needs it."""
        if self.structured or not _SIMPLE_DTYPE.match(self.spec):
            return None
        import numpy as np

        try:
            plain = np.dtype(self.spec)
        except TypeError:
            return None
        return plain.newbyteorder(">" if self.byteorder == ">" else "<")

    def __repr__(self) -> str:
        return f"<numpy dtype {self.byteorder}{self.spec}>"


class NumpyArray:
    """An ``ndarray`` being rebuilt. After BUILD it holds a ``TensorRef`` or, for object
    arrays, the list of objects the pickle stored. Equal only to itself."""

    def __init__(
        self,
        tensor: TensorRef | None = None,
        objects: list[Any] | None = None,
        shape: tuple[int, ...] = (),
        dtype_text: str = "",
    ) -> None:
        self.tensor = tensor
        self.objects = objects
        self.shape = shape
        self.dtype_text = dtype_text

    def __repr__(self) -> str:
        return f"<numpy array {self.dtype_text}{list(self.shape)}>"


def tensor_from_raw(
    raw: Any,
    np_dtype: np.dtype[Any],
    shape: tuple[int, ...],
    fortran: bool,
    storage_of: SpanResolver,
) -> TensorRef:
    if np_dtype.byteorder == ">":
        raise UnsupportedDtypeError("big-endian numpy arrays are not supported yet")
    name = dtypes.from_numpy(np_dtype.newbyteorder("<") if np_dtype.byteorder == "=" else np_dtype)
    if isinstance(raw, str):  # Python 2's str: numpy reads it with encoding="latin1"
        try:
            raw = raw.encode("latin-1")
        except UnicodeEncodeError:
            raise CorruptFileError("numpy pickle: array data is text beyond latin-1") from None
    if not isinstance(raw, (bytes, bytearray, ByteSpan)):
        raise CorruptFileError("numpy pickle: array data must be bytes")
    storage = storage_of(raw)
    numel = 1
    for n in shape:
        numel *= n
    if storage.nbytes != numel * np_dtype.itemsize:
        raise CorruptFileError(
            f"numpy pickle: array of shape {list(shape)} needs {numel * np_dtype.itemsize} "
            f"bytes, the pickle holds {storage.nbytes}"
        )
    strides = None
    if fortran and len(shape) > 1:
        acc, fstrides = 1, []
        for n in shape:
            fstrides.append(acc)
            acc *= n
        strides = tuple(fstrides)
    return TensorRef(name, shape, storage, 0, strides)


def build_array(array: NumpyArray, state: Any, storage_of: SpanResolver) -> NumpyArray:
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise CorruptFileError("numpy pickle: unexpected ndarray state")
    _, shape, dtype, fortran, raw = state if len(state) == 5 else (1, *state)
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise CorruptFileError("numpy pickle: array shape must be a tuple of ints")
    array.shape = shape
    if not isinstance(dtype, NumpyDType):
        raise CorruptFileError("numpy pickle: array dtype is not a numpy dtype")
    array.dtype_text = dtype.spec
    resolved = dtype.resolve()
    if resolved is None:
        array.objects = list(raw) if isinstance(raw, list) else None
        return array
    array.tensor = tensor_from_raw(raw, resolved, shape, bool(fortran), storage_of)
    return array


def reconstruct(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> NumpyArray:
    return NumpyArray()


def scalar(dtype: Any, raw: Any = None) -> Any:
    """``numpy.core.multiarray.scalar``: a numeric scalar becomes the Python number it holds
    (its bytes as Python 2 wrote them, a ``str`` numpy reads with ``encoding="latin1"``)."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("latin-1")
        except UnicodeEncodeError:
            return NumpyScalar(dtype, raw)
    if isinstance(dtype, NumpyDType):
        resolved = dtype.resolve()
        if (
            resolved is not None
            and isinstance(raw, (bytes, bytearray))
            and len(raw) == resolved.itemsize
        ):
            import numpy as np

            return np.frombuffer(bytes(raw), dtype=resolved)[0].item()
    return NumpyScalar(dtype, raw)


class NumpyScalar:
    """A numpy scalar of a type that is not plain numeric (kept as a record), equal only to
    itself."""

    def __init__(self, dtype: Any, raw: Any) -> None:
        self.dtype = dtype
        self.raw = raw

    def __repr__(self) -> str:
        return f"NumpyScalar(dtype={self.dtype!r}, raw={self.raw!r})"


def frombuffer(
    buffer: Any, dtype: Any, shape: Any, order: Any, storage_of: SpanResolver
) -> NumpyArray:
    """``numpy.core.numeric._frombuffer``: protocol-5 arrays with their bytes in-band."""
    array = NumpyArray()
    if isinstance(dtype, NumpyDType) and isinstance(shape, tuple):
        resolved = dtype.resolve()
        array.shape = shape
        array.dtype_text = dtype.spec
        if resolved is not None:
            array.tensor = tensor_from_raw(buffer, resolved, shape, order == "F", storage_of)
    return array
