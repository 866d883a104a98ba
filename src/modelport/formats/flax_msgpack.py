"""Flax ``flax_model.msgpack``: a state dict packed with MessagePack, arrays as ext values.

What ``flax.serialization.to_bytes`` / ``msgpack_serialize`` write (and transformers'
``save_pretrained`` of a Flax model):

- the file MUST be one MessagePack value: a map, the model's state dict. Keys are strings
  (``to_state_dict`` turns list and tuple positions into ``"0"``, ``"1"``, ...); values are
  maps, arrays and Python scalars;
- ext type 1 is an array: its payload is MessagePack again, a 3-array of the shape (an array
  of ints), numpy's dtype name (``"float32"``, ``"bfloat16"``) as a str, and the C-order
  bytes as a bin, in the writer's byte order (little-endian wherever flax runs);
- ext type 2 is a Python complex: the payload packs ``(real, imag)``;
- ext type 3 is a numpy scalar, packed as an array of shape ``()``;
- an array of more than ``2**30`` bytes is chunked: a map
  ``{"__msgpack_chunked_array__": true, "shape": {"0": d0, ...}, "chunks": {"0": <ext 1>,
  ...}}`` whose chunks are 1-d pieces of the flattened array, in order.

Choices and edge cases:

- names join the keys with ``.`` (``params.Dense_0.kernel``), as modelport names every
  nested tree and as transformers' Flax-to-PyTorch conversion joins a flattened Flax key
  before renaming ``kernel``/``scale``/``embedding`` to ``weight``; ``flatten_dict`` keys
  are the same parts, ``/``-joined by Orbax and t5x;
- arrays are ``TensorRef`` views of their bytes in the file, nothing copied; a chunked
  array is read chunk by chunk into one buffer when its values are asked for;
- numpy scalars are 0-d tensors, complex numbers stay Python complex numbers, an ext type
  flax does not write is kept as an ``UnknownExt`` record, with a warning;
- dtype names modelport has no type for (``int4``, strings) are ``UnsupportedDtypeError``;
- bytes after the map are ignored, with a warning (``msgpack_restore`` refuses them);
- the sniffer is strict: a map whose first key is a str, holding an ext-1 array whose
  header parses within the first bytes of the file.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Final

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
    UnsupportedDtypeError,
)
from modelport.formats import _msgpack
from modelport.formats._msgpack import Buffer, Kind
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import NDArray, Storage, TensorRef

CHUNKED_MARKER: Final = "__msgpack_chunked_array__"
# numpy dtype names that are modelport dtype names too.
DTYPE_NAMES: Final = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "complex128",
        "complex64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint64",
        "uint32",
        "uint16",
        "uint8",
        "bool",
    }
)
_MAX_DTYPE_NAME: Final = 64
_LISTED_KEYS: Final = 20


class FlaxExt(IntEnum):
    """flax.serialization's ``_MsgpackExtType``."""

    NDARRAY = 1
    NATIVE_COMPLEX = 2
    NPSCALAR = 3


@dataclass(frozen=True)
class ArrayHeader:
    """An ext-1 or ext-3 payload's header: the array's bytes lie at ``offset`` in the file."""

    shape: tuple[int, ...]
    dtype_name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class UnknownExt:
    """An ext value of a type flax does not write, kept as what ``msgpack`` would return."""

    code: int
    length: int

    def __repr__(self) -> str:
        return f"<msgpack ext type {self.code}, {self.length:,} bytes>"


def array_header(buf: Buffer, start: int, length: int, available: int) -> ArrayHeader:
    """The (shape, dtype name, data) header of the ext payload ``buf[start:start+length]``;
    only ``buf[:available]`` need be there (a sniffer's head), the data never is read."""
    stop = start + length
    end = min(stop, available)
    outer = _msgpack.token_at(buf, start, end, whole=False)
    dims = _msgpack.token_at(buf, outer.end, end, whole=False)
    if outer.kind is not Kind.ARRAY or outer.size != 3 or dims.kind is not Kind.ARRAY:
        raise CorruptFileError(
            f"array at offset {start:,}: the payload must pack (shape, dtype name, bytes)"
        )
    if dims.size > limits.MAX_RANK:
        raise LimitExceededError(
            f"rank of the array at offset {start:,}", limits.MAX_RANK, dims.size
        )
    decoder = _msgpack.Decoder(buf, end, _nested_ext, budget=limits.MAX_RANK + 2)
    shape, pos = decoder.value(outer.end)
    if not all(type(n) is int and n >= 0 for n in shape):
        raise CorruptFileError(f"array at offset {start:,}: shape {shape!r:.80} is not sizes")
    name, pos = decoder.value(pos)
    if isinstance(name, bytes):  # msgpack's raw mode, or an old writer without a str type
        name = name.decode("ascii", "replace")
    if not isinstance(name, str) or len(name) > _MAX_DTYPE_NAME:
        raise CorruptFileError(f"array at offset {start:,}: dtype name {name!r:.80} not a name")
    data = _msgpack.token_at(buf, pos, end, whole=False)
    if data.kind is not Kind.BIN or data.end + data.size != stop:
        raise CorruptFileError(
            f"array at offset {start:,}: its bytes must be a bin ending where the ext ends"
        )
    return ArrayHeader(tuple(shape), name, data.end, data.size)


def _nested_ext(code: int, offset: int, length: int) -> Any:
    raise CorruptFileError(f"ext value at offset {offset:,} inside an array's header")


