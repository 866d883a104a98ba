"""Legacy GGML files, the formats before GGUF: ``ggml``, ``ggmf``, ``ggjt`` and ``ggla``.

whisper.cpp, llama.cpp (until August 2023) and the ggml examples wrote a four-byte magic, a
header of int32 hparams whose fields each program chose, a vocabulary, then tensors to the
end of the file. ``_ggml_layouts`` lists the headers modelport knows and the element types
of each quantization era.

How a layout is chosen: the file has no field that names its program, so every known layout
for its magic is tried, and one is accepted only when its tensor table reads exactly to the
end of the file: hparams not negative, every token and name length in range, every name
printable UTF-8 and unique, 0 to 4 dims all positive, a type code known in the file's era,
quantized rows a whole number of blocks, and each tensor's data inside the file. When none
fits, the error says what each layout met; a ``TruncatedFileError`` when the layout that got
furthest ran out of bytes, else a ``CorruptFileError``.

Shapes: ggml stores dims innermost first (``ne[0]`` varies fastest), so a ``[out, in]``
torch weight is written ``ne = (in, out)``; shapes here are reversed back into numpy/torch
order, and the bytes are already C-contiguous in that order.

Element types: F32 and F16 read as numpy arrays; quantized blocks whose layout is GGUF's
(ggjt v3 and ``GGML_QNT_VERSION`` 2 files, Q5 from ggjt v2) keep their GGML names
(``Q4_0``, ``Q8_0``, ``Q6_K``), so ``convert --dequantize`` runs gguf-py's dequantizer on
them. Blocks of the older layouts are listed as ``uint8`` of shape ``(..., bytes per row)``
with a note naming the type; reading them raises ``UnsupportedDtypeError``, since neither
their values nor a byte copy would be what a loader of that era computed.

Whisper's mel filters are reported in ``details`` (shape and offset), not as a tensor.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from modelport.errors import (
    CorruptFileError,
    FormatError,
    TruncatedFileError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from modelport.formats._ggml_layouts import (
    ALIGNMENT,
    CONTAINERS,
    ERA_NAMES,
    LAYOUTS,
    MAGIC_GGJT,
    QNT_VERSION_FACTOR,
    VERSIONS,
    ElementType,
    Layout,
    Quantization,
    Vocab,
    element_type,
)
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import NDArray, Storage, TensorRef

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 4096  # llama.cpp's converters refuse longer names
MAX_TOKEN_BYTES = 1 << 16
MAX_MODEL_TYPE_BYTES = 256
MAX_LAYERS = 4096
MAX_TENSORS = 1_000_000
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")


class _Misfit(Exception):
    """Why one layout does not read the file: ``at`` is how far it got, ``needed`` the end
    of the bytes it wanted when the file stopped first."""

    def __init__(self, reason: str, at: int, needed: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.at = at
        self.needed = needed


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as stored: dims in GGML order (``ne[0]`` first), data at ``offset``."""

    name: str
    dims: tuple[int, ...]
    kind: ElementType
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/torch order: the reverse of GGML's."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class Header:
    """A legacy GGML file as its accepted layout reads it."""

    container: str
    version: int | None
    layout: Layout
    model_type: str | None  # the name a layout with ``model_type`` stores ("silero-16k")
    hparams: dict[str, int]
    era: Quantization | None
    vocab_size: int | None
    mel_filters: tuple[int, int, int] | None  # n_mel, n_fft, offset of the float32 values
    tensors: tuple[TensorEntry, ...]


