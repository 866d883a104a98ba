"""Reading GGUF: the header walked with every count checked, tensors as views of the file.

The layout is in ``spec``.

Edge cases and choices:

- shapes are reported in torch order (GGML dims reversed); a 0-dim info is a scalar;
- F32/F16/BF16/F64/I8/I16/I32/I64 map to modelport dtypes; block-quantized types keep their
  GGML names (``Q4_0``, ``Q6_K``, ``IQ2_XS``, ``MXFP4`` ...) with ``nbytes`` the exact bytes
  on disk (``ne[0]`` MUST be a whole number of blocks); their ``numpy()`` raises
  ``UnsupportedDtypeError`` and ``raw_bytes()`` returns the blocks;
- metadata keeps arrays of up to ``ARRAY_ITEMS`` elements as lists; longer ones (tokenizer
  vocabularies, merges) become ``{"__array__": type, "length": n, "head": [first items]}``
  so that inspect stays fast and its JSON small (GGUF values are never dicts, so a dict in
  the metadata is always such a summary); skipping a numeric array costs nothing, skipping
  a string array walks its lengths only, and a header may walk at most ``limits.MAX_GGUF_WALKED``
  string or array elements;
- every count is checked against the bytes left before looping, every string and tensor
  range against the file size; duplicate keys or tensor names, unknown types, misaligned or
  overlapping tensor data are errors.

Writing lives in ``writer``: version 3, laid out as gguf-py's ``GGUFWriter`` does.
"""

from __future__ import annotations

import math
import mmap
import struct
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
from modelport.formats.gguf.spec import (
    ALIGNMENT_KEY,
    DEFAULT_ALIGNMENT,
    MAGIC,
    MAX_DIM,
    MAX_DIMS,
    PLAIN_TYPES,
    PREFIX,
    SUPPORTED_VERSIONS,
    GGMLType,
    ValueType,
    holds,
)
from modelport.formats.gguf.writer import write_gguf
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import Storage, TensorRef
from modelport.tree import typed_json, typed_json_decoding

ARRAY_ITEMS = 1024  # arrays longer than this are summarised in the metadata
ARRAY_HEAD = 16
MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset

