"""``modelport.convert``: any readable weights file into a writable format, verified.

The path: open the source (headers only) and scan it; choose the tensors (the shared
weights rule, or ``extract`` / ``take_all``, then include/exclude globs); rename; decide
each output dtype (floating tensors only are cast); store tied tensors once where the
target cannot share storage; refuse anything the target cannot hold. Only then is a byte
written: into a temporary file beside the target, streamed tensor by tensor in bounded
memory. The temporary file is read back and compared with the source chunk by chunk
before it is renamed into place, so a failed, interrupted or unverified conversion leaves
nothing behind, and an existing file is never replaced unless asked.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelport import dtypes
from modelport import tree as trees
from modelport._version import __version__
from modelport.api import check_safety
from modelport.api import open as open_model
from modelport.detect import detect
from modelport.errors import ConversionError, VerificationError
from modelport.formats import READERS, FormatReader
from modelport.formats._base import WritePlan
from modelport.streaming import OutputTensor, cast_chunk, paired_chunks
from modelport.tensors import TensorRef

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
TARGETS = {"safetensors": "safetensors", "torch": "torch-zip", "npz": "npz", "gguf": "gguf"}
CASTS = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ConvertOptions:
    to: str | None = None
    dtype: str | None = None
    extract: str | None = None
    take_all: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    strip_prefix: str | None = None  # a literal prefix, or "auto"
    add_prefix: str | None = None
    renames: tuple[tuple[str, str], ...] = ()
    materialize_ties: bool = False
    ema: bool = False
    overwrite: bool = False
    fsync: bool = False
    verify: bool = True
    dry_run: bool = False
    allow_unsafe: bool = False


@dataclass(frozen=True)
class CastCheck:
    """How a lossy cast went: the largest error against the source, and overflows to inf."""

    name: str
    max_abs_error: float
    overflow: int


@dataclass(frozen=True)
class ConvertReport:
    source: str
    target: str
    source_format: str
    target_format: str
    tensors: tuple[tuple[str, str, tuple[int, ...], int], ...]  # name, dtype, shape, bytes
    bytes_written: int
    selection: str
    left_out: tuple[str, ...]
    aliases: dict[str, str]
    notes: tuple[str, ...]
    verified: bool | None
    casts: tuple[CastCheck, ...] = ()
    seconds: float = 0.0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "source_format": self.source_format,
            "target_format": self.target_format,
            "tensor_count": len(self.tensors),
            "bytes_written": self.bytes_written,
            "selection": self.selection,
            "left_out": list(self.left_out),
            "aliases": self.aliases,
            "notes": list(self.notes),
            "verified": self.verified,
            "casts": [vars(c) for c in self.casts],
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "tensors": [
                {"name": n, "dtype": d, "shape": list(s), "nbytes": b}
                for n, d, s, b in self.tensors
            ],
        }


def convert(
    src: str | Path, dst: str | Path, options: ConvertOptions | None = None
) -> ConvertReport:
    """Convert ``src`` into ``dst`` (format from ``options.to`` or ``dst``'s name)."""
    options = options or ConvertOptions()
    started = time.perf_counter()
    source, target = Path(src), Path(dst)
    _check_paths(source, target, options.overwrite)
    writer = _target_format(target, options.to)
    check_safety(source, allow_unsafe=options.allow_unsafe)
    with open_model(source) as model:
        chosen, selection, left_out = _select(model, options)
        named, notes = _rename(chosen, options)
        outputs = _outputs(named, options.dtype)
        _check_holds(outputs, writer)
        outputs, aliases = _dedupe(outputs, writer, options.materialize_ties)
        metadata = _metadata(model, options, aliases)
        plan = WritePlan(tuple(outputs), metadata)
        summary = tuple((t.name, t.dtype, t.shape, t.nbytes) for t in outputs)
        report = ConvertReport(
            str(source),
            str(target),
            model.format.value,
            writer.format.value,
            summary,
            sum(t.nbytes for t in outputs),
            selection,
            tuple(left_out),
            aliases,
            tuple(notes),
            None,
            dry_run=options.dry_run,
        )
        if options.dry_run:
            return report
        casts = _write_verified(plan, target, writer, options)
    return ConvertReport(
        report.source,
        report.target,
        report.source_format,
        report.target_format,
        report.tensors,
        target.stat().st_size,
        selection,
        report.left_out,
        aliases,
        report.notes,
        options.verify or None,
        casts,
        time.perf_counter() - started,
    )


# -- choosing ----------------------------------------------------------------------------------
def _target_format(target: Path, to: str | None) -> FormatReader:
    wanted = TARGETS.get(to, to) if to else None
    for reader in READERS:
        if reader.write is None:
            continue
        if wanted == reader.format.value or (
            wanted is None and target.suffix.lower() in reader.extensions
        ):
            return reader
    writable = ", ".join(sorted(TARGETS))
    raise ConversionError(
        f"cannot tell which format to write {target.name!r} as: pass --to ({writable})"
        if wanted is None
        else f"modelport cannot write {to!r} (it writes {writable})"
    )


def _check_paths(source: Path, target: Path, overwrite: bool) -> None:
    if target.exists() and source.exists() and source.samefile(target):
        raise ConversionError(
            f"{target}: the output would overwrite the input; choose another name"
        )
    if target.exists() and not overwrite:
        raise ConversionError(f"{target} exists; pass --overwrite (overwrite=True) to replace it")
    if not target.parent.is_dir():
        raise ConversionError(f"{target.parent} is not a directory")


def _select(model: Any, options: ConvertOptions) -> tuple[dict[str, TensorRef], str, list[str]]:
    if options.extract:
        subtree = _lookup(model.tree, options.extract)
        chosen, selection, left_out = (
            trees.tensors_of(subtree),
            f"extracted '{options.extract}'",
            [],
        )
    elif options.take_all:
        chosen, selection = dict(model.tensors), "every tensor in the file"
    else:
        weights = model.weights(ema=options.ema)
        chosen, selection, left_out = (
            weights.tensors,
            weights.note or "the model weights",
            weights.left_out,
        )
    if options.include:
        chosen = {
            n: t
            for n, t in chosen.items()
            if any(fnmatch.fnmatchcase(n, p) for p in options.include)
        }
    if options.exclude:
        chosen = {
            n: t
            for n, t in chosen.items()
            if not any(fnmatch.fnmatchcase(n, p) for p in options.exclude)
        }
    if not chosen:
        raise ConversionError("nothing to convert: the selection holds no tensors")
    return chosen, selection, list(left_out)


def _lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif part.isdigit() and (
            (isinstance(node, dict) and int(part) in node)
            or (isinstance(node, (list, tuple)) and int(part) < len(node))
        ):
            node = node[int(part)]
        else:
            raise ConversionError(f"--extract {dotted!r}: no entry {part!r} in the file's tree")
    return node


def detect_wrapper(names: list[str]) -> str | None:
    """The wrapper prefix every key carries (DDP ``module.``, compile ``_orig_mod.``, ...)."""
    for prefix in WRAPPER_PREFIXES:
        if names and all(name.startswith(prefix) for name in names):
            return prefix
    return None


def _rename(
    chosen: dict[str, TensorRef], options: ConvertOptions
) -> tuple[dict[str, TensorRef], list[str]]:
    notes: list[str] = []
    wrapper = detect_wrapper(list(chosen))
    strip = wrapper if options.strip_prefix == "auto" else options.strip_prefix
    if wrapper and strip != wrapper:
        notes.append(
            f"every key starts with {wrapper!r} (a wrapper); --strip-prefix auto removes it"
        )
    renamed: dict[str, TensorRef] = {}
    for name, tensor in chosen.items():
        new = name.removeprefix(strip) if strip else name
        for pattern, replacement in options.renames:
            new = re.sub(pattern, replacement, new)
        new = (options.add_prefix or "") + new
        if new in renamed:
            raise ConversionError(f"renaming gives two tensors the name {new!r}")
        renamed[new] = tensor
    if strip and strip == wrapper:
        notes.append(f"stripped the wrapper prefix {strip!r}")
    return renamed, notes


def _outputs(named: dict[str, TensorRef], cast: str | None) -> list[OutputTensor]:
    if cast is not None and cast not in CASTS:
        raise ConversionError(f"--dtype must be one of {', '.join(CASTS)}")
    outputs = []
    for name, tensor in named.items():
        floating = (
            dtypes.dtype(tensor.dtype).is_floating and dtypes.dtype(tensor.dtype).numpy is not None
        )
        outputs.append(OutputTensor(name, cast if cast and floating else tensor.dtype, tensor))
    return outputs


def _check_holds(outputs: list[OutputTensor], writer: FormatReader) -> None:
    refused = [t for t in outputs if writer.holds is not None and not writer.holds(t.dtype)]
    if refused:
        listed = ", ".join(f"{t.name} ({t.dtype})" for t in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise ConversionError(f"{writer.format} cannot hold {listed}{more}; nothing was written")


def _dedupe(
    outputs: list[OutputTensor], writer: FormatReader, materialize: bool
) -> tuple[list[OutputTensor], dict[str, str]]:
    """Tied tensors (same storage, same view, same dtype written) stored once where the
    target records aliases: the first in file order is kept and each alias recorded as
    ``alias -> kept``. Targets that share storage natively, or cannot record an alias that
    their reader restores (npz, GGUF), get every name."""
    if writer.shares_storage or not writer.records_aliases or materialize:
        return outputs, {}
    kept: dict[tuple[int, int, tuple[int, ...], tuple[int, ...] | None, str], str] = {}
    result, aliases = [], {}
    for tensor in outputs:
        source = tensor.source
        if source.storage is None or source.nbytes == 0:
            result.append(tensor)
            continue
        key = (
            id(source.storage),
            source.element_offset,
            source.shape,
            source.strides,
            tensor.dtype,
        )
        if key in kept:
            aliases[tensor.name] = kept[key]
        else:
            kept[key] = tensor.name
            result.append(tensor)
    return result, aliases


def _metadata(model: Any, options: ConvertOptions, aliases: dict[str, str]) -> dict[str, str]:
    metadata = {str(k): v for k, v in model.metadata.items() if isinstance(v, str)}
    metadata.setdefault("format", "pt")
    metadata.update(aliases)
    recipe = {k: v for k, v in vars(options).items() if v not in (None, False, (), "")}
    recipe.pop("overwrite", None)
    metadata.update(
        {
            "modelport.version": __version__,
            "modelport.source": model.path.name,
            "modelport.source_format": model.format.value,
            "modelport.source_bytes": str(model.size_bytes),
            "modelport.recipe": json.dumps(recipe, sort_keys=True, default=list),
        }
    )
    return metadata


# -- writing and verifying -------------------------------------------------------------------
def _write_verified(
    plan: WritePlan, target: Path, writer: FormatReader, options: ConvertOptions
) -> tuple[CastCheck, ...]:
    assert writer.write is not None
    temporary = target.with_name(f".{target.name}.modelport-{os.getpid()}.tmp")
    try:
        with open(temporary, "w+b", buffering=0) as handle:
            writer.write(handle, plan)
            if options.fsync:
                os.fsync(handle.fileno())
        casts = verify(temporary, plan) if options.verify else ()
        temporary.replace(target)
        if options.fsync:
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return casts
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise ConversionError(f"{target}: the disk is full; nothing was written") from None
        raise
    finally:
        temporary.unlink(missing_ok=True)


def verify(path: Path, plan: WritePlan) -> tuple[CastCheck, ...]:
    """Read ``path`` back with modelport's reader for its format and compare every tensor
    with its source, chunk by chunk: bit for bit, or, for casts, against the same cast of
    the source (and report the cast's error)."""
    reader, probe, _ = detect(path)
    contents = reader.read(path, probe)
    written = trees.tensors_of(contents.tree)
    expected = {t.name for t in plan.tensors}
    missing = sorted(expected - set(written))
    if missing:
        raise VerificationError(f"{path.name}: tensors missing after writing: {missing[:5]}")
    casts = []
    for tensor in plan.tensors:
        out = written[tensor.name]
        if out.dtype != tensor.dtype or out.shape != tensor.shape:
            raise VerificationError(
                f"{tensor.name}: wrote {tensor.dtype}{list(tensor.shape)}, read back "
                f"{out.dtype}{list(out.shape)}"
            )
        check = _compare(tensor, out)
        if check is not None:
            casts.append(check)
    if contents.close is not None:
        contents.close()
    return tuple(casts)


def _compare(tensor: OutputTensor, out: TensorRef) -> CastCheck | None:
    worst, overflow = 0.0, 0
    if dtypes.dtype(out.dtype).numpy is None:  # quantized blocks: compare raw bytes
        if not np.array_equal(tensor.source.raw_bytes(), out.raw_bytes()):
            raise VerificationError(f"{tensor.name}: the bytes read back differ from the source")
        return None
    for expected_chunk, got_chunk in paired_chunks(tensor.source, out):
        expected = (
            cast_chunk(expected_chunk, tensor.source.dtype, tensor.dtype)
            if tensor.is_cast
            else expected_chunk
        )
        if not np.array_equal(_as_bytes(expected), _as_bytes(got_chunk)):
            raise VerificationError(f"{tensor.name}: the bytes read back differ from the source")
        if tensor.is_cast:
            original = expected_chunk.astype(np.float64)
            converted = got_chunk.astype(np.float64)
            finite = np.isfinite(original)
            overflow += int(np.count_nonzero(finite & ~np.isfinite(converted)))
            both = finite & np.isfinite(converted)
            if both.any():
                worst = max(worst, float(np.max(np.abs(original[both] - converted[both]))))
    return CastCheck(tensor.name, worst, overflow) if tensor.is_cast else None


def _as_bytes(chunk: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The chunk's bytes, compared as bytes (NaN payloads and -0.0 included), without a copy."""
    return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