class _Cursor:
    """int32 reads from the mapped file; running out of bytes is a misfit of the layout."""

    def __init__(self, buf: Any, size: int, start: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = start

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            left = self.size - self.pos
            raise _Misfit(
                f"{what} at byte {self.pos:,} needs {n:,} bytes, {left:,} left",
                self.pos,
                self.pos + n,
            )

    def i32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def fail(self, reason: str) -> NoReturn:
        raise _Misfit(reason, self.pos)


def sniff(probe: Probe) -> bool:
    return not probe.is_dir and probe.head[:4] in CONTAINERS


def read_header(path: Path) -> Header:
    """The file's header and tensor table, by the one known layout that reads it to its end."""
    size = path.stat().st_size
    if size < 8:
        raise TruncatedFileError(
            f"GGML file of {size} bytes is shorter than its magic and first field",
            expected=8,
            actual=size,
            path=path,
        )
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic = bytes(buf[:4])
        container = CONTAINERS[magic]
        version = None
        if magic in VERSIONS:
            (version,) = _U32.unpack_from(buf, 4)
            if version not in VERSIONS[magic]:
                known = ", ".join(str(v) for v in VERSIONS[magic])
                raise UnsupportedVersionError(
                    f"{container} version {version} is not one modelport reads ({known})",
                    path=path,
                )
        start = 4 if version is None else 8
        misfits: list[tuple[Layout, _Misfit]] = []
        for layout in (candidate for candidate in LAYOUTS if candidate.magic == magic):
            try:
                return _parse(_Cursor(buf, size, start), layout, container, version)
            except _Misfit as misfit:
                misfits.append((layout, misfit))
    raise _no_layout(container, version, misfits, size, path)


def _parse(cur: _Cursor, layout: Layout, container: str, version: int | None) -> Header:
    model_type = _name(cur, _model_type_length(cur), "model type") if layout.model_type else None
    hparams = _hparams(cur, layout)
    era = _era(cur, layout, version, hparams)
    mel = _mel_filters(cur) if layout.mel_filters else None
    vocab_size = _vocabulary(cur, layout, hparams)
    tensors = _tensors(cur, layout, era)
    return Header(container, version, layout, model_type, hparams, era, vocab_size, mel, tensors)


def _model_type_length(cur: _Cursor) -> int:
    length = cur.i32("model type length")
    if not 0 < length <= MAX_MODEL_TYPE_BYTES:
        cur.fail(f"model type of {length} bytes")
    return length


def _hparams(cur: _Cursor, layout: Layout) -> dict[str, int]:
    """The fixed hparams, then ``layer_hparams`` once per layer (``name.<layer>``, as many
    layers as the last fixed hparam says), then ``tail_hparams``; none may be negative."""
    hparams = {name: cur.i32(f"hparam {name}") for name in layout.hparams}
    if layout.layer_hparams:
        layers = hparams[layout.hparams[-1]]
        if not 0 <= layers <= MAX_LAYERS:
            cur.fail(f"hparam {layout.hparams[-1]} is {layers}")
        for layer in range(layers):
            for name in layout.layer_hparams:
                hparams[f"{name}.{layer}"] = cur.i32(f"hparam {name} of layer {layer}")
    hparams.update((name, cur.i32(f"hparam {name}")) for name in layout.tail_hparams)
    for name, value in hparams.items():
        if value < 0:
            cur.fail(f"hparam {name} is {value}")
    return hparams


def _era(
    cur: _Cursor, layout: Layout, version: int | None, hparams: dict[str, int]
) -> Quantization | None:
    """The block layouts the file's quantized tensors use (None: no quantized types)."""
    if layout.plain_only:
        return None
    if layout.magic == MAGIC_GGJT and version is not None:
        return Quantization(version - 1)
    if not layout.qnt_in_ftype:
        return Quantization.ORIGINAL
    qnt_version = hparams["ftype"] // QNT_VERSION_FACTOR
    if qnt_version not in tuple(Quantization):
        cur.fail(f"ftype {hparams['ftype']} names quantization version {qnt_version}")
    return Quantization(qnt_version)


def _mel_filters(cur: _Cursor) -> tuple[int, int, int]:
    n_mel = cur.i32("mel filter count")
    n_fft = cur.i32("mel filter length")
    if n_mel <= 0 or n_fft <= 0:
        cur.fail(f"mel filters of shape ({n_mel}, {n_fft})")
    offset = cur.pos
    cur.skip(n_mel * n_fft * 4, f"mel filters ({n_mel} x {n_fft} float32)")
    return n_mel, n_fft, offset


def _vocabulary(cur: _Cursor, layout: Layout, hparams: dict[str, int]) -> int | None:
    """Walks the tokens (kept as a count only); returns how many there are."""
    if layout.vocab is Vocab.NONE:
        return None
    count = cur.i32("vocabulary count") if layout.vocab is Vocab.COUNTED else hparams["n_vocab"]
    if count < 0:
        cur.fail(f"vocabulary count is {count}")
    score = 4 if layout.scores else 0
    cur.need(count * (4 + score), f"a vocabulary of {count:,} tokens")
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, _I32.unpack_from
    for index in range(count):
        if pos + 4 > size:
            cur.pos = pos
            cur.need(4, f"token #{index} length")
        (length,) = unpack(buf, pos)
        if not 0 <= length <= MAX_TOKEN_BYTES:
            cur.pos = pos
            cur.fail(f"token #{index} has length {length}")
        pos += 4 + length + score
    cur.pos = min(pos, size)
    if pos > size:
        raise _Misfit(f"the vocabulary ends at byte {pos:,}, past the file's end", cur.pos, pos)
    return count


def _tensors(cur: _Cursor, layout: Layout, era: Quantization | None) -> tuple[TensorEntry, ...]:
    entries: list[TensorEntry] = []
    names: set[str] = set()
    while cur.pos < cur.size:
        if len(entries) == MAX_TENSORS:
            cur.fail(f"more than {MAX_TENSORS:,} tensors")
        entry = _tensor(cur, layout, era, len(entries))
        if entry.name in names:
            cur.fail(f"tensor name {entry.name!r} appears twice")
        names.add(entry.name)
        entries.append(entry)
    return tuple(entries)


def _tensor(cur: _Cursor, layout: Layout, era: Quantization | None, index: int) -> TensorEntry:
    label = f"tensor #{index}"
    n_dims = cur.i32(f"{label} n_dims")
    name_length = cur.i32(f"{label} name length")
    code = cur.i32(f"{label} type")
    if not 0 <= n_dims <= MAX_DIMS:
        cur.fail(f"{label} has {n_dims} dims")
    if not 0 < name_length <= MAX_NAME_BYTES:
        cur.fail(f"{label} has a name of {name_length} bytes")
    dims = tuple(cur.i32(f"{label} dim") for _ in range(n_dims))
    if any(d <= 0 for d in dims):
        cur.fail(f"{label} has dims {list(dims)}")
    name = _name(cur, name_length, label)
    kind = element_type(code, era)
    if kind is None:
        era_name = "plain types only" if era is None else ERA_NAMES[era]
        cur.fail(f"tensor {name!r} has type code {code}, unknown in {era_name}")
    row = dims[0] if dims else 1
    if row % kind.block[0]:
        cur.fail(f"tensor {name!r}: row of {row} is not whole {kind.ggml_name} blocks")
    if layout.aligned:
        cur.skip(-cur.pos % ALIGNMENT, f"tensor {name!r} padding")
    nbytes = kind.nbytes(math.prod(dims))
    offset = cur.pos
    cur.skip(nbytes, f"tensor {name!r} data ({kind.ggml_name} {list(dims)})")
    return TensorEntry(name, dims, kind, offset, nbytes)


def _name(cur: _Cursor, length: int, label: str) -> str:
    cur.need(length, f"{label} name")
    raw = bytes(cur.buf[cur.pos : cur.pos + length])
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        cur.fail(f"{label} name {raw[:40]!r} is not UTF-8")
    if not name.isprintable():
        cur.fail(f"{label} name {name[:40]!r} is not printable")
    cur.pos += length
    return name


def _no_layout(
    container: str,
    version: int | None,
    misfits: list[tuple[Layout, _Misfit]],
    size: int,
    path: Path,
) -> FormatError:
    """The error when no layout reads the file: what each met, typed by the one that got
    furthest (truncated when it ran out of bytes)."""
    tried = "; ".join(f"{_label(layout)}: {misfit.reason}" for layout, misfit in misfits)
    named = container if version is None else f"{container} v{version}"
    message = f"no known {named} layout reads this file to its end (tried {tried})"
    _, furthest = max(misfits, key=lambda item: item[1].at)
    if furthest.needed is not None:
        return TruncatedFileError(
            f"{message}; truncated download?", expected=furthest.needed, actual=size, path=path
        )
    return CorruptFileError(message, path=path)


def _label(layout: Layout) -> str:
    return f"{layout.name} ({len(layout.hparams)} hparams)"


def _tensor_ref(path: Path, entry: TensorEntry) -> TensorRef:
    kind = entry.kind
    if kind.dtype is not None:
        storage = Storage(path, entry.offset, entry.nbytes, key=entry.name)
        return TensorRef(kind.dtype, entry.shape, storage)
    blocks = f"{kind.ggml_name} blocks in the {kind.era}"

    def refuse() -> NDArray:
        raise UnsupportedDtypeError(
            f"{path}: tensor {entry.name!r} holds {blocks}, a layout no GGUF type shares: "
            "modelport neither dequantizes nor copies them (requantize from the original "
            "weights with a current llama.cpp or whisper.cpp)"
        )

    row_bytes = kind.nbytes(entry.dims[0] if entry.dims else 1)
    storage = Storage(path, entry.offset, entry.nbytes, key=entry.name, reader=refuse)
    note = f"{blocks}, shown as bytes per row; not readable"
    return TensorRef("uint8", (*entry.shape[:-1], row_bytes), storage, note=note)


def read(path: Path, probe: Probe) -> Contents:
    header = read_header(path)
    tree = {entry.name: _tensor_ref(path, entry) for entry in header.tensors}
    metadata: dict[str, Any] = dict(header.hparams)
    if header.model_type is not None:
        metadata["model_type"] = header.model_type
    if header.vocab_size is not None:
        metadata["vocab_size"] = header.vocab_size
    quantized = [e for e in header.tensors if e.kind.block[0] > 1]
    details: dict[str, Any] = {
        "container": header.container,
        **({} if header.version is None else {"version": header.version}),
        "layout": header.layout.name,
        "tensor_count": len(header.tensors),
        "vocab_scores": header.layout.scores,
    }
    if quantized and header.era is not None:
        details["quantization"] = ERA_NAMES[header.era]
    if header.mel_filters is not None:
        n_mel, n_fft, offset = header.mel_filters
        details["mel_filters"] = {"shape": [n_mel, n_fft], "dtype": "float32", "offset": offset}
    unreadable = sorted({e.kind.ggml_name for e in quantized if e.kind.dtype is None})
    warnings = []
    if unreadable:
        warnings.append(
            f"{', '.join(unreadable)} blocks in a layout older than GGUF's: listed as bytes per "
            "row, neither dequantized nor converted"
        )
    return Contents(Format.GGML, tree, metadata=metadata, details=details, warnings=warnings)


READER = FormatReader(Format.GGML, sniff, read, (".bin", ".ggml"))
