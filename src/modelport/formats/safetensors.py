"""safetensors: an 8-byte header length, a JSON header, then the tensor bytes.

Layout (huggingface/safetensors README, "Format"):

- bytes 0..8 MUST be ``N``, a little-endian u64;
- the next ``N`` bytes MUST be a UTF-8 JSON object mapping each tensor name to
  ``{"dtype", "shape", "data_offsets": [begin, end]}``, offsets relative to the byte buffer
  that follows the header; an optional ``"__metadata__"`` maps strings to strings;
- the byte buffer MUST be covered exactly: offsets in order, no overlap, no holes;
- a tensor's span MUST equal ``prod(shape) * itemsize``; empty and 0-d tensors are allowed.

Everything is checked before a byte of tensor data is touched.

modelport's writer MAY add ``"modelport.tree"`` to ``__metadata__`` (``convert --all`` of a
nested checkpoint): the checkpoint's structure and non-tensor values as typed JSON
(``typed_json``), its tensors named by their keys here. The reader then returns that nested
tree; when the entry is malformed or does not place exactly this file's tensors, the flat
tensors are returned with a warning, as any other reader of the format would see them.
"""

from __future__ import annotations

import gc
import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from modelport import dtypes, limits
from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import Storage, TensorRef
from modelport.transfer.streaming import write_all, write_tensor
from modelport.transfer.write_plan import WritePlan
from modelport.tree import typed_json, typed_json_decoding

METADATA_KEY = "__metadata__"


def sniff(probe: Probe) -> bool:
    if probe.is_dir or len(probe.head) < 9:
        return False
    (length,) = struct.unpack("<Q", probe.head[:8])
    if 2 <= length <= limits.MAX_SAFETENSORS_HEADER and probe.size < 8 + length:
        return _opens_json_object(probe.head[8:])  # cut inside its header: read says so
    start = probe.head[8:10].lstrip(b" ")[:1]
    return (
        2 <= length <= limits.MAX_SAFETENSORS_HEADER
        and start == b"{"
        and _header_looks_like_json(probe.head[8:])
    )


def _opens_json_object(text: bytes) -> bool:
    """``{`` then a key's quote or the closing brace, or nothing more: the start of a header."""
    stripped = text.lstrip(b" ")
    return stripped[:1] == b"{" and stripped[1:].lstrip(b" \t\r\n")[:1] in (b'"', b"}", b"")


