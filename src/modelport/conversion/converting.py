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

import importlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport import dtypes
from modelport._version import __version__
from modelport.conversion import (
    folders,
    gguf_arch,
    gguf_quantizing,
    selecting,
    writing,
)
from modelport.conversion.options import ConvertOptions
from modelport.conversion.verifying import CastCheck
from modelport.errors import ConversionError, UsageError
from modelport.formats import _hf_writer
from modelport.formats.protocol import FormatReader
from modelport.formats.registry import SLOTS, WRITER_SLOTS
from modelport.loading.model_file import check_safety
from modelport.loading.model_file import open as open_model
from modelport.tensors import TensorRef
from modelport.transfer import placing, progress
from modelport.transfer.hashing import sha256_of
from modelport.transfer.pinning import SourcePin
from modelport.transfer.write_plan import OutputTensor, TypedMetadata, WritePlan
from modelport.tree import names as trees
from modelport.tree import typed_json

TARGETS = {
    "safetensors": "safetensors",
    "torch": "torch-zip",
    "npz": "npz",
    "gguf": "gguf",
    "hf": "hf-dir",
    "hf-bin": "hf-bin",
}
CASTS = ("float16", "bfloat16", "float32")


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
    src: str | Path,
    dst: str | Path,
    options: ConvertOptions | None = None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> ConvertReport:
    """Convert ``src`` into ``dst`` (format from ``options.to`` or ``dst``'s name);
    ``on_progress(done, total)`` hears about every byte written and verified."""
    options = options or ConvertOptions()
    started = time.perf_counter()
    source, target = Path(src), Path(dst)
    writer = _target_format(target, options.to)
    if _hf_writer.is_target(writer) and target.is_dir():  # a folder: only what is written
        placing.check_target(source, target, overwrite=True)
    else:
        placing.check_target(source, target, options.overwrite)
    folders.check_target(source, target, writer, options)
    pin = SourcePin.of(source)
    check_safety(source, allow_unsafe=options.allow_unsafe)
    pin.check("scanned")
    with open_model(source) as model, ExitStack() as stack:
        structure = _structure(model, options, writer)
        chosen, selection, left_out = selecting.select(
            model, options, structure.plain, nested=structure.tree is not None
        )
        flat = structure.tree is None
        chosen, unpacked = selecting.dequantized(model, chosen, options) if flat else (chosen, [])
        named, notes = selecting.rename(chosen, options, model) if flat else (chosen, [])
        notes.extend([*unpacked, *structure.notes, *selecting.unread(model)])
        outputs = _outputs(named, options, writer)
        outputs, notes, carried = _for_target(model, writer, outputs, notes, options, stack)
        outputs, aliases = _dedupe(outputs, writer, options.materialize_ties)
        adapted = gguf_arch.for_llama_cpp(model, writer, outputs, options.dtype)
        outputs, notes = list(adapted.tensors), [*notes, *adapted.notes]
        metadata = _metadata(model, options, aliases)
        plan = _plan(structure, outputs, aliases, metadata, adapted.metadata)
        notes.extend(folders.notes(carried, target, writer, plan, options))
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
        total = report.bytes_written * (2 if options.verify else 1)
        moved = [0]

        def tick(nbytes: int) -> None:
            moved[0] += nbytes
            if on_progress is not None:
                on_progress(min(moved[0], total), total)

        with progress.reporting(tick):
            casts, written = writing.write_verified(plan, target, writer, options, carried, pin)
    return ConvertReport(
        report.source,
        report.target,
        report.source_format,
        report.target_format,
        report.tensors,
        written,
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
    if wanted == _hf_writer.TARGET.format.value:
        return _hf_writer.TARGET
    if wanted == "hf-bin":
        return _hf_writer.BIN_TARGET
    for reader in _writers():
        if wanted == reader.format.value or (
            wanted is None and target.suffix.lower() in reader.extensions
        ):
            return reader
    writable = ", ".join(sorted(TARGETS))
    raise UsageError(
        f"cannot tell which format to write {target.name!r} as: pass --to ({writable})"
        if wanted is None
        else f"modelport cannot write {to!r} (it writes {writable})"
    )


def _writers() -> Iterator[FormatReader]:
    """Every format modelport writes, in ``registry.every_writer``'s order, each imported
    only when reached: a target named ``.safetensors`` is the first, and importing every
    reader's module to find it is a tenth of a second of a conversion's start-up."""
    for slot in (*WRITER_SLOTS, *SLOTS):
        reader = slot.reader()
        if reader.write is not None:
            yield reader


@dataclass(frozen=True)
class _Structure:
    """What ``--all`` keeps: the file's tree as plain data (``plain``), and ``tree``, the
    same when it holds more than a flat dict of tensors (its non-tensor values and nesting
    are then written as typed JSON, or pickled by a torch target)."""

    plain: Any = None
    tree: Any = None
    notes: tuple[str, ...] = ()


def _structure(model: Any, options: ConvertOptions, writer: FormatReader) -> _Structure:
    if not options.take_all or options.extract:
        return _Structure()
    records = writer.format.value != "torch-zip"  # a torch target pickles plain data only
    kept = typed_json.plain(model.tree, drop=options.drop_unrepresentable, records=records)
    notes = list(kept.notes)
    if kept.dropped:
        notes.append("left out values that are not plain data: " + "; ".join(kept.dropped))
    if kept.tree is None or typed_json.is_flat(kept.tree):
        return _Structure(kept.tree, None, tuple(notes))
    if options.strip_prefix or options.add_prefix or options.renames:
        raise UsageError(
            "--all keeps the file's structure, where each tensor is named by its place; "
            "--strip-prefix, --add-prefix and --rename apply to a flat state_dict only "
            "(take the weights, or --extract one part, to rename them)"
        )
    return _Structure(kept.tree, kept.tree, tuple(notes))


def _plan(
    structure: _Structure,
    outputs: list[OutputTensor],
    aliases: dict[str, str],
    metadata: dict[str, str],
    typed: tuple[TypedMetadata, ...] = (),
) -> WritePlan:
    """The write plan; with ``--all`` on a nested file, its tree (``OutputTensor`` leaves)
    rides along, and as typed JSON in the metadata for targets that store no pickle."""
    if structure.tree is None:
        return WritePlan(tuple(outputs), metadata, typed_metadata=typed)
    by_name = {t.name: t for t in outputs}
    placed = trees.tensors_of(structure.tree)

    def output_of(path: str, tensor: TensorRef) -> Any:
        if placed.get(path) is not tensor:
            raise ConversionError(
                f"two entries of the file are both named {path!r}; --all cannot keep both"
            )
        return by_name.get(aliases.get(path, path), typed_json.OMIT)

    tree = typed_json.map_tensors(structure.tree, output_of)
    metadata = {**metadata, typed_json.KEY: typed_json.encode(tree)}
    return WritePlan(tuple(outputs), metadata, tree, typed)


GGUF_TYPES = gguf_quantizing.GGUF_TYPES


def gguf_type_name(text: str) -> str:
    """--gguf-type's own spelling of a type written as any dtype alias (fp16, half -> f16)."""
    by_dtype = {dtype: name for name, dtype in GGUF_TYPES.items()}
    return by_dtype.get(dtypes.canonical_name(text), text.strip().lower())


def _outputs(
    named: dict[str, TensorRef], options: ConvertOptions, writer: FormatReader
) -> list[OutputTensor]:
    """The dtype each tensor is written as: floats follow --dtype (or --gguf-type, which
    ``gguf_arch.for_llama_cpp`` then settles as llama.cpp's converter would: norms, biases
    and rows of partial blocks stay float); quantized sources stay as they are unless
    --dequantize; integers and bools never change."""
    cast = options.dtype
    if cast is not None and cast not in CASTS:
        raise UsageError(f"--dtype must be one of {', '.join(CASTS)}")
    gguf = GGUF_TYPES.get(gguf_type_name(options.gguf_type or ""))
    if options.gguf_type and (gguf is None or writer.format.value != "gguf"):
        raise UsageError(f"--gguf-type takes {', '.join(GGUF_TYPES)} and needs a GGUF target")
    outputs = []
    for name, tensor in named.items():
        info = dtypes.dtype(tensor.dtype)
        target = tensor.dtype
        if info.block is not None:
            if options.dequantize:
                target = cast or "float32"
        elif info.is_floating and info.numpy_spec is not None:  # no numpy import
            target = gguf or cast or target
        outputs.append(OutputTensor(name, target, tensor))
    return outputs


def _for_target(
    model: Any,
    writer: FormatReader,
    outputs: list[OutputTensor],
    notes: list[str],
    options: ConvertOptions,
    stack: ExitStack,
) -> tuple[list[OutputTensor], list[str], Path]:
    """The tensors as the writer will take them, checked that it holds them: a GGUF source
    going to a Hugging Face folder renamed and laid out for transformers (``gguf_to_hf``);
    the notes; and the folder whose sidecars the target gets (the source's, or one holding
    the config.json and tokenizer rebuilt from the GGUF, removed when ``stack`` closes)."""
    source, target_format = model.path, writer.format.value
    if model.format.value != "gguf" or target_format != "hf-dir":
        _check_holds(outputs, writer)
        return outputs, notes, source
    # imported for this pair alone: a fiftieth of a second of every other conversion's start
    gguf_to_hf = importlib.import_module("modelport.conversion.gguf_to_hf")
    back = gguf_to_hf.for_transformers(
        source, model.format.value, target_format, model.metadata, outputs, options
    )
    _check_holds(list(back.tensors), writer)
    carried: Path = stack.enter_context(back.sidecars(source))
    return list(back.tensors), [*notes, *back.notes], carried


def _check_holds(outputs: list[OutputTensor], writer: FormatReader) -> None:
    refused = [t for t in outputs if writer.holds is not None and not writer.holds(t.dtype)]
    if refused:
        listed = ", ".join(f"{t.name} ({t.dtype})" for t in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise ConversionError(
            f"{writer.format} cannot hold {listed}{more}; nothing was written. "
            f"{_holders({t.dtype for t in refused}, writer)}; --exclude leaves them out"
        )


def _holders(kinds: set[str], writer: FormatReader) -> str:
    """Which other targets hold every one of ``kinds`` (safetensors has no complex128;
    torch and npz hold it), as the flags that choose them."""
    found = []
    for to in TARGETS:
        other = _target_format(Path(to), to)
        if other.format != writer.format and (
            other.holds is None or all(other.holds(kind) for kind in kinds)
        ):
            found.append(f"--to {to}")
    kinds_text = ", ".join(sorted(kinds))
    if not found:
        return f"no format modelport writes holds {kinds_text}"
    return f"{' or '.join(found)} keeps {kinds_text}"


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
    metadata.pop(typed_json.KEY, None)  # a source's own tree: ours is written afresh
    metadata.update(aliases)
    recipe = {k: v for k, v in vars(options).items() if v not in (None, False, (), "")}
    recipe.pop("overwrite", None)
    if options.name_map:  # a line per tensor: its size says what it did
        recipe["name_map"] = f"{len(options.name_map)} tensors renamed"
    if options.sha256:
        metadata["modelport.source_sha256"] = sha256_of(model.path)
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
