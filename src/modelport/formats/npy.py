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
  warning; datetimes and other void widths are refused;
- a structured dtype (record array) is read as numpy users read it, field by field
  (``array["x"]``): one tensor per field, of the array's shape plus a subarray field's
  own, nested under the array's name as the records nest (``data.x``, ``data.pos.y``). Its
  fields must all be numbers or bools; a field of text or dates is refused, naming it;
- fixed-width text (``U``: UTF-32, ``S``: bytes) is text, not a tensor: the array becomes
  what numpy's ``tolist()`` gives (a ``str``, or ``bytes`` for ``S``, for a 0-d array; nested
  lists otherwise), read whole up to ``limits.MAX_NPY_TEXT``;
- object arrays: the pickle is interpreted by modelport's restricted reader (nothing from
  the file is imported or called); the tree holds what it rebuilt, with a warning;
- bytes past the end of the data are ignored, with a warning.

``parse_header`` and ``tensor_ref`` are shared with the ``.npz`` reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeAlias

from modelport import dtypes, limits
from modelport.errors import CorruptFileError, LimitExceededError, UnsupportedDtypeError
from modelport.formats._npy_header import MAGIC as MAGIC
from modelport.formats._npy_header import MAX_PREFIX as MAX_PREFIX
from modelport.formats._npy_header import ArrayKind as ArrayKind
from modelport.formats._npy_header import NpyHeader as NpyHeader
from modelport.formats._npy_header import RecordField, numpy_descr, raise_truncated
from modelport.formats._npy_header import object_data_offset as object_data_offset
from modelport.formats._npy_header import parse_header as parse_header
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.pickles.numpy_types import NumpyArray
from modelport.pickles.reading import read_pickle
from modelport.tensors import NDArray, Storage, TensorRef

DEFAULT_NAME = "array"

RawReader: TypeAlias = Callable[[], NDArray]


def sniff(probe: Probe) -> bool:
    return not probe.is_dir and probe.head.startswith(MAGIC)


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
        raise UnsupportedDtypeError(f"{path}: a {header.kind.value} array is not one tensor")
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


def record_tree(header: NpyHeader, records: Storage) -> dict[str, Any]:
    """A structured array's fields as tensors, nested as its records nest: what
    ``array[name]`` gives in numpy. ``records`` holds the array's data; each field is
    gathered out of it when read (a field's values are not contiguous in the file)."""
    tree: dict[str, Any] = {}
    for field in header.fields:
        node = tree
        for name in field.names[:-1]:
            node = node.setdefault(name, {})
        node[field.names[-1]] = _field_tensor(header, records, field)
    return tree


def _field_tensor(header: NpyHeader, records: Storage, field: RecordField) -> TensorRef:
    shape = header.shape + field.shape
    nbytes = math.prod(shape) * dtypes.dtype(field.dtype).itemsize

    def gather() -> NDArray:
        import numpy as np

        order: Literal["C", "F"] = "F" if header.fortran_order else "C"
        data = records.bytes_view()
        values = np.ndarray(header.shape, numpy_descr(header.descr), data, order=order)
        for name in field.names:
            values = values[name]
        little = values.dtype.newbyteorder("<") if values.dtype.byteorder == ">" else None
        flat: NDArray = np.ascontiguousarray(values, dtype=little).reshape(-1)
        return flat.view(np.uint8)

    key = ".".join((records.key, *field.names))
    storage = Storage(records.path, records.offset, nbytes, key=key, reader=gather)
    return TensorRef(field.dtype, shape, storage)


def text_value(data: bytes, header: NpyHeader, *, path: Path) -> Any:
    """A fixed-width text array as numpy's ``tolist()`` gives it: a ``str`` (``bytes`` for
    dtype ``S``) for a 0-d array, nested lists otherwise; ``data`` is the array's bytes."""
    import numpy as np

    dtype = numpy_descr(header.descr)
    count = math.prod(header.shape)
    if dtype.kind == "U" and count:
        codes = np.frombuffer(data, dtype=">u4" if header.byteswapped else "<u4")
        if int(codes.max()) > 0x10FFFF:  # numpy would fail building the str
            raise CorruptFileError("npy text holds a character past U+10FFFF", path=path)
    order: Literal["C", "F"] = "F" if header.fortran_order else "C"
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(header.shape, order=order)
    return array.tolist()


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
        raise_truncated(
            f"npy array of shape {list(header.shape)} ({header.descr})", end, size, path
        )
    if end < size:
        warnings.append(f"{size - end} bytes after the array data are ignored")
    array = _array(path, header, name)
    return Contents(Format.NPY, {name: array}, details=details, warnings=warnings)


def _array(path: Path, header: NpyHeader, name: str) -> Any:
    """The array the header describes: a tensor, a record's fields, or text."""
    if header.kind is ArrayKind.RECORD:
        return record_tree(header, Storage(path, header.data_offset, header.nbytes, key=name))
    if header.kind is ArrayKind.TEXT:
        return text_value(_read_text(path, header), header, path=path)
    return tensor_ref(header, path, header.data_offset, key=name)


def _read_text(path: Path, header: NpyHeader) -> bytes:
    if header.nbytes > limits.MAX_NPY_TEXT:
        raise LimitExceededError(
            "npy text array size", limits.MAX_NPY_TEXT, header.nbytes, path=path
        )
    with open(path, "rb") as handle:
        handle.seek(header.data_offset)
        data = handle.read(header.nbytes)
    if len(data) < header.nbytes:
        raise_truncated(
            "npy text", header.data_offset + header.nbytes, header.data_offset + len(data), path
        )
    return data


READER = FormatReader(Format.NPY, sniff, read, (".npy",))
