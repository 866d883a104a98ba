"""numpy ``.npy``: one array, a magic string, a Python-literal header, then the raw data.

Layout (numpy/lib/format.py, NEP 1):

- bytes 0..6 MUST be ``b"\\x93NUMPY"``, then the major and minor version (u8 each): 1.0, 2.0
  or 3.0;
- the header length: a little-endian u16 in version 1, u32 in versions 2 and 3;
- the header: a Python dict literal (latin-1 text, UTF-8 in version 3) with exactly the keys
  ``descr`` (a dtype string), ``fortran_order`` (bool) and ``shape`` (a tuple of ints),
  padded with spaces and a newline; writers align the data to 64 bytes, readers MUST NOT
  rely on it;
- the data: ``prod(shape) * itemsize`` bytes in C or Fortran order. Object arrays
  (``descr`` ``|O``) store a pickle of the whole array instead.

Choices and edge cases:

- the header is parsed with ``ast.literal_eval`` after its length is checked against
  ``limits.MAX_NPY_HEADER`` and the file size; nothing from numpy's loader runs;
- the one array is named after the file's stem (``embeddings.npy`` holds ``embeddings``;
  ``array`` when the stem is empty);
- big-endian arrays are read through a storage that swaps bytes on access (not zero-copy);
- ``|V1``/``|V2``/``|V4``/``|V8`` (what ``ml_dtypes`` types such as bfloat16 and float8 save
  as) carry no element type: they are reported as unsigned integers of that width, with a
  warning; structured dtypes, strings, datetimes and other void widths are refused;
- object arrays: the pickle is interpreted by modelport's restricted reader (nothing from
  the file is imported or called); the tree holds what it rebuilt, with a warning;
- bytes past the end of the data are ignored, with a warning.

``parse_header`` and ``tensor_ref`` are shared with the ``.npz`` reader.
"""

from __future__ import annotations

import ast
import io
import math
import re
import struct
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    TruncatedFileError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.pickles.numpy_types import NumpyArray
from modelport.pickles.reading import read_pickle
from modelport.tensors import NDArray, Storage, TensorRef

MAGIC = b"\x93NUMPY"
VERSIONS = {(1, 0): 2, (2, 0): 4, (3, 0): 4}  # version -> width of the header length field
MAX_PREFIX = len(MAGIC) + 2 + 4 + limits.MAX_NPY_HEADER  # the most bytes a header can span
KEYS = {"descr", "fortran_order", "shape"}
DEFAULT_NAME = "array"
OBJECT_WARNING = "object array: contents are a pickle (read without executing anything)"

_DESCR = re.compile(r"^[<>|=]?[biufcVO?][0-9]{0,3}$")
_VOID_CARRIERS = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}

RawReader: TypeAlias = Callable[[], NDArray]


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


def sniff(probe: Probe) -> bool:
    return not probe.is_dir and probe.head.startswith(MAGIC)


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
            _truncated(f"{label} header", len(MAGIC) + 2, total, path)
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
        _truncated(f"{label} header length", start, total, path)
    (length,) = struct.unpack_from("<H" if width == 2 else "<I", prefix, 8)
    if length > limits.MAX_NPY_HEADER:
        raise LimitExceededError(f"{label} header length", limits.MAX_NPY_HEADER, length, path=path)
    if len(prefix) < start + length:
        _truncated(f"{label} header", start + length, total, path)
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
    from numpy.lib import format as numpy_format

    label = f"npy{where}"
    _, fields, data_offset = _header_fields(prefix, label, path, available)
    try:
        holds = bool(numpy_format.descr_to_dtype(fields["descr"]).hasobject)
    except (TypeError, ValueError, KeyError, IndexError, RecursionError) as exc:
        raise CorruptFileError(f"{label}: numpy rejects its dtype ({exc})", path=path) from None
    return data_offset if holds else None


def _truncated(what: str, expected: int, actual: int, path: Path) -> None:
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


def _literal(text: str, label: str, path: Path) -> dict[str, Any]:
    try:
        fields = ast.literal_eval(text.strip())
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
    import numpy as np

    try:
        parsed = np.dtype(descr)
    except (TypeError, ValueError):
        raise CorruptFileError(f"{label}: invalid dtype {descr!r}", path=path) from None
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
    name = dtypes.from_numpy(parsed.newbyteorder("<") if swapped else parsed)
    return name, parsed.itemsize, swapped, ""


def tensor_ref(
    header: NpyHeader,
    path: Path,
    offset: int,
    *,
    key: str = "",
    reader: RawReader | None = None,
) -> TensorRef:
    """The array as a tensor: its data at ``offset`` in ``path``, or from ``reader``."""
    if header.dtype is None:
        raise UnsupportedDtypeError(f"{path}: an object array is a pickle, not a tensor")
    base = reader
    if header.byteswapped:
        import numpy as np

        stored = Storage(path, offset, header.nbytes, key=key, reader=reader)
        big = np.dtype(header.descr)

        def swapping() -> NDArray:
            swapped: NDArray = stored.bytes_view().view(big).byteswap().view(np.uint8)
            return swapped

        base = swapping
    storage = Storage(path, offset, header.nbytes, key=key, reader=base)
    return TensorRef(header.dtype, header.shape, storage, 0, header.strides)


def object_array(data: bytes, header: NpyHeader, *, path: Path | None, base_offset: int) -> Any:
    """What an object array's pickle rebuilds; ``data`` is the whole ``.npy``."""
    return read_pickle(data, start=header.data_offset, path=path, base_offset=base_offset).value


def _saved_dict(value: Any) -> dict[Any, Any] | None:
    """The dict a 0-d object array holds: how ``np.save`` stores a dict of arrays."""
    if not isinstance(value, NumpyArray) or value.shape != () or value.objects is None:
        return None
    objects = value.objects
    return objects[0] if len(objects) == 1 and isinstance(objects[0], dict) else None


def read(path: Path, probe: Probe) -> Contents:
    size = probe.size
    with open(path, "rb") as handle:
        prefix = handle.read(MAX_PREFIX)
    header = parse_header(prefix, path=path, available=size)
    name = path.stem or DEFAULT_NAME
    warnings = [header.warning] if header.warning else []
    details: dict[str, Any] = {
        "version": f"{header.version[0]}.{header.version[1]}",
        "descr": header.descr,
        "fortran_order": header.fortran_order,
        "header_bytes": header.data_offset,
    }
    if header.is_object:
        if size > limits.MAX_NPY_PICKLE:
            raise LimitExceededError(
                "npy object array pickle size", limits.MAX_NPY_PICKLE, size, path=path
            )
        data = path.read_bytes()
        value = object_array(data, header, path=path, base_offset=0)
        saved = _saved_dict(value)  # ``np.save(path, state_dict)``: read back by ``.item()``
        if saved is not None:
            return Contents(Format.NPY, saved, details=details, warnings=warnings)
        return Contents(Format.NPY, {name: value}, details=details, warnings=warnings)
    end = header.data_offset + header.nbytes
    if end > size:
        _truncated(f"npy array of shape {list(header.shape)} ({header.descr})", end, size, path)
    if end < size:
        warnings.append(f"{size - end} bytes after the array data are ignored")
    tensor = tensor_ref(header, path, header.data_offset, key=name)
    return Contents(Format.NPY, {name: tensor}, details=details, warnings=warnings)


READER = FormatReader(Format.NPY, sniff, read, (".npy",))
