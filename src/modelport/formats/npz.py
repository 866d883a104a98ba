"""numpy ``.npz``: a zip archive of ``.npy`` members, one per array.

Layout (numpy ``savez`` / ``savez_compressed``):

- a zip archive (read with modelport's own directory parser, ``formats/_zip.py``) whose
  members MUST all be named ``<array name>.npy``;
- each member is a complete ``.npy`` (see ``formats/npy.py``), stored (``savez``) or
  deflated (``savez_compressed``); zip64 records appear past 4 GiB.

Choices and edge cases:

- tensor names are member names without ``.npy``; when a name repeats, the last member
  wins, as in ``numpy.load`` (Python's ``zipfile``), with a warning;
- stored members are zero-copy: a storage at the member's data offset plus its header;
- deflated members get a storage that inflates that member on access, and only it. A
  member's declared size MUST equal its header plus ``prod(shape) * itemsize``, MUST be
  reachable from its compressed size (deflate expands at most ``MAX_RATIO`` to one), and
  inflation stops at that size, so a zip bomb costs at most what its header honestly
  declares; the CRC-32 is checked once the member has been inflated. Members in bzip2 or
  LZMA (numpy never writes them, its loader reads them through zipfile) are read the same
  way, their declared size within ``_compressed.stream_cap`` of their compressed size;
- object arrays are read as in ``.npy`` files (a pickle, never executed), with a warning;
  so are record arrays (a tensor per field) and text (``scipy.sparse.save_npz`` stores
  ``format`` as a 0-d text array: ``"csc"``, or ``b"csc"`` as recent scipy writes it);
- a member's header is read once (headers the members share are parsed once, see
  ``_npy_header``); members whose dtype is no tensor type are left out with a warning.

Sniffing claims a zip whose members are all ``*.npy``, which no torch archive is.

Writing (``write``) produces what ``numpy.savez`` produces, so ``numpy.load`` returns equal
arrays: one stored member ``<name>.npy`` per tensor, its ``.npy`` header byte-identical to
numpy's (version 1.0, or 2.0 past 65535 bytes; data 64-byte aligned within the member) and
the member's data 64-byte aligned in the file (``_zip_writer``: CRC-32, zip64 past 4 GiB).
numpy has no bfloat16 or float8 types: those tensors are stored as their same-width
unsigned integers (``<u2``, ``|u1``) and the real dtypes are named in one more member,
``__modelport_dtypes__.npy``: a 1-d uint8 array holding the UTF-8 JSON object
``{name: dtype}`` (only written when needed; a numeric array, so ``numpy.load`` and every
scanner read it like any other: ``json.loads(arrays["__modelport_dtypes__"].tobytes())``).
This reader takes it out of the tree and gives the named tensors their dtypes back, so
bfloat16 and float8 round-trip bit for bit. The plan's metadata has no place in an
``.npz`` and is not written, except a nested checkpoint's structure (``convert --all``):
its typed JSON (``typed_json``) goes into ``__modelport_tree__.npy`` the same way, and this
reader returns the nested tree it describes (or, if it does not place exactly the file's
arrays, the flat arrays with a warning).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from modelport import dtypes, limits
from modelport.errors import (
    ConversionError,
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
    UnsupportedDtypeError,
)
from modelport.formats import npy
from modelport.formats._compressed import member_pieces, stream_cap
from modelport.formats._npy_header import ArrayKind, header_span
from modelport.formats._zip import (
    BZIP2,
    DEFLATED,
    INFLATED_METHODS,
    LZMA,
    STORED,
    ZIPFILE_METHODS,
    ZipDirectory,
    ZipEntry,
)
from modelport.formats._zip_writer import ZipWriter, crc32_combine
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import NDArray, Storage, TensorRef
from modelport.transfer.readback import Checksum
from modelport.transfer.streaming import write_all, write_tensor
from modelport.transfer.write_plan import OutputTensor, WritePlan
from modelport.tree import typed_json, typed_json_decoding

SUFFIX = ".npy"
DTYPE_MAP = "__modelport_dtypes__"  # member (without .npy) naming the dtypes numpy lacks
TREE = "__modelport_tree__"  # member (without .npy) holding a nested tree as typed JSON
ALIGNMENT = 64  # numpy's ARRAY_ALIGN; also where member data starts in the file
GROWTH_AXIS_MAX_DIGITS = 21  # numpy pads headers so a growing axis can be rewritten in place
# dtypes numpy has no type for, and the same-width unsigned integers that carry them
VIEWED = {
    "bfloat16": "<u2",
    "float8_e4m3fn": "|u1",
    "float8_e5m2": "|u1",
    "float8_e4m3fnuz": "|u1",
    "float8_e5m2fnuz": "|u1",
    "float8_e8m0fnu": "|u1",
}
# dtypes numpy holds, and the ``descr`` numpy writes for each (``np.dtype(name).str``)
NATIVE = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "complex128": "<c16",
    "complex64": "<c8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "|i1",
    "uint64": "<u8",
    "uint32": "<u4",
    "uint16": "<u2",
    "uint8": "|u1",
    "bool": "|b1",
}
FIRST_READ = 256  # bytes read for a member's header: numpy's own headers fit (64 or 128)
MAX_RATIO = 1032  # deflate's largest possible expansion (258-byte matches in 2-bit codes)
RATIO_SLACK = 1024


def sniff(probe: Probe) -> bool:
    directory = probe.zipfile_zip  # numpy.load opens it with zipfile
    if directory is None or not directory.entries:
        return False
    return all(entry.name.endswith(SUFFIX) for entry in directory.entries)


def inflate(path: Path, entry: ZipEntry, skip: int, count: int) -> NDArray:
    """Bytes ``skip .. skip + count`` of a deflated (or bzip2, LZMA) member, inflating no
    further than that (the CRC-32 is checked when the range reaches the member's end)."""
    import numpy as np

    end = skip + count
    out = np.empty(count, dtype=np.uint8)
    produced, crc = 0, 0
    with open(path, "rb") as handle:
        handle.seek(entry.data_offset)
        left = entry.compressed_size

        def read(size: int) -> bytes:
            nonlocal left
            piece = handle.read(min(size, left))
            left -= len(piece)
            return piece

        try:
            for piece in member_pieces(read, entry.method):
                crc = zlib.crc32(piece[: end - produced], crc)  # up to ``end`` only
                low, high = max(skip - produced, 0), min(end - produced, len(piece))
                if high > low:
                    start = produced + low - skip
                    out[start : start + high - low] = np.frombuffer(piece, np.uint8)[low:high]
                produced += len(piece)
                if produced >= end:
                    break
        except CorruptFileError as exc:
            raise CorruptFileError(f"npz member {entry.name!r}: {exc}", path=path) from None
    if produced < end:
        raise TruncatedFileError(
            f"npz member {entry.name!r} inflates to {produced} bytes, {end} were expected",
            expected=end,
            actual=produced,
            path=path,
        )
    if end == entry.size and crc != entry.crc32:
        raise CorruptFileError(f"npz member {entry.name!r} fails its CRC-32 check", path=path)
    return out


def _read_prefix(handle: BinaryIO, path: Path, entry: ZipEntry) -> bytes:
    """The member's header: the first ``FIRST_READ`` bytes, then the rest of a longer header
    (never past ``npy.MAX_PREFIX`` nor the member's end)."""
    count = min(entry.size, npy.MAX_PREFIX)
    prefix = _member_bytes(handle, path, entry, min(count, FIRST_READ))
    span = header_span(prefix)
    if span is None or span == len(prefix):
        return prefix
    if span < len(prefix):
        return prefix[:span]
    if len(prefix) >= count:  # the member (or MAX_PREFIX) ends before the header does
        return prefix
    return _member_bytes(handle, path, entry, min(span, count))


def _member_bytes(handle: BinaryIO, path: Path, entry: ZipEntry, count: int) -> bytes:
    if entry.method == STORED:
        handle.seek(entry.data_offset)
        return handle.read(count)
    return inflate(path, entry, 0, count).tobytes()


def _member(
    directory: ZipDirectory, handle: BinaryIO, entry: ZipEntry, warnings: list[str]
) -> Any | None:
    """The member's array: a tensor, a record's fields, text or what an object array's
    pickle rebuilds; None when it is left out (a warning says why)."""
    path = directory.path
    where = f" member {entry.name!r}"
    _check_sizes(entry, path, where)
    header = npy.parse_header(
        _read_prefix(handle, path, entry), path=path, where=where, available=entry.size
    )
    if header.warning:
        warnings.append(f"{entry.name}: {header.warning}")
    stored = entry.method == STORED
    if header.is_object:
        data = directory.read_member(entry, limits.MAX_NPY_PICKLE, ZIPFILE_METHODS)
        return npy.object_array(
            data,
            header,
            path=path if stored else None,
            base_offset=entry.data_offset if stored else 0,
        )
    expected = header.data_offset + header.nbytes
    if entry.size != expected:
        raise CorruptFileError(
            f"npz{where} declares {entry.size:,} bytes but its header describes "
            f"{expected:,} ({header.descr} array of shape {list(header.shape)})",
            path=path,
        )
    if header.kind is ArrayKind.TEXT:
        if header.nbytes > limits.MAX_NPY_TEXT:
            warnings.append(
                f"npz{where} left out: {header.nbytes:,} bytes of text, past the "
                f"{limits.MAX_NPY_TEXT:,} read as text"
            )
            return None
        data = _member_bytes(handle, path, entry, entry.size)[header.data_offset :]
        return npy.text_value(data, header, path=path)

    def inflated() -> NDArray:
        return inflate(path, entry, header.data_offset, header.nbytes)

    offset = entry.data_offset + header.data_offset if stored else entry.data_offset
    reader = None if stored else inflated
    if header.kind is ArrayKind.RECORD:
        records = Storage(path, offset, header.nbytes, key=entry.name, reader=reader)
        return npy.record_tree(header, records)
    return npy.tensor_ref(header, path, offset, key=entry.name, reader=reader)


def _check_sizes(entry: ZipEntry, path: Path, where: str) -> None:
    """What the directory says of the member must be what numpy's writer can produce."""
    if entry.method != STORED and entry.method not in INFLATED_METHODS:
        raise CorruptFileError(
            f"npz{where} uses zip compression method {entry.method}, which numpy.load "
            "(Python's zipfile) does not read either",
            path=path,
        )
    if entry.method != DEFLATED and entry.method != STORED:
        cap = stream_cap(entry.compressed_size, limits.MAX_ZIP_MEMBER_INFLATED)
        if entry.size > cap.size:
            raise LimitExceededError(
                f"npz{where} declared size (capped at {cap.advice})",
                cap.size,
                entry.size,
                path=path,
            )
        return
    if entry.method == STORED and entry.size != entry.compressed_size:
        raise CorruptFileError(
            f"npz{where} is stored but declares {entry.size} bytes in {entry.compressed_size}",
            path=path,
        )
    if entry.size > entry.compressed_size * MAX_RATIO + RATIO_SLACK:
        raise CorruptFileError(
            f"npz{where} declares {entry.size:,} bytes from {entry.compressed_size:,} "
            "compressed, more than deflate can produce",
            path=path,
        )


def read(path: Path, probe: Probe) -> Contents:
    directory: ZipDirectory = probe.zipfile_zip or probe.zip_directory().zipfile_view()
    warnings = [f"zip member name escapes the archive: {name!r}" for name in directory.unsafe_names]
    chosen: dict[str, ZipEntry] = {}
    for entry in directory.entries:
        if not entry.name.endswith(SUFFIX):
            raise CorruptFileError(f"npz member {entry.name!r} is not a .npy", path=path)
        name = entry.name[: -len(SUFFIX)]
        if name in chosen:
            warnings.append(f"npz member {entry.name!r} appears more than once: the last wins")
        chosen[name] = entry
    restore = _take_dtype_map(directory, chosen, warnings)
    structure = _take_text(directory, chosen, TREE, limits.MAX_TYPED_JSON_CHARS)
    tree: dict[str, TensorRef | Any] = {}
    with open(path, "rb") as handle:
        for name, entry in chosen.items():
            try:
                value = _member(directory, handle, entry, warnings)
            except UnsupportedDtypeError as exc:  # dates, records of text: not tensors
                warnings.append(f"npz member {entry.name!r} skipped: {exc}")
                continue
            if value is not None:
                tree[name] = value
    _restore_dtypes(tree, restore, warnings)
    nested = None
    if structure is not None:
        try:
            nested = typed_json_decoding.decode(structure, tree, complete=True)
        except ModelportError as exc:
            warnings.append(f"{TREE}.npy ignored, the arrays are shown flat: {exc}")
    stored = sum(1 for e in chosen.values() if e.is_stored)
    methods = [e.method for e in chosen.values()]
    details: dict[str, Any] = {
        "members": len(chosen),
        "stored": stored,
        "deflated": methods.count(DEFLATED),
    }
    for method, name in ((BZIP2, "bzip2"), (LZMA, "lzma")):
        if method in methods:
            details[name] = methods.count(method)
    if restore:
        details["restored_dtypes"] = len(restore)
    if nested is not None:
        details["tree"] = f"nested checkpoint restored from {TREE}.npy"
    return Contents(
        Format.NPZ, tree if nested is None else nested, details=details, warnings=warnings
    )


def _take_text(
    directory: ZipDirectory, chosen: dict[str, ZipEntry], name: str, limit: int
) -> str | None:
    """The UTF-8 text modelport's writer stores as the 1-d uint8 array ``name``, removed
    from ``chosen``; None (the member stays an ordinary tensor) when it is not that."""
    entry = chosen.get(name)
    if entry is None or entry.size > limit + npy.MAX_PREFIX:
        return None
    data = directory.read_member(entry, limit + npy.MAX_PREFIX, ZIPFILE_METHODS)
    header = npy.parse_header(data[: npy.MAX_PREFIX], path=directory.path, available=len(data))
    if (
        header.dtype != "uint8"
        or len(header.shape) != 1
        or len(data) != header.data_offset + header.shape[0]
    ):
        return None
    try:
        text = data[header.data_offset :].decode("utf-8")
    except UnicodeDecodeError:
        return None
    del chosen[name]
    return text


def _take_dtype_map(
    directory: ZipDirectory, chosen: dict[str, ZipEntry], warnings: list[str]
) -> dict[str, str]:
    """The ``name -> dtype`` map modelport's writer leaves in ``__modelport_dtypes__.npy``,
    removed from ``chosen``; empty when there is none. A member of that name that is not a
    1-d uint8 array holding a JSON object of strings stays an ordinary tensor."""
    entry = chosen.get(DTYPE_MAP)
    if entry is None or entry.size > limits.MAX_NPZ_DTYPE_MAP:
        return {}
    path = directory.path
    data = directory.read_member(entry, limits.MAX_NPZ_DTYPE_MAP, ZIPFILE_METHODS)
    header = npy.parse_header(data[: npy.MAX_PREFIX], path=path, available=len(data))
    if (
        header.dtype != "uint8"
        or len(header.shape) != 1
        or len(data) != header.data_offset + header.shape[0]
    ):
        return {}
    try:
        mapping = json.loads(data[header.data_offset :].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        return {}
    del chosen[DTYPE_MAP]
    restore: dict[str, str] = {}
    for name, dtype in mapping.items():
        if dtype in VIEWED:
            restore[name] = dtype
        else:
            warnings.append(f"the dtype map names {dtype!r:.40} for {name!r:.80}: ignored")
    return restore


def _restore_dtypes(tree: dict[str, Any], restore: dict[str, str], warnings: list[str]) -> None:
    for name, dtype in restore.items():
        ref = tree.get(name)
        carrier = VIEWED[dtype]
        if (
            not isinstance(ref, TensorRef)
            or int(carrier[2:]) != dtypes.dtype(ref.dtype).itemsize  # "<u2": 2 bytes
            or not ref.dtype.startswith("uint")
        ):
            warnings.append(f"the dtype map names {name!r} as {dtype}, which it cannot be: ignored")
            continue
        tree[name] = dataclasses.replace(ref, dtype=dtype)


def holds(dtype: str) -> bool:
    return dtype in NATIVE or dtype in VIEWED


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header numpy writes for a C-ordered array (``_write_array_header``)."""
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    if shape:
        text += " " * (GROWTH_AXIS_MAX_DIGITS - len(repr(shape[0])))
    raw = text.encode("latin-1")
    for version, fmt in (((1, 0), "<H"), ((2, 0), "<I")):
        length = len(raw) + 1
        pad = ALIGNMENT - (len(npy.MAGIC) + 2 + struct.calcsize(fmt) + length) % ALIGNMENT
        if length + pad < 1 << (8 * struct.calcsize(fmt)):
            prefix = npy.MAGIC + bytes(version) + struct.pack(fmt, length + pad)
            return prefix + raw + b" " * pad + b"\n"
    raise ConversionError(f"an .npy header of {len(raw):,} bytes is too long")


def _fill(handle: BinaryIO, header: bytes, tensor: OutputTensor) -> Checksum:
    write_all(handle, header)
    data_crc = write_tensor(handle, tensor, checksum=True)
    return lambda: crc32_combine(zlib.crc32(header), data_crc(), tensor.nbytes)


def write(handle: BinaryIO, plan: WritePlan) -> None:
    viewed = {t.name: t.dtype for t in plan.tensors if t.dtype in VIEWED}
    for tensor in plan.tensors:
        if not holds(tensor.dtype):
            raise ConversionError(f"tensor {tensor.name!r}: .npz cannot hold {tensor.dtype}")
        if viewed and tensor.name == DTYPE_MAP:
            raise ConversionError(f"tensor name {DTYPE_MAP!r} is reserved for the dtype map")
        if tensor.name == TREE and typed_json.KEY in plan.metadata:
            raise ConversionError(f"tensor name {TREE!r} is reserved for the tree")
    archive = ZipWriter(handle, align=ALIGNMENT)
    for tensor in plan.tensors:
        descr = VIEWED.get(tensor.dtype) or NATIVE[tensor.dtype]
        header = npy_header(descr, tensor.shape)
        fill = partial(_fill, handle, header, tensor)
        archive.add_stream(tensor.name + SUFFIX, len(header) + tensor.nbytes, fill)
    if viewed:
        payload = json.dumps(viewed).encode()
        archive.add(DTYPE_MAP + SUFFIX, npy_header("|u1", (len(payload),)) + payload)
    if typed_json.KEY in plan.metadata:
        payload = plan.metadata[typed_json.KEY].encode()
        archive.add(TREE + SUFFIX, npy_header("|u1", (len(payload),)) + payload)
    archive.finish()


READER = FormatReader(Format.NPZ, sniff, read, (".npz",), write=write, holds=holds)
