"""The ``.npy`` header (numpy/lib/format.py, NEP 1; the layout is in ``npy``'s docstring):
the magic string, the version, the header length and the Python-literal dict, parsed with
``ast.literal_eval`` after every length is checked. Shared by the ``.npy`` and ``.npz``
readers and by the scanner, which reads the headers of every ``.npy`` it meets (an object
array's data is a pickle) without the readers themselves."""

from __future__ import annotations

import ast
import functools
import io
import math
import re
import struct
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    TruncatedFileError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)

MAGIC = b"\x93NUMPY"
VERSIONS = {(1, 0): 2, (2, 0): 4, (3, 0): 4}  # version -> width of the header length field
MAX_PREFIX = len(MAGIC) + 2 + 4 + limits.MAX_NPY_HEADER  # the most bytes a header can span
KEYS = {"descr", "fortran_order", "shape"}
OBJECT_WARNING = "object array: contents are a pickle (read without executing anything)"

_DESCR = re.compile(r"^[<>|=]?[biufcVO?][0-9]{0,3}$")
# The header as numpy writes it for a plain dtype (``_wrap_header``: the keys sorted, each
# value's repr, a trailing comma). Matching it gives the dict ``ast.literal_eval`` would at a
# fraction of the cost; anything else (records, other spellings) is evaluated in full.
# Integers are bounded so the two paths agree on every value Python would accept.
_NUMBER = r"(?:0|[1-9][0-9]{0,17})"
_NUMPY_LAYOUT = re.compile(
    r"\{'descr': '([<>|=]?[A-Za-z0-9\[\]]{1,24})', 'fortran_order': (True|False), "
    rf"'shape': \((|{_NUMBER},|{_NUMBER}(?:, {_NUMBER})+)\), \}}"
)
_VOID_CARRIERS = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


@dataclass(frozen=True)
class NpyHeader:
    """A parsed ``.npy`` header; ``data_offset`` counts from the start of the ``.npy``."""

    version: tuple[int, int]
    descr: str
    fortran_order: bool
    shape: tuple[int, ...]
    data_offset: int
    dtype: str | None  # modelport dtype; None for object arrays
    itemsize: int
    byteswapped: bool  # stored big-endian
    warning: str = ""

    @property
    def is_object(self) -> bool:
        return self.dtype is None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def strides(self) -> tuple[int, ...] | None:
        """Element strides of a Fortran-ordered array; None for C order."""
        if not self.fortran_order or len(self.shape) < 2:
            return None
        strides, step = [], 1
        for size in self.shape:
            strides.append(step)
            step *= max(size, 1)
        return tuple(strides)


def header_padding(prefix: bytes) -> int:
    """Bytes after the header dict up to the data: the newline padding npy headers carry."""
    end = prefix.find(b"}") + 1
    newline = prefix.find(b"\n", end)
    return newline + 1 - end if newline >= 0 else 0