def sniff(probe: Probe) -> bool:
    if probe.is_dir or not probe.head:
        return False
    head = probe.head
    try:
        walk = _msgpack.tokens(head, 0, len(head))
        root, first_key = next(walk), next(walk)
        if root.kind is not Kind.MAP or first_key.kind is not Kind.STR:
            return False
        for token in walk:
            if token.kind is Kind.EXT and token.value == FlaxExt.NDARRAY:
                array_header(head, token.end, token.size, len(head))
                return True  # an array cut by the file's end is for the reader to name
    except (ModelportError, StopIteration):
        return False
    return False


class _TreeBuilder:
    """Turns the decoded map into the state dict with ``TensorRef`` leaves."""

    def __init__(self, path: Path, buf: Buffer) -> None:
        self.path = path
        self.buf = buf
        self.unknown: set[int] = set()
        self.chunked = 0

    def ext(self, code: int, offset: int, length: int) -> Any:
        if code in (FlaxExt.NDARRAY, FlaxExt.NPSCALAR):
            return array_header(self.buf, offset, length, offset + length)
        if code == FlaxExt.NATIVE_COMPLEX:
            pair, end = _msgpack.decode(self.buf, _nested_ext, start=offset, end=offset + length)
            numbers = (int, float)
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(x, numbers) for x in pair)
                and end == offset + length
            ):
                raise CorruptFileError(f"complex at offset {offset:,} is not (real, imag)")
            return complex(pair[0], pair[1])
        self.unknown.add(code)
        return UnknownExt(code, length)

    def resolve(self, value: Any, name: str) -> Any:
        """``value`` with arrays as tensors named ``name`` and below (depth is bounded by
        the decoder's)."""
        if isinstance(value, ArrayHeader):
            return self.tensor(value, name)
        if isinstance(value, dict):
            if CHUNKED_MARKER in value:
                return self.unchunk(value, name)
            return {k: self.resolve(v, _join(name, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, _join(name, i)) for i, v in enumerate(value)]
        return value

    def tensor(self, header: ArrayHeader, name: str) -> TensorRef:
        if header.dtype_name not in DTYPE_NAMES:
            raise UnsupportedDtypeError(
                f"{self.path}: {name} has numpy dtype {header.dtype_name!r}, which modelport "
                "has no tensor type for"
            )
        itemsize = dtypes.dtype(header.dtype_name).itemsize
        if math.prod(header.shape) * itemsize != header.nbytes:
            raise CorruptFileError(
                f"{name}: {header.nbytes:,} bytes do not hold a {header.dtype_name} array of "
                f"shape {list(header.shape)}",
                path=self.path,
            )
        storage = Storage(self.path, header.offset, header.nbytes, key=name)
        return TensorRef(header.dtype_name, header.shape, storage)

    def unchunk(self, record: dict[Any, Any], name: str) -> TensorRef:
        """The array flax split into 1-d chunks, as one tensor over the chunks' bytes."""
        shape = _positional(record.get("shape"), f"{name}.shape", self.path)
        chunks = _positional(record.get("chunks"), f"{name}.chunks", self.path)
        pieces = [
            self.tensor(chunk, f"{name}.chunks.{i}")
            for i, chunk in enumerate(chunks)
            if isinstance(chunk, ArrayHeader) and len(chunk.shape) == 1
        ]
        kinds = {piece.dtype for piece in pieces}
        valid_shape = all(type(n) is int and n >= 0 for n in shape)
        if len(pieces) != len(chunks) or len(kinds) != 1 or not valid_shape:
            raise CorruptFileError(
                f"{name}: a chunked array needs a shape of sizes and 1-d chunks of one dtype",
                path=self.path,
            )
        dtype = kinds.pop()
        total = sum(piece.nbytes for piece in pieces)
        if math.prod(shape) * dtypes.dtype(dtype).itemsize != total:
            raise CorruptFileError(
                f"{name}: chunks of {total:,} bytes do not hold a {dtype} array of shape {shape}",
                path=self.path,
            )
        parts = [piece.storage for piece in pieces if piece.storage is not None]

        def joined() -> NDArray:
            import numpy as np

            return np.concatenate([part.bytes_view() for part in parts])

        self.chunked += 1
        storage = Storage(self.path, parts[0].offset, total, key=name, reader=joined)
        return TensorRef(dtype, tuple(shape), storage)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _positional(value: Any, name: str, path: Path) -> list[Any]:
    """The values of a map keyed ``"0"``, ``"1"``, ...: how flax stores a tuple."""
    if not isinstance(value, dict) or set(value) != {str(i) for i in range(len(value))}:
        raise CorruptFileError(f"{name} must be a map keyed 0, 1, 2, ...", path=path)
    return [value[str(i)] for i in range(len(value))]


def read(path: Path, probe: Probe) -> Contents:
    if probe.size == 0:
        raise TruncatedFileError("empty file", expected=1, actual=0, path=path)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        builder = _TreeBuilder(path, view)
        root, end = _msgpack.decode(view, builder.ext)
        if not isinstance(root, dict):
            raise CorruptFileError(f"a flax state dict is a map, not a {type(root).__name__}")
        tree = builder.resolve(root, "")
        size = len(view)
    warnings = []
    if end < size:
        warnings.append(f"{size - end:,} bytes after the state dict are ignored")
    if builder.unknown:
        codes = ", ".join(str(code) for code in sorted(builder.unknown))
        warnings.append(f"ext types flax does not write ({codes}) are kept as opaque records")
    details: dict[str, Any] = {"top_level_keys": [str(k) for k in list(root)[:_LISTED_KEYS]]}
    if builder.chunked:
        details["chunked_arrays"] = builder.chunked
    return Contents(Format.FLAX_MSGPACK, tree, details=details, warnings=warnings)


READER = FormatReader(Format.FLAX_MSGPACK, sniff, read, (".msgpack",))
