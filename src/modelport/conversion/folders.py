"""Hugging Face folders as conversion targets: one model's folder, or a model of several
(a diffusers pipeline, a sentence-transformers model), in the file names of the source's
library.

Built in a new folder beside the target, verified, then renamed into place; into an
existing folder the files are moved in one by one, and only older files of the weights
scheme written (``Scheme.owns``) are removed, folder by folder: everything else there
stays. Without ``overwrite`` a name that exists refuses the whole move before anything
moves.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from modelport.conversion.options import ConvertOptions
from modelport.conversion.verifying import (
    CastCheck,
    copy_checks,
    pinned,
    verify_directory,
    verify_pipeline,
)
from modelport.errors import ConversionError, UsageError
from modelport.formats import _hf_writer, _pipeline_writer, hf_dir
from modelport.formats._hf_writer import Layout, Scheme
from modelport.formats.protocol import FormatReader
from modelport.transfer import placing
from modelport.transfer.pinning import SourcePin
from modelport.transfer.write_plan import WritePlan


def check_target(source: Path, target: Path, writer: FormatReader, options: ConvertOptions) -> None:
    """Refuse, before any work, a folder target that would swallow the input, or that holds
    files of the scheme to write without ``overwrite``; ``--shard-size`` needs a folder."""
    if not _hf_writer.is_target(writer):
        if options.shard_size is not None:
            raise UsageError("--shard-size applies to --to hf and --to hf-bin only")
        return
    _hf_writer.parse_size(options.shard_size)
    if target.exists() and source.exists() and source.resolve().is_relative_to(target.resolve()):
        raise ConversionError(
            f"{target}: replacing it would delete the input {source}; choose another directory"
        )
    if target.is_dir() and not options.overwrite:
        present = [
            f"{folder}/{p.name}" if folder else p.name
            for folder, scheme in _schemes(source, writer).items()
            if (target / folder).is_dir()
            for p in sorted((target / folder).iterdir())
            if scheme.owns(p.name)
        ]
        if present:
            raise ConversionError(
                f"{target} already holds {', '.join(present)}; pass --overwrite to replace them"
            )


def _schemes(source: Path, writer: FormatReader) -> dict[str, Scheme]:
    """The weights scheme written into each folder of the target ("" is the target)."""
    binary = writer is _hf_writer.BIN_TARGET
    if not hf_dir.is_pipeline(source):
        return {"": _hf_writer.scheme_for(source, binary)}
    return _pipeline_writer.schemes(source, binary)


def notes(
    source: Path, target: Path, writer: FormatReader, plan: WritePlan, options: ConvertOptions
) -> list[str]:
    """What the folder will hold: the weight files, shards, sidecars, and what is missing."""
    if not _hf_writer.is_target(writer):
        return []
    limit = _hf_writer.parse_size(options.shard_size)
    binary = writer is _hf_writer.BIN_TARGET
    if hf_dir.is_pipeline(source):
        planned = _pipeline_writer.plan(plan, limit, source, binary)
        said = [planned.description, *planned.notes]
        layouts = [(target / p.name, p.layout) for p in planned.parts]
    else:
        layout = _hf_writer.layout(plan, limit, _hf_writer.scheme_for(source, binary))
        said = _folder_notes(source, layout, options)
        layouts = [(target, layout)]
    for folder, layout in layouts:
        said.extend(_loader_notes(folder, layout))
    return said


def _folder_notes(source: Path, layout: Layout, options: ConvertOptions) -> list[str]:
    said = []
    if len(layout.files) > 1:
        limit = _hf_writer.parse_size(options.shard_size)
        said.append(
            f"{len(layout.files)} shards of at most {limit:,} bytes (a larger tensor gets "
            f"one of its own), with {layout.scheme.index}"
        )
    elif options.shard_size is not None and not layout.scheme.sharded:
        said.append(f"one {layout.scheme.single}: PEFT loads adapters unsharded")
    carried, sidecar_notes = _hf_writer.sidecars(source, _hf_writer.weight_names(layout))
    said.extend(sidecar_notes)
    configs = {_hf_writer.CONFIG_NAME, "adapter_config.json"}
    if not any(p.name in configs for p in carried):
        said.append("no config.json beside the source: add one before from_pretrained")
    return said


def _loader_notes(folder: Path, layout: Layout) -> list[str]:
    """What ``from_pretrained`` will make of ``.bin`` weights in ``folder``: safetensors
    already there win, and diffusers looks for a ``.bin`` index only when told to."""
    scheme = layout.scheme
    if not scheme.binary:
        return []
    twin = _hf_writer.SCHEMES[scheme.library, False]
    present = [n for n in (twin.single, twin.index) if (folder / n).exists()]
    if present:
        return [
            f"{folder.name}/ also holds {', '.join(present)}, which from_pretrained prefers: "
            "load the .bin with use_safetensors=False"
        ]
    if layout.index is not None and scheme.library == "diffusers":
        return [
            f"{folder.name}/: diffusers finds sharded .bin weights only with "
            "from_pretrained(..., use_safetensors=False), as for the shards it saves itself"
        ]
    return []


def write_verified(
    plan: WritePlan,
    target: Path,
    writer: FormatReader,
    options: ConvertOptions,
    source: Path,
    pin: SourcePin | None,
) -> tuple[tuple[CastCheck, ...], int]:
    """The folder built in a new directory beside ``target``, verified, then renamed into
    place or merged into an existing ``target``; the casts and the bytes written."""
    limit = _hf_writer.parse_size(options.shard_size)
    binary = writer is _hf_writer.BIN_TARGET
    building = placing.staging_folder(target)
    try:
        with placing.refused_writes(target):
            casts, stale = _build(plan, building, limit, source, binary, options, pin)
            written = sum(p.stat().st_size for p in building.rglob("*") if p.is_file())
            if target.is_dir():  # only what modelport writes is replaced; the rest stays
                _merge(building, target, stale, options)
            else:
                placing.install_directory(building, target, options.fsync)
        return casts, written
    finally:
        if building.is_dir():
            shutil.rmtree(building, ignore_errors=True)


def _build(
    plan: WritePlan,
    building: Path,
    limit: int,
    source: Path,
    binary: bool,
    options: ConvertOptions,
    pin: SourcePin | None,
) -> tuple[tuple[CastCheck, ...], Callable[[str], Callable[[str], bool]]]:
    """Write and verify into ``building``; the casts, and which files each folder of the
    target may lose (the older files of the scheme written there)."""
    casts: tuple[CastCheck, ...] = ()
    if hf_dir.is_pipeline(source):
        pipeline = _pipeline_writer.plan(plan, limit, source, binary)
        with copy_checks(options.verify) as copies:
            _pipeline_writer.write(building, pipeline, limit, options.dtype, options.fsync)
        with pinned(pin):
            if options.verify:
                casts = verify_pipeline(building, plan, pipeline, copies)

        def stale_in(folder: str) -> Callable[[str], bool]:
            scheme = pipeline.scheme_of(folder)
            return scheme.owns if scheme is not None else _nothing

        return casts, stale_in
    scheme = _hf_writer.scheme_for(source, binary)
    with copy_checks(options.verify) as copies:
        layout = _hf_writer.write_directory(
            building, plan, limit, source, options.dtype, options.fsync, scheme
        )
    with pinned(pin):
        if options.verify:
            casts = verify_directory(building, plan, layout, copies)
    return casts, lambda folder: scheme.owns if folder == "" else _nothing


def _nothing(name: str) -> bool:
    return False


def _merge(
    building: Path,
    target: Path,
    stale_in: Callable[[str], Callable[[str], bool]],
    options: ConvertOptions,
) -> None:
    """Move the built folder's files into ``target``, subfolder by subfolder; refused
    before anything moves when a name is taken (without overwrite) or is of another kind."""
    taken, clashes = [], []
    for path in sorted(building.rglob("*")):
        there = target / path.relative_to(building)
        if there.exists() or there.is_symlink():
            if path.is_dir() != there.is_dir():
                clashes.append(str(path.relative_to(building)))
            elif path.is_file():
                taken.append(str(path.relative_to(building)))
    if clashes:
        raise ConversionError(f"{target}: {', '.join(clashes)} exist as another kind of entry")
    if taken and not options.overwrite:
        raise ConversionError(
            f"{target} already holds {', '.join(taken)}; pass --overwrite to replace them"
        )
    folders = sorted(p for p in building.iterdir() if p.is_dir())
    if not folders:  # one model's folder
        placing.merge_directory(
            building, target, stale_in(""), overwrite=options.overwrite, fsync=options.fsync
        )
        return
    top = {p.name for p in building.iterdir() if p.is_file()}  # model_index.json ...
    for name in sorted(top):
        placing.install_file(building / name, target / name, overwrite=options.overwrite)
    stale_top = stale_in("")  # a sentence-transformers model's top module: its old shards
    for path in sorted(target.iterdir()) if options.overwrite else []:
        if path.is_file() and path.name not in top and stale_top(path.name):
            path.unlink()
    for folder in folders:
        there = target / folder.name
        if there.is_dir():
            placing.merge_directory(
                folder, there, stale_in(folder.name), overwrite=options.overwrite, fsync=False
            )
        else:
            placing.install_directory(folder, there, fsync=False)
    if options.fsync:
        placing.fsync_directory(target)
