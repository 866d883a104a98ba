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
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final

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
_SHORT_SPAN, _LONG_SPAN = len(MAGIC) + 2 + 2, len(MAGIC) + 2 + 4  # where version 1 / 2+ dicts start
KEYS = {"descr", "fortran_order", "shape"}
OBJECT_WARNING = "object array: contents are a pickle (read without executing anything)"

_DESCR = re.compile(r"^[<>|=]?[biufcVO?][0-9]{0,3}$")
_TEXT = re.compile(r"^[<>|=]?[US][1-9][0-9]{0,8}$")  # numpy's fixed-width str and bytes
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
_FIELD_KINDS = frozenset("biufc")  # numpy kinds a record field may have to be a tensor
# Headers parsed lately, by their bytes: the members of an archive repeat a few headers
# (a million-member npz of one dtype and shape has one), so each is parsed once. Only
# headers that parse are kept, so errors keep naming the member they come from; only short
# ones, so the kept bytes stay a few MB whatever a file holds.
_KNOWN: dict[bytes, NpyHeader] = {}
_KNOWN_KEPT, _KNOWN_MAX_BYTES = 1024, 4096


class ArrayKind(Enum):
    """What the data after a header is, for a reader."""

    NUMERIC = "numeric"  # one tensor
    OBJECT = "object"  # a pickle of the array (numpy's ``allow_pickle``)
    RECORD = "record"  # named fields, each read as a tensor of its own
    TEXT = "text"  # fixed-width strings, numpy's ``U`` (UTF-32) and ``S`` (bytes)


@dataclass(frozen=True)
class RecordField:
    """One field of a structured dtype, a number in every record (or a fixed-shape block of
    numbers: a subarray field); nested records give it a path of names."""

    names: tuple[str, ...]
    offset: int  # bytes from the start of a record
    dtype: str  # modelport dtype
    shape: tuple[int, ...]  # the subarray's shape; () for one number per record


@dataclass(frozen=True)
class NpyHeader:
    """A parsed ``.npy`` header; ``data_offset`` counts from the start of the ``.npy``.
    ``dtype`` is None unless ``kind`` is numeric; a record's ``fields`` and ``itemsize``
    (the record's) describe its data instead."""

    version: tuple[int, int]
    descr: str | list[Any]
    fortran_order: bool
    shape: tuple[int, ...]
    data_offset: int
    dtype: str | None  # modelport dtype of a numeric array
    itemsize: int
    byteswapped: bool  # stored big-endian
    warning: str = ""
    kind: ArrayKind = ArrayKind.NUMERIC
    fields: tuple[RecordField, ...] = ()
    nbytes: int = field(init=False)  # of the data: every element (record, character) stored

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", math.prod(self.shape) * self.itemsize)

    @property
    def is_object(self) -> bool:
        return self.kind is ArrayKind.OBJECT

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


def header_span(prefix: bytes) -> int | None:
    """How many bytes the header at the start of ``prefix`` spans (magic to the end of its
    dict), when ``prefix`` reaches its length field; None otherwise."""
    if not prefix.startswith(MAGIC) or len(prefix) < _SHORT_SPAN:
        return None
    width = VERSIONS.get((prefix[6], prefix[7]))
    if width == 2:
        return _SHORT_SPAN + (prefix[8] | prefix[9] << 8)
    if width == 4 and len(prefix) >= _LONG_SPAN:
        return _LONG_SPAN + int.from_bytes(prefix[8:12], "little")
    return None


def parse_header(prefix: bytes, *, path: Path, where: str = "", available: int = -1) -> NpyHeader:
    """Parse the header at the start of ``prefix`` (the first ``MAX_PREFIX`` bytes, all of a
    shorter file, or at least ``header_span`` of them: exactly that many find a header met
    before quickest); ``available`` is the size of the whole ``.npy`` for error messages."""
    known = _KNOWN.get(prefix)  # ``prefix`` is exactly a header met before
    if known is not None:
        return known
    span = header_span(prefix)
    key = prefix[:span] if span is not None and span <= min(len(prefix), _KNOWN_MAX_BYTES) else None
    if key is not None:
        known = _KNOWN.get(key)
        if known is not None:
            return known
    header = _parse(prefix, f"npy{where}", path, available)
    if key is not None:
        if len(_KNOWN) >= _KNOWN_KEPT:
            _KNOWN.clear()  # starts afresh: one call, safe beside other threads
        _KNOWN[key] = header
    return header


def _parse(prefix: bytes, label: str, path: Path, available: int) -> NpyHeader:
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
    if isinstance(descr, list):
        itemsize, record = _record_fields(descr, label, path)
        return NpyHeader(
            version, descr, fortran, shape, data_offset, None, itemsize, False,
            kind=ArrayKind.RECORD, fields=record,
        )  # fmt: skip
    dtype, itemsize, swapped, warning, kind = _element_type(descr, label, path)
    return NpyHeader(
        version, descr, fortran, shape, data_offset, dtype, itemsize, swapped, warning, kind
    )


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
    plain = _PLAIN.get(descr) if type(descr) is str else None
    if plain is not None:
        return plain.kind == "O"
    return bool(_descr_to_dtype(descr).hasobject)


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