_SCALARS: dict[ValueType, struct.Struct] = {
    ValueType.UINT8: struct.Struct("<B"),
    ValueType.INT8: struct.Struct("<b"),
    ValueType.UINT16: struct.Struct("<H"),
    ValueType.INT16: struct.Struct("<h"),
    ValueType.UINT32: struct.Struct("<I"),
    ValueType.INT32: struct.Struct("<i"),
    ValueType.FLOAT32: struct.Struct("<f"),
    ValueType.BOOL: struct.Struct("<B"),
    ValueType.UINT64: struct.Struct("<Q"),
    ValueType.INT64: struct.Struct("<q"),
    ValueType.FLOAT64: struct.Struct("<d"),
}
_MIN_SIZE = {**{t: s.size for t, s in _SCALARS.items()}, ValueType.STRING: 8, ValueType.ARRAY: 12}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor info record as stored (dims in GGML order)."""

    name: str
    dims: tuple[int, ...]
    ggml_type: GGMLType
    offset: int

    @property
    def dtype(self) -> str:
        return PLAIN_TYPES.get(self.ggml_type, self.ggml_type.name)

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch order: the reverse of GGML's."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, ValueType]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int


class _Cursor:
    """Reads GGUF primitives from a buffer, every length checked before it is used."""

    def __init__(self, buf: Any, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0
        self.walked = 0

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise TruncatedFileError(
                f"GGUF {what} at byte {self.pos} needs {n} bytes, the file has "
                f"{self.size - self.pos} left (truncated download?)",
                expected=self.pos + n,
                actual=self.size,
                path=self.path,
            )

    def scalar(self, kind: struct.Struct, what: str) -> Any:
        self.need(kind.size, what)
        (value,) = kind.unpack_from(self.buf, self.pos)
        self.pos += kind.size
        return value

    def u32(self, what: str) -> int:
        value: int = self.scalar(_U32, what)
        return value

    def u64(self, what: str) -> int:
        value: int = self.scalar(_U64, what)
        return value

    def string_length(self, what: str) -> int:
        length = self.u64(f"{what} length")
        if length > limits.MAX_GGUF_STRING:
            raise LimitExceededError(
                f"GGUF {what} length", limits.MAX_GGUF_STRING, length, path=self.path
            )
        self.need(length, what)
        return length

    def string(self, what: str, *, strict: bool = True) -> str:
        length = self.string_length(what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8", "strict" if strict else "replace")
        except UnicodeDecodeError:
            raise CorruptFileError(
                f"GGUF {what} at byte {self.pos - length} is not UTF-8", path=self.path
            ) from None

    def skip_strings(self, count: int, what: str) -> None:
        """Move past ``count`` strings without decoding them (tokenizer vocabularies)."""
        unpack, buf, pos, size = _U64.unpack_from, self.buf, self.pos, self.size
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"string length in {what}")
            pos += 8 + unpack(buf, pos)[0]
            if pos > size:
                raise TruncatedFileError(
                    f"GGUF string in {what} ends at byte {pos:,}, past the end of the "
                    f"{size:,}-byte file (truncated download?)",
                    expected=pos,
                    actual=size,
                    path=self.path,
                )
        self.pos = pos

    def value_type(self, what: str) -> ValueType:
        code = self.u32(f"{what} type")
        try:
            return ValueType(code)
        except ValueError:
            raise CorruptFileError(
                f"GGUF {what} has unknown value type {code}", path=self.path
            ) from None

    def value(self, kind: ValueType, what: str, depth: int = 0) -> Any:
        if kind == ValueType.STRING:
            return self.string(what, strict=False)
        if kind == ValueType.ARRAY:
            return self.array(what, depth + 1)
        value = self.scalar(_SCALARS[kind], what)
        return bool(value) if kind == ValueType.BOOL else value

    def array(self, what: str, depth: int) -> Any:
        if depth > limits.MAX_GGUF_ARRAY_DEPTH:
            raise LimitExceededError(
                f"GGUF {what} array nesting", limits.MAX_GGUF_ARRAY_DEPTH, depth, path=self.path
            )
        kind = self.value_type(f"{what} element")
        count = self.u64(f"{what} element count")
        self.need(count * _MIN_SIZE[kind], f"{what} ({count} elements of {kind.name})")
        kept = count if count <= ARRAY_ITEMS else ARRAY_HEAD
        if kind in _SCALARS:
            code = _SCALARS[kind].format[1:]
            items = list(struct.unpack_from(f"<{kept}{code}", self.buf, self.pos))
            if kind == ValueType.BOOL:
                items = [bool(v) for v in items]
            self.pos += count * _SCALARS[kind].size
        else:
            items = [self.value(kind, f"{what}[{i}]", depth) for i in range(kept)]
            self.walked += count
            if self.walked > limits.MAX_GGUF_WALKED:
                raise LimitExceededError(
                    "GGUF string and array elements in the header",
                    limits.MAX_GGUF_WALKED,
                    self.walked,
                    path=self.path,
                )
            if kind == ValueType.STRING:
                self.skip_strings(count - kept, what)
            else:
                for i in range(kept, count):
                    self.array(f"{what}[{i}]", depth + 1)
        if count <= ARRAY_ITEMS:
            return items
        return {"__array__": kind.name.lower(), "length": count, "head": items}


def sniff(probe: Probe) -> bool:
    return not probe.is_dir and probe.head.startswith(MAGIC)


def read_header(path: Path) -> Header:
    """The parsed header with every count, string, dim and tensor range checked."""
    size = path.stat().st_size
    if size < PREFIX:
        raise TruncatedFileError(
            f"GGUF file of {size} bytes is shorter than its magic and version",
            expected=PREFIX,
            actual=size,
            path=path,
        )
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse(_Cursor(buf, size, path))


def _parse(cur: _Cursor) -> Header:
    path = cur.path
    if bytes(cur.buf[:4]) != MAGIC:
        raise CorruptFileError("not a GGUF file (bad magic)", path=path)
    cur.pos = 4
    version = cur.u32("version")
    if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError("big-endian GGUF files are not supported", path=path)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"GGUF version {version} is not supported (modelport reads versions 2 and 3)",
            path=path,
        )
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("key/value count")
    least = tensor_count * MIN_TENSOR_INFO_BYTES + kv_count * MIN_KV_BYTES
    if least > cur.size - cur.pos:
        raise TruncatedFileError(
            f"GGUF header declares {tensor_count:,} tensors and {kv_count:,} key/value pairs, "
            f"which need at least {least:,} bytes; the file has {cur.size - cur.pos:,} left",
            expected=cur.pos + least,
            actual=cur.size,
            path=path,
        )
    metadata: dict[str, Any] = {}
    value_types: dict[str, ValueType] = {}
    for index in range(kv_count):
        key = cur.string(f"key #{index}")
        if key in metadata:
            raise CorruptFileError(f"GGUF key {key!r} appears twice", path=path)
        kind = cur.value_type(f"value of {key!r}")
        metadata[key] = cur.value(kind, f"value of {key!r}")
        value_types[key] = kind
    infos = [_tensor_info(cur, index) for index in range(tensor_count)]
    alignment = _alignment(metadata, value_types, path)
    data_offset = -(-cur.pos // alignment) * alignment
    _check_tensors(infos, alignment, data_offset, cur.size, path)
    return Header(version, metadata, value_types, tuple(infos), alignment, data_offset)


def _tensor_info(cur: _Cursor, index: int) -> TensorInfo:
    name = cur.string(f"tensor #{index} name")
    n_dims = cur.u32(f"tensor {name!r} n_dims")
    if n_dims > MAX_DIMS:
        raise CorruptFileError(
            f"GGUF tensor {name!r} has {n_dims} dims; GGML allows at most {MAX_DIMS}",
            path=cur.path,
        )
    dims = tuple(cur.u64(f"tensor {name!r} dim") for _ in range(n_dims))
    code = cur.u32(f"tensor {name!r} type")
    offset = cur.u64(f"tensor {name!r} offset")
    if any(d > MAX_DIM for d in dims):
        raise CorruptFileError(f"GGUF tensor {name!r} has a negative dim {dims}", path=cur.path)
    try:
        kind = GGMLType(code)
    except ValueError:
        raise UnsupportedDtypeError(
            f"{cur.path}: GGUF tensor {name!r} has GGML type {code}, which modelport does not "
            "know (removed or newer than this version)"
        ) from None
    return TensorInfo(name, dims, kind, offset)


def _alignment(metadata: dict[str, Any], types: dict[str, ValueType], path: Path) -> int:
    if ALIGNMENT_KEY not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata[ALIGNMENT_KEY]
    if types[ALIGNMENT_KEY] != ValueType.UINT32:
        raise CorruptFileError(f"GGUF {ALIGNMENT_KEY} must be a u32", path=path)
    if value <= 0 or value & (value - 1):
        raise CorruptFileError(
            f"GGUF {ALIGNMENT_KEY} is {value}, not a non-zero power of two", path=path
        )
    return int(value)


def _check_tensors(
    infos: list[TensorInfo], alignment: int, data_offset: int, size: int, path: Path
) -> None:
    seen: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for info in infos:
        if info.name in seen:
            raise CorruptFileError(f"GGUF tensor name {info.name!r} appears twice", path=path)
        seen.add(info.name)
        kind = dtypes.dtype(info.dtype)
        if kind.block is not None and info.dims and info.dims[0] % kind.block[0]:
            raise CorruptFileError(
                f"GGUF tensor {info.name!r}: row length {info.dims[0]} is not a whole number "
                f"of {info.dtype} blocks of {kind.block[0]}",
                path=path,
            )
        if info.offset % alignment:
            raise CorruptFileError(
                f"GGUF tensor {info.name!r}: offset {info.offset} is not a multiple of the "
                f"alignment {alignment}",
                path=path,
            )
        nbytes = kind.nbytes(math.prod(info.dims))
        end = data_offset + info.offset + nbytes
        if end > size:
            raise TruncatedFileError(
                f"GGUF tensor {info.name!r} ends at byte {end:,} of a {size:,}-byte file "
                "(truncated download?)",
                expected=end,
                actual=size,
                path=path,
            )
        if nbytes:
            spans.append((info.offset, info.offset + nbytes, info.name))
    position, previous = 0, ""
    for begin, end, name in sorted(spans):
        if begin < position:
            raise CorruptFileError(f"GGUF tensor {name!r} overlaps tensor {previous!r}", path=path)
        position, previous = end, name


def read(path: Path, probe: Probe) -> Contents:
    header = read_header(path)
    tree: dict[str, TensorRef] = {}
    for info in header.tensors:
        nbytes = dtypes.dtype(info.dtype).nbytes(math.prod(info.dims))
        storage = Storage(path, header.data_offset + info.offset, nbytes, key=info.name)
        tree[info.name] = TensorRef(info.dtype, info.shape, storage)
    architecture = header.metadata.get("general.architecture")
    details: dict[str, Any] = {
        "version": header.version,
        "alignment": header.alignment,
        "tensor_count": len(header.tensors),
        "kv_count": len(header.metadata),
        "architecture": architecture if isinstance(architecture, str) else None,
        "data_offset": header.data_offset,
    }
    nested, warnings = typed_json_decoding.restore(tree, header.metadata)
    metadata = header.metadata
    if nested is not None:
        details["tree"] = f"nested checkpoint restored from the {typed_json.KEY!r} metadata"
        metadata = {k: v for k, v in metadata.items() if k != typed_json.KEY}
    return Contents(
        Format.GGUF,
        tree if nested is None else nested,
        metadata=metadata,
        details=details,
        warnings=warnings,
    )


READER = FormatReader(Format.GGUF, sniff, read, (".gguf",), write=write_gguf, holds=holds)
