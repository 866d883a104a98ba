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

import functools
import importlib
import json
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
)
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import Storage, TensorRef, collector_paused

METADATA_KEY = "__metadata__"
# ``tree.typed_json.KEY``: the nested tree's entry. Its decoder (and the pickle records it
# rebuilds) is imported only for a file that has one, so reading a plain file imports neither.
TREE_KEY = "modelport.tree"


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
    data_start, text = _header_text(path)
    return data_start, _parsed(text, path)


def _header_text(path: Path) -> tuple[int, str]:
    """(offset of the byte buffer, the header as text), its length checked against the file."""
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
        return 8 + length, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"safetensors header is not valid JSON ({exc})", path=path) from None


def _parsed(text: str, path: Path) -> dict[str, Any]:
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"safetensors header is not valid JSON ({exc})", path=path) from None
    if not isinstance(header, dict):
        raise CorruptFileError("safetensors header is not a JSON object", path=path)
    return header


class _Irregular(Exception):
    """The header is not one JSON object of distinct keys, well formed: read it whole."""


_WS = "[ \t\n\r]*"  # JSON's whitespace, as the json module skips it
_SPACE = re.compile(_WS)
_INT = "(0|[1-9][0-9]*)"  # a non-negative JSON integer
# One entry as writers lay it out (fields in the reference's order), with what follows it;
# any other spelling of an entry is parsed by the json module instead.
_PLAIN_ENTRY = (
    rf'"([^"\\\x00-\x1f]*)"{_WS}:{_WS}\{{{_WS}"dtype"{_WS}:{_WS}"([A-Za-z0-9_]*)"{_WS},{_WS}'
    rf'"shape"{_WS}:{_WS}\[{_WS}((?:{_INT}(?:{_WS},{_WS}{_INT})*)?){_WS}\]{_WS},{_WS}'
    rf'"data_offsets"{_WS}:{_WS}\[{_WS}{_INT}{_WS},{_WS}{_INT}{_WS}\]{_WS}\}}{_WS}([,}}]){_WS}'
)
# Headers from this size on are read entry by entry (``_streamed``); a smaller one is parsed
# whole, which is faster, holds a few megabytes at most, and needs no ``_PLAIN_ENTRY``
# compiled (that costs more than reading a small file's whole header).
STREAMED_FROM = 1 << 20
# The json module's own scanners (C), which its stubs leave out: one string, one value.
_SCAN_STRING: Callable[[str, int], tuple[str, int]] = vars(json.decoder)["scanstring"]
_SCAN: Callable[[str, int], tuple[Any, int]] = vars(json.JSONDecoder())["scan_once"]


def _skipped(text: str, at: int) -> int:
    """Where the whitespace from ``at`` ends."""
    found = _SPACE.match(text, at)
    return found.end() if found is not None else at


@functools.cache
def _plain_entry() -> re.Pattern[str]:
    return re.compile(_PLAIN_ENTRY)


def _streamed(text: str) -> Iterator[tuple[str, Any]]:
    """The header's entries one at a time, as ``json.loads`` would give them: parsed whole,
    a million-tensor header is a gigabyte of small dicts and lists; one at a time, each is
    dropped once its tensor is made. An entry laid out as writers lay it out comes as the
    tuple ``(dtype code, shape, begin, end)``, which no JSON value is. Anything irregular
    (bad JSON, not an object) raises ``_Irregular``, and the caller reads the header whole,
    for its exact error."""
    space, plain = _skipped, _plain_entry().match
    end = space(text, 0)
    if text[end : end + 1] != "{":
        raise _Irregular
    end = space(text, end + 1)
    closing = text[end : end + 1] == "}"
    while not closing:
        found = plain(text, end)
        if found is not None:
            name, code, dims, _, _, begin, stop, separator = found.groups()
            shape = [int(n) for n in dims.split(",")] if dims else []
            yield name, (code, shape, int(begin), int(stop))
            end, closing = found.end(), separator == "}"
            continue
        try:
            if text[end : end + 1] != '"':
                raise _Irregular
            name, end = _SCAN_STRING(text, end + 1)
            end = space(text, end)
            if text[end : end + 1] != ":":
                raise _Irregular
            value, end = _SCAN(text, space(text, end + 1))
        except (StopIteration, ValueError, RecursionError):
            raise _Irregular from None
        yield name, value
        end = space(text, end)
        separator = text[end : end + 1]
        if separator not in (",", "}"):
            raise _Irregular
        closing = separator == "}"
        end = space(text, end + 1)
    if end != len(text):
        raise _Irregular


def read(path: Path, probe: Probe) -> Contents:
    return read_tensors(path, probe)[0]


def read_tensors(path: Path, probe: Probe) -> tuple[Contents, dict[str, TensorRef]]:
    """The contents, and the tensors under the names the header gives them (aliases
    included), whatever tree the metadata restores."""
    with collector_paused():
        return _read(path, probe)