def _element_type(
    descr: Any, label: str, path: Path
) -> tuple[str | None, int, bool, str, ArrayKind]:
    """(modelport dtype of a numeric array, itemsize, big-endian, warning, kind)."""
    if not isinstance(descr, str) or not (_DESCR.match(descr) or _TEXT.match(descr)):
        raise UnsupportedDtypeError(
            f"{path}: {label} dtype {descr!r:.80} is not supported (datetimes and other "
            "types that are neither numbers nor text are not tensors)"
        )
    parsed = _PLAIN.get(descr) or _numpy_dtype(descr)
    if parsed is None:
        raise CorruptFileError(f"{label}: invalid dtype {descr!r}", path=path)
    if parsed.kind == "O":
        return None, parsed.itemsize, False, OBJECT_WARNING, ArrayKind.OBJECT
    if parsed.kind in "US":
        return None, parsed.itemsize, parsed.byteorder == ">", "", ArrayKind.TEXT
    if parsed.kind == "V":
        carrier = _VOID_CARRIERS.get(parsed.itemsize)
        if carrier is None:
            raise UnsupportedDtypeError(
                f"{path}: {label} dtype {descr!r} is raw bytes of an unknown type"
            )
        warning = (
            f"dtype {descr!r} is raw {parsed.itemsize}-byte values (what ml_dtypes types "
            f"such as bfloat16 or float8 save as): reported as {carrier}"
        )
        return carrier, parsed.itemsize, False, warning, ArrayKind.NUMERIC
    swapped = parsed.byteorder == ">"
    return _modelport_dtype(descr), parsed.itemsize, swapped, "", ArrayKind.NUMERIC


def _record_fields(descr: list[Any], label: str, path: Path) -> tuple[int, tuple[RecordField, ...]]:
    """(the record's itemsize, its fields) of a structured dtype, built as ``numpy.load``
    builds it (``descr_to_dtype``). Every field must be a number: an object field makes
    numpy pickle the array, and text or dates have no tensor type."""
    try:
        record = _descr_to_dtype(descr)
    except (TypeError, ValueError, KeyError, IndexError, RecursionError) as exc:
        raise CorruptFileError(f"{label}: numpy rejects its dtype ({exc})", path=path) from None
    if record.hasobject:
        raise UnsupportedDtypeError(
            f"{path}: {label} is a structured array with object fields: numpy stores it as "
            "a pickle, which is not read as tensors"
        )
    found: list[RecordField] = []
    _walk_fields(record, (), 0, found, f"{path}: {label}")
    if not found:
        raise UnsupportedDtypeError(f"{path}: {label} is a structured array with no fields")
    return record.itemsize, tuple(found)


def _walk_fields(
    record: Any, names: tuple[str, ...], offset: int, found: list[RecordField], where: str
) -> None:
    for name in record.names or ():
        field_dtype, field_offset = record.fields[name][:2]
        base, shape, here = field_dtype.base, field_dtype.shape, (*names, name)
        if base.names is not None and not shape:
            _walk_fields(base, here, offset + field_offset, found, where)
            continue
        dtype = None
        if base.kind in _FIELD_KINDS:
            little = base.newbyteorder("<") if base.byteorder == ">" else base
            try:
                dtype = dtypes.from_numpy(little)
            except UnsupportedDtypeError:
                dtype = None
        if dtype is None:
            raise UnsupportedDtypeError(
                f"{where} field {'.'.join(here)!r} has dtype {str(field_dtype)!r:.60}: the "
                "fields of a structured array are read as tensors, which hold numbers and "
                "bools of the widths torch has"
            )
        found.append(RecordField(here, offset + field_offset, dtype, shape))


@dataclass(frozen=True)
class PlainDtype:
    """What the header reader needs of a dtype, for the spellings ``numpy.save`` writes for
    plain numbers (``dtype.str``): they are read without importing numpy, which costs a
    scanning process a quarter of a second. ``tests/formats`` holds each to ``numpy.dtype``."""

    kind: str
    itemsize: int
    byteorder: str  # as spelled: "<", ">" or "|" (only ">" is ever asked for)
    name: str  # modelport's (torch's) dtype name; "" for objects


def _plain_spellings() -> dict[str, PlainDtype]:
    table = {"|O": PlainDtype("O", 8, "|", "")}
    for code, name in dtypes.NUMPY_CODES.items():
        size = int(code[1:])
        orders = ("|",) if size == 1 else ("<", ">")
        for order in orders:
            table[order + code] = PlainDtype(code[0], size, order, name)
    return table


_PLAIN: Final = _plain_spellings()


def numpy_descr(descr: str | list[Any]) -> Any:
    """numpy's dtype for a ``descr`` this module parsed (records as ``numpy.load`` builds
    them)."""
    return _numpy_dtype(descr) if isinstance(descr, str) else _descr_to_dtype(descr)


def _descr_to_dtype(descr: Any) -> Any:
    from numpy.lib import format as numpy_format

    return numpy_format.descr_to_dtype(descr)


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
    plain = _PLAIN.get(descr)
    if plain is not None:
        return plain.name
    parsed = _numpy_dtype(descr)
    swapped = parsed.byteorder == ">"
    return dtypes.from_numpy(parsed.newbyteorder("<") if swapped else parsed)
