"""How far ``joblib.load`` skips after each array header, computed the way joblib does.

joblib writes an array's bytes right after the BUILD of its ``NumpyArrayWrapper``; its
unpickler reads them straight from the file (``NumpyArrayWrapper.read_array`` and
``read_mmap`` in joblib/numpy_pickle.py) and goes on with the opcodes after them:
- ``count`` is the product of ``shape`` (a tuple or list of ints; an empty shape is one
  element), whatever ``order`` says;
- ``dtype.hasobject``: the elements are a nested pickle, read by a fresh unpickler;
- otherwise, when the wrapper's state has ``numpy_array_alignment_bytes``, one byte gives a
  padding length and that many bytes follow; then ``count * dtype.itemsize`` bytes.
The dtype is numpy's own, rebuilt from ``numpy.dtype(spec, align, copy)`` and the BUILD
state numpy pickles with it. A spelling whose size cannot be known for certain stops the
scan (an ``error``): guessing would resynchronise inside data, where a crafted array can
hide the opcodes after it.
"""

from __future__ import annotations

import math
from typing import Any, Final

from modelport import dtypes
from modelport.errors import CorruptFileError
from modelport.pickles.interface import Value, fill
from modelport.pickles.policy import PASSED_ON
from modelport.pickles.symbols import Made, Symbol, Usage

WRAPPER_NAMES = frozenset(("NumpyArrayWrapper",))
# The classes whose BUILD the scan looks at, by name in any module: the array wrapper, and
# joblib < 0.10's, which names a side file.
BUILT_NAMES: Final = WRAPPER_NAMES | {"NDArrayWrapper"}
_MAX_RECORD_NESTING = 32
_NUMPY_DTYPE = frozenset((("numpy", "dtype"), ("numpy.core.multiarray", "dtype")))


def is_wrapper(origin: Any) -> bool:
    """Whether BUILD fills joblib's array wrapper. joblib tests the built object with
    isinstance, so any module path that resolves to the class counts: the name decides (and
    a name that is not text names no class)."""
    return (
        isinstance(origin, Symbol) and isinstance(origin.name, str) and origin.name in WRAPPER_NAMES
    )


# For each reconstructor that instantiates an argument: which arguments.
_INSTANTIATES: dict[tuple[str, str], tuple[int, ...]] = {
    key: indexes
    for key, uses in PASSED_ON.items()
    if (indexes := tuple(u.index for u in uses if u.usage is Usage.INSTANTIATED))
}


def classes_of(made: Made) -> list[Any]:
    """What an object BUILD fills may be an instance of: what was called or instantiated to
    make it, and each class a reconstructor instantiates with its arguments (copyreg's
    ``_reconstructor(cls, object, None)`` and ``__newobj__(cls)``, as pickle writes any
    object in protocols 0-2). joblib tests the object with isinstance, however it was made."""
    origin = made.origin
    key = origin.key if isinstance(origin, Symbol) else None
    indexes = _INSTANTIATES.get(key) if key is not None else None
    if not indexes:
        return [origin]
    args = made.args
    classes = [origin]
    for index in indexes:
        if index < len(args):
            classes.append(args[index])
    return classes


def wraps_arrays(classes: list[Any]) -> bool:
    """Whether a BUILD fills joblib's array wrapper, given ``classes_of`` its target."""
    return any(is_wrapper(cls) for cls in classes)


class ArrayLayout(Value):
    """What follows the wrapper's BUILD: a nested pickle, or padding and raw bytes."""

    FIELDS = ("holds_objects", "aligned", "nbytes")
    __slots__ = FIELDS
    holds_objects: bool
    aligned: bool
    nbytes: int

    def __init__(self, holds_objects: bool, aligned: bool, nbytes: int) -> None:
        fill(self, holds_objects=holds_objects, aligned=aligned, nbytes=nbytes)


def layout_of(state: Any) -> ArrayLayout:
    if not isinstance(state, dict):
        raise _unknown("its state is not a dict")
    shape = state.get("shape")
    if not isinstance(shape, (tuple, list)) or not all(type(n) is int and n >= 0 for n in shape):
        raise _unknown(f"its shape is {type(shape).__name__}, not a list of sizes")
    itemsize, holds_objects = _dtype_size(state.get("dtype"))
    aligned = state.get("numpy_array_alignment_bytes") is not None
    return ArrayLayout(holds_objects, aligned, math.prod(shape) * itemsize)