def _read(path: Path, probe: Probe) -> tuple[Contents, dict[str, TensorRef]]:
    data_start, text = _header_text(path)
    found = None
    if len(text) >= STREAMED_FROM:
        try:
            found = _tensors(_streamed(text), path, data_start, probe.size)
        except (_Irregular, ModelportError):  # read whole, the errors come in the usual order
            found = None
    if found is None:
        header = _parsed(text, path)
        metadata = header.pop(METADATA_KEY, None) or {}
        _check_metadata(metadata, path)
        found = _tensors(iter(header.items()), path, data_start, probe.size, metadata)
    del text
    tensors, metadata, ordered_by_offset = found
    data_size = probe.size - data_start
    if ordered_by_offset:
        _check_coverage(_spans(tensors, data_start), data_size, path)
        ordered = tensors
    else:
        spans = sorted(_spans(tensors, data_start))
        _check_coverage(spans, data_size, path)
        ordered = {name: tensors[name] for _, _, name in spans}
    tree, warnings = _restored(ordered, metadata)
    # ``save_model`` (and modelport) store a tied tensor once and record ``alias -> kept`` in
    # the metadata: restore the alias as the same tensor, so both names share storage again.
    for alias, kept in metadata.items():
        if alias not in ordered and kept in ordered and "." in alias and " " not in alias:
            ordered[alias] = ordered[kept]
    details: dict[str, Any] = {"header_bytes": data_start - 8}
    if tree is not None:
        details["tree"] = f"nested checkpoint restored from the {TREE_KEY!r} metadata"
    contents = Contents(
        Format.SAFETENSORS,
        ordered if tree is None else tree,
        metadata={k: v for k, v in metadata.items() if tree is None or k != TREE_KEY},
        details=details,
        warnings=warnings,
    )
    return contents, ordered


def _restored(tensors: dict[str, TensorRef], metadata: dict[str, Any]) -> tuple[Any, list[str]]:
    """``typed_json_decoding.restore``, for a file whose metadata holds a tree."""
    if TREE_KEY not in metadata:
        return None, []
    decoding = importlib.import_module("modelport.tree.typed_json_decoding")
    restored: tuple[Any, list[str]] = decoding.restore(tensors, metadata)
    return restored


def _check_metadata(metadata: Any, path: Path) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError("safetensors __metadata__ must map strings to strings", path=path)


def _tensors(
    entries: Iterator[tuple[str, Any]],
    path: Path,
    data_start: int,
    size: int,
    metadata: dict[str, str] | None = None,
) -> tuple[dict[str, TensorRef], dict[str, str], bool]:
    """(the tensors in header order, the metadata, whether that order is also the order of
    their bytes), each entry checked against the file. Given no ``metadata``, it is taken
    from among the entries, and a repeated key raises ``_Irregular``."""
    streamed = metadata is None
    tensors: dict[str, TensorRef] = {}
    data_size = size - data_start
    last = (-1, -1, "")
    in_order = True
    for name, entry in entries:
        if streamed and (name in tensors or (name == METADATA_KEY and metadata is not None)):
            raise _Irregular
        if streamed and name == METADATA_KEY:
            metadata = entry or {}
            _check_metadata(metadata, path)
            continue
        dtype, shape, begin, end = _entry(name, entry, path)
        tensor = TensorRef(
            dtype, tuple(shape), Storage(path, data_start + begin, end - begin, name)
        )
        if end - begin != tensor.nbytes:
            raise CorruptFileError(
                f"tensor {name!r}: shape {shape} of {dtype} needs {tensor.nbytes} bytes, "
                f"data_offsets span {end - begin}",
                path=path,
            )
        if end > data_size:
            raise TruncatedFileError(
                f"tensor {name!r} ends at byte {data_start + end} of a {size}-byte file "
                "(truncated download?)",
                expected=data_start + end,
                actual=size,
                path=path,
            )
        if in_order:
            span = (begin, end, name)
            in_order = span > last
            last = span
        tensors[name] = tensor
    return tensors, metadata or {}, in_order


def _spans(tensors: dict[str, TensorRef], data_start: int) -> Iterator[tuple[int, int, str]]:
    """(begin, end, name) of each tensor in the byte buffer, in the order of ``tensors``."""
    for name, tensor in tensors.items():
        storage = tensor.storage
        assert storage is not None  # every safetensors tensor has its bytes
        begin = storage.offset - data_start
        yield begin, begin + storage.nbytes, name


def _entry(name: str, entry: Any, path: Path) -> tuple[str, list[int], int, int]:
    """One header entry, checked field by field (exact types: a bool is no int here, as in
    the reference library); run once per tensor, so kept to plain comparisons. A tuple is an
    entry ``_streamed`` matched as writers lay it out, its numbers already checked."""
    if type(entry) is tuple:
        code, shape, begin, end = entry
        dtype = dtypes.SAFETENSORS_CODES.get(code)
        if dtype is not None and begin <= end:
            return dtype, shape, begin, end
        entry = {"dtype": code, "shape": shape, "data_offsets": [begin, end]}
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


def _check_coverage(spans: Iterable[tuple[int, int, str]], data_size: int, path: Path) -> None:
    """The tensors, given in the order of their bytes, cover the byte buffer exactly, to the
    end of the file, as the reference loader requires (it refuses a file with bytes after the
    last tensor)."""
    position = 0
    for begin, end, name in spans:
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


# modelport's dtype name -> the header's code, for the writer
CODES = {name: code for code, name in dtypes.SAFETENSORS_CODES.items()}


def holds(dtype: str) -> bool:
    return dtype in CODES


# The writer (``safetensors_writer.WRITER``, found through the registry) lives apart, so that
# reading or scanning a file imports none of the byte movers.
READER = FormatReader(
    Format.SAFETENSORS,
    sniff,
    read,
    (".safetensors", ".sft"),
    holds=holds,
    records_aliases=True,
)