def _header_looks_like_json(text: bytes) -> bool:
    stripped = text.lstrip(b" ")
    return stripped.startswith(b"{") and (
        b'"dtype"' in stripped[:4096]
        or stripped.startswith(b"{}")
        or b"__metadata__" in stripped[:4096]
    )


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the byte buffer, parsed header), with every size checked against the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise TruncatedFileError(
                "safetensors file shorter than its 8-byte header length",
                expected=8,
                actual=len(prefix),
                path=path,
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > limits.MAX_SAFETENSORS_HEADER:
            raise LimitExceededError(
                "safetensors header length", limits.MAX_SAFETENSORS_HEADER, length, path=path
            )
        if 8 + length > size:
            raise TruncatedFileError(
                f"safetensors header claims {length} bytes but the file has {size - 8} after "
                "the length field (truncated download?)",
                expected=8 + length,
                actual=size,
                path=path,
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"safetensors header is not valid JSON ({exc})", path=path) from None
    if not isinstance(header, dict):
        raise CorruptFileError("safetensors header is not a JSON object", path=path)
    return 8 + length, header


@contextmanager
def _collector_paused() -> Iterator[None]:
    """A header of a million entries makes millions of small objects that form no cycles;
    Python's cycle collector would walk them again and again, a third of the reading time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read(path: Path, probe: Probe) -> Contents:
    with _collector_paused():
        return _read(path, probe)


def _read(path: Path, probe: Probe) -> Contents:
    data_start, header = read_header(path)
    data_size = probe.size - data_start
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError("safetensors __metadata__ must map strings to strings", path=path)
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorRef] = {}
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(name, entry, path)
        storage = Storage(path, data_start + begin, end - begin, key=name)
        tensor = TensorRef(dtype, tuple(shape), storage)
        if end - begin != tensor.nbytes:
            raise CorruptFileError(
                f"tensor {name!r}: shape {shape} of {dtype} needs {tensor.nbytes} bytes, "
                f"data_offsets span {end - begin}",
                path=path,
            )
        if end > data_size:
            raise TruncatedFileError(
                f"tensor {name!r} ends at byte {data_start + end} of a {probe.size}-byte file "
                "(truncated download?)",
                expected=data_start + end,
                actual=probe.size,
                path=path,
            )
        spans.append((begin, end, name))
        tensors[name] = tensor
    _check_coverage(spans, data_size, path)
    ordered = {name: tensors[name] for _, _, name in sorted(spans)}
    tree, warnings = typed_json_decoding.restore(ordered, metadata)
    # ``save_model`` (and modelport) store a tied tensor once and record ``alias -> kept`` in
    # the metadata: restore the alias as the same tensor, so both names share storage again.
    for alias, kept in metadata.items():
        if alias not in ordered and kept in ordered and "." in alias and " " not in alias:
            ordered[alias] = ordered[kept]
    details: dict[str, Any] = {"header_bytes": data_start - 8}
    if tree is not None:
        details["tree"] = f"nested checkpoint restored from the {typed_json.KEY!r} metadata"
    return Contents(
        Format.SAFETENSORS,
        ordered if tree is None else tree,
        metadata={k: v for k, v in metadata.items() if tree is None or k != typed_json.KEY},
        details=details,
        warnings=warnings,
    )


def _entry(name: str, entry: Any, path: Path) -> tuple[str, list[int], int, int]:
    """One header entry, checked field by field (exact types: a bool is no int here, as in
    the reference library); run once per tensor, so kept to plain comparisons."""
    if type(entry) is not dict:
        raise CorruptFileError(f"tensor {name!r}: header entry is not an object", path=path)
    code = entry.get("dtype")
    dtype = dtypes.SAFETENSORS_CODES.get(code) if type(code) is str else None
    if dtype is None:
        raise CorruptFileError(f"tensor {name!r}: unknown dtype {code!r}", path=path)
    shape = entry.get("shape")
    if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
        raise CorruptFileError(
            f"tensor {name!r}: shape must be a list of non-negative ints", path=path
        )
    offsets = entry.get("data_offsets")
    if type(offsets) is not list or len(offsets) != 2:
        raise CorruptFileError(f"tensor {name!r}: data_offsets must be [begin, end]", path=path)
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
        raise CorruptFileError(f"tensor {name!r}: data_offsets must be [begin, end]", path=path)
    return dtype, shape, begin, end


def _check_coverage(spans: list[tuple[int, int, str]], data_size: int, path: Path) -> None:
    """The tensors cover the byte buffer exactly, to the end of the file, as the reference
    loader requires (it refuses a file with bytes after the last tensor)."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            raise CorruptFileError(f"tensor {name!r} overlaps the tensor before it", path=path)
        if begin > position:
            raise CorruptFileError(
                f"hole of {begin - position} bytes before tensor {name!r}", path=path
            )
        position = end
    if position != data_size:
        raise CorruptFileError(
            f"{data_size - position} bytes after the last tensor: the file is not covered by "
            "its header (safetensors refuses it too)",
            path=path,
        )


_CODES = {name: code for code, name in dtypes.SAFETENSORS_CODES.items()}


def holds(dtype: str) -> bool:
    return dtype in _CODES


def header_bytes(plan: WritePlan) -> bytes:
    """The header for ``plan``: tensors back to back in plan order, padded with spaces to a
    multiple of 8 bytes as the reference writer does (so the data section stays aligned)."""
    header: dict[str, Any] = {}
    if plan.metadata:
        header[METADATA_KEY] = plan.metadata
    offset = 0
    for tensor in plan.tensors:
        header[tensor.name] = {
            "dtype": _CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write(handle: BinaryIO, plan: WritePlan) -> None:
    write_all(handle, header_bytes(plan))
    for tensor in plan.tensors:
        write_tensor(handle, tensor)


READER = FormatReader(
    Format.SAFETENSORS,
    sniff,
    read,
    (".safetensors", ".sft"),
    write=write,
    holds=holds,
    records_aliases=True,
)