def parse_header(prefix: bytes, *, path: Path, where: str = "", available: int = -1) -> NpyHeader:
    """Parse the header at the start of ``prefix`` (the first ``MAX_PREFIX`` bytes or all of
    a shorter file); ``available`` is the size of the whole ``.npy`` for error messages."""
    label = f"npy{where}"
    version, fields, data_offset = _header_fields(prefix, label, path, available)
    descr, fortran, shape = fields["descr"], fields["fortran_order"], fields["shape"]
    if not isinstance(fortran, bool):
        raise CorruptFileError(f"{label}: fortran_order must be True or False", path=path)
    if (
        not isinstance(shape, tuple)
        or len(shape) > limits.MAX_RANK
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise CorruptFileError(
            f"{label}: shape must be a tuple of at most {limits.MAX_RANK} non-negative ints",
            path=path,
        )
    dtype, itemsize, swapped, warning = _element_type(descr, label, path)
    return NpyHeader(version, descr, fortran, shape, data_offset, dtype, itemsize, swapped, warning)


def _header_fields(
    prefix: bytes, label: str, path: Path, available: int
) -> tuple[tuple[int, int], dict[str, Any], int]:
    """(version, the header dict, where the data begins), every length checked."""
    total = len(prefix) if available < 0 else available
    if len(prefix) < len(MAGIC) + 2 or not prefix.startswith(MAGIC):
        if prefix.startswith(MAGIC) or MAGIC.startswith(prefix):
            raise_truncated(f"{label} header", len(MAGIC) + 2, total, path)
        raise CorruptFileError(f"{label}: not a .npy (bad magic)", path=path)
    version = (prefix[6], prefix[7])
    width = VERSIONS.get(version)
    if width is None:
        raise UnsupportedVersionError(
            f"{label} format version {version[0]}.{version[1]} is not supported (1.0-3.0 are)",
            path=path,
        )
    start = len(MAGIC) + 2 + width
    if len(prefix) < start:
        raise_truncated(f"{label} header length", start, total, path)
    (length,) = struct.unpack_from("<H" if width == 2 else "<I", prefix, 8)
    if length > limits.MAX_NPY_HEADER:
        raise LimitExceededError(f"{label} header length", limits.MAX_NPY_HEADER, length, path=path)
    if len(prefix) < start + length:
        raise_truncated(f"{label} header", start + length, total, path)
    text = prefix[start : start + length].decode(
        "utf-8" if version == (3, 0) else "latin-1", "replace"
    )
    return version, _literal(text, label, path), start + length


def object_data_offset(
    prefix: bytes, *, path: Path, where: str = "", available: int = -1
) -> int | None:
    """Where the pickle of an array whose dtype holds objects begins, or None when it holds
    none. ``descr`` is evaluated as ``numpy.load`` evaluates it (``descr_to_dtype``), so every
    spelling numpy accepts counts: ``'O'``, ``'object'``, a record with an object field."""
    label = f"npy{where}"
    _, fields, data_offset = _header_fields(prefix, label, path, available)
    descr = fields["descr"]
    try:
        holds = _holds_objects(descr) if type(descr) is str else _descr_holds_objects(descr)
    except (TypeError, ValueError, KeyError, IndexError, RecursionError) as exc:
        raise CorruptFileError(f"{label}: numpy rejects its dtype ({exc})", path=path) from None
    return data_offset if holds else None


def _descr_holds_objects(descr: Any) -> bool:
    from numpy.lib import format as numpy_format

    return bool(numpy_format.descr_to_dtype(descr).hasobject)


# A million-member npz repeats a handful of dtypes: numpy's verdict is kept per spelling
# (a raised error is not kept, so it is raised again, the same, for the next member).
_holds_objects = functools.lru_cache(maxsize=256)(_descr_holds_objects)


def raise_truncated(what: str, expected: int, actual: int, path: Path) -> None:
    raise TruncatedFileError(
        f"{what} needs {expected} bytes, only {actual} are there (truncated download?)",
        expected=expected,
        actual=actual,
        path=path,
    )


def _python2_literal(text: str, label: str, path: Path) -> Any:
    """The header with the ``L`` after each integer dropped, as numpy reads headers of version
    1.0 and 2.0 that Python 2 wrote; anything else that does not parse is corrupt."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text.strip()).readline))
        kept = [
            token
            for before, token in zip([None, *tokens], tokens, strict=False)
            if not (
                token.type == tokenize.NAME
                and token.string == "L"
                and before is not None
                and before.type == tokenize.NUMBER
            )
        ]
        return ast.literal_eval(tokenize.untokenize(kept))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, tokenize.TokenError):
        raise CorruptFileError(f"{label}: header is not a Python literal", path=path) from None


def fast_fields(text: str) -> dict[str, Any] | None:
    """The header dict when ``text`` (stripped) is laid out as numpy writes it; None otherwise."""
    parts = _numpy_layout_parts(text)
    if parts is None:
        return None
    descr, fortran, shape = parts
    return {"descr": descr, "fortran_order": fortran, "shape": shape}


@functools.lru_cache(maxsize=1024)  # members of one dtype and shape share one header text
def _numpy_layout_parts(text: str) -> tuple[str, bool, tuple[int, ...]] | None:
    found = _NUMPY_LAYOUT.fullmatch(text)
    if found is None:
        return None
    descr, fortran, shape = found.groups()
    return descr, fortran == "True", tuple(int(n) for n in shape.split(",") if n)


def _literal(text: str, label: str, path: Path) -> dict[str, Any]:
    text = text.strip()
    fast = fast_fields(text)
    if fast is not None:
        return fast
    try:
        fields = ast.literal_eval(text)
    except SyntaxError:  # Python 2 wrote longs with an L (``'shape': (2L, 3L)``): numpy reads it
        fields = _python2_literal(text, label, path)
    except (ValueError, TypeError, MemoryError, RecursionError):
        raise CorruptFileError(f"{label}: header is not a Python literal", path=path) from None
    if not isinstance(fields, dict) or set(fields) != KEYS:
        raise CorruptFileError(
            f"{label}: header must be a dict with exactly the keys {sorted(KEYS)}", path=path
        )
    return fields


def _element_type(descr: Any, label: str, path: Path) -> tuple[str | None, int, bool, str]:
    """(modelport dtype or None for objects, itemsize, big-endian, warning)."""
    if isinstance(descr, list):
        raise UnsupportedDtypeError(
            f"{path}: {label} holds a structured array (named fields); only plain numeric, "
            "bool and object arrays are read"
        )
    if not isinstance(descr, str) or not _DESCR.match(descr):
        raise UnsupportedDtypeError(
            f"{path}: {label} dtype {descr!r:.80} is not supported (strings, datetimes and "
            "other non-numeric types are not tensors)"
        )
    parsed = _numpy_dtype(descr)
    if parsed is None:
        raise CorruptFileError(f"{label}: invalid dtype {descr!r}", path=path)
    if parsed.kind == "O":
        return None, parsed.itemsize, False, OBJECT_WARNING
    if parsed.kind == "V":
        carrier = _VOID_CARRIERS.get(parsed.itemsize)
        if carrier is None:
            raise UnsupportedDtypeError(
                f"{path}: {label} dtype {descr!r} is raw bytes of an unknown type"
            )
        return (
            carrier,
            parsed.itemsize,
            False,
            f"{label} dtype {descr!r} is raw {parsed.itemsize}-byte values (what ml_dtypes "
            f"types such as bfloat16 or float8 save as): reported as {carrier}",
        )
    swapped = parsed.byteorder == ">"
    return _modelport_dtype(descr), parsed.itemsize, swapped, ""


@functools.lru_cache(maxsize=256)
def _numpy_dtype(descr: str) -> Any:
    """numpy's dtype for ``descr``, or None when numpy rejects it."""
    import numpy as np

    try:
        return np.dtype(descr)
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=256)
def _modelport_dtype(descr: str) -> str:
    parsed = _numpy_dtype(descr)
    swapped = parsed.byteorder == ">"
    return dtypes.from_numpy(parsed.newbyteorder("<") if swapped else parsed)