def _dtype_size(dtype: Any, depth: int = 0) -> tuple[int, bool]:
    """(itemsize, holds objects) of a pickled ``numpy.dtype``."""
    if depth > _MAX_RECORD_NESTING:
        raise _unknown("its record dtype nests too deep")
    if not isinstance(dtype, Made) or not isinstance(dtype.origin, Symbol):
        raise _unknown("its dtype is not a numpy dtype")
    if dtype.origin.key not in _NUMPY_DTYPE or not dtype.args:
        raise _unknown(f"its dtype is made by {dtype.origin.path}")
    spec = dtype.args[0]
    if not isinstance(spec, str):
        raise _unknown("its dtype is not spelled as text")
    kind, itemsize, holds_objects = _parse_spec(spec)
    for state in dtype.states:
        itemsize, holds_objects = _apply_state(kind, state, itemsize, holds_objects, depth)
    return itemsize, holds_objects


# The spellings numpy pickles for plain dtypes (``kind`` + itemsize), read without importing
# numpy, which costs a scanning process a quarter of a second: (kind, itemsize).
_PLAIN_SPECS: Final = {
    **{code: (code[0], int(code[1:])) for code in dtypes.NUMPY_CODES},
    "O8": ("O", 8),
}


def _parse_spec(spec: str) -> tuple[str, int, bool]:
    """(kind, itemsize, holds objects) of a dtype spelling, as ``numpy.dtype`` reads it."""
    plain = _PLAIN_SPECS.get(spec)
    if plain is not None:
        return plain[0], plain[1], plain[0] == "O"
    import numpy as np  # numpy's own parser: the spelling means what it means to joblib

    try:
        parsed = np.dtype(spec)
    except (TypeError, ValueError) as exc:
        raise _unknown(f"numpy rejects its dtype {spec!r}") from exc
    return parsed.kind, parsed.itemsize, bool(parsed.hasobject)


def _apply_state(
    kind: str, state: Any, itemsize: int, holds_objects: bool, depth: int
) -> tuple[int, bool]:
    """numpy's dtype ``__setstate__``: (version, byteorder, subarray, names, fields, elsize,
    alignment, flags[, metadata]); flexible dtypes take their size from ``elsize``. numpy
    takes the flags word as given, and its bit 0 is ``hasobject``, which decides whether
    joblib reads the bytes as a pickle; numpy versions differ on whether a spelling's own
    kind or the word wins, so a word that disagrees with the spelling is refused, as is any
    value numpy reads differently from what is modelled here."""
    if not isinstance(state, tuple) or len(state) not in (8, 9):
        raise _unknown("its dtype state is not numpy's")
    version, order, subarray, names, fields, elsize, alignment, flags = state[:8]
    if type(version) is not int or not 0 <= version <= _HIGHEST_DTYPE_STATE:
        raise _unknown(f"its dtype state has version {version!r}")
    if not (isinstance(order, str) and order in _BYTE_ORDERS) or type(alignment) is not int:
        raise _unknown("its dtype state's byte order or alignment is not numpy's")
    if subarray is not None:
        raise _unknown("its dtype is a subarray")
    if type(elsize) is not int or (elsize < 0 and kind in "SUV"):
        raise _unknown("its dtype state gives no element size")
    if names is None and fields is None:
        if kind in "SUV":
            itemsize = elsize
    else:
        if kind != "V" or not isinstance(fields, dict) or elsize <= 0:
            raise _unknown("its record dtype is not numpy's")
        for value in fields.values():
            field_dtype = value[0] if isinstance(value, tuple) and value else None
            _, field_objects = _dtype_size(field_dtype, depth + 1)
            holds_objects = holds_objects or field_objects
        itemsize = elsize
    if _object_bit(flags) != holds_objects:
        raise _unknown(
            f"its dtype state's flags {flags!r} say the elements are "
            f"{'' if holds_objects else 'not '}plain data, its spelling says otherwise"
        )
    return itemsize, holds_objects


_HIGHEST_DTYPE_STATE = 4  # numpy refuses a later version of its dtype state
_BYTE_ORDERS: Final = frozenset("<>|=")


def _object_bit(flags: Any) -> bool:
    """numpy's ``hasobject`` from a pickled flags word: a signed char's value in -128..-1 is
    read as that plus 128 (an old numpy pickled the flags as a char); a word outside a byte
    is refused."""
    if type(flags) is not int:
        raise _unknown("its dtype state's flags are not a number")
    if -128 <= flags < 0:
        flags += 128
    if not 0 <= flags <= 0xFF:
        raise _unknown(f"its dtype state's flags {flags} do not fit numpy's")
    return bool(flags & 0x01)


def _unknown(why: str) -> CorruptFileError:
    return CorruptFileError(
        f"joblib array header whose byte count cannot be known: {why}; joblib would skip "
        "bytes modelport cannot place, so the rest of the stream is not analysed"
    )
