"""Writing a conversion's output beside its target, verifying it against the source, and
installing it: a single file renamed into place without replacing what is there (unless
asked), or a Hugging Face folder built beside and moved in file by file. A pinned source
is checked once the copy is verified, so a source that changed installs nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from modelport.conversion.options import ConvertOptions
from modelport.conversion.verifying import CastCheck, compare_elements, verify, verify_directory
from modelport.errors import ConversionError, UsageError, VerificationError
from modelport.formats import _hf_writer
from modelport.formats.protocol import FormatReader
from modelport.transfer import placing, readback
from modelport.transfer.pinning import SourcePin
from modelport.transfer.readback import OutputChecks
from modelport.transfer.write_plan import WritePlan


# -- writing and verifying -------------------------------------------------------------------
def write_verified(
    plan: WritePlan,
    target: Path,
    writer: FormatReader,
    options: ConvertOptions,
    source: Path | None = None,
    pin: SourcePin | None = None,
) -> tuple[CastCheck, ...]:
    """Written beside the target, verified, then installed; a pinned source is checked
    once the copy is verified, so a source that changed installs nothing."""
    if writer is _hf_writer.TARGET:  # a directory of shards: built beside, then renamed
        return _write_directory(plan, target, options, source, pin)
    assert writer.write is not None
    temporary = placing.sibling(target, "tmp")
    try:
        with placing.full_disk_refused(target):
            with open(temporary, "w+b", buffering=0) as handle, _copy_checks(options) as copies:
                writer.write(handle, plan)
                if options.fsync:
                    os.fsync(handle.fileno())
            with _pinned(pin):
                casts = verify(temporary, plan, copies) if options.verify else ()
            placing.install_file(temporary, target, overwrite=options.overwrite)
            if options.fsync:
                placing.fsync_directory(target.parent)
        return casts
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def _pinned(pin: SourcePin | None) -> Iterator[None]:
    """Verification, then the source's identity: a source that changed explains a copy
    that differs from it, and installs nothing even when the copy happens to agree."""
    try:
        yield
    except VerificationError:
        if pin is not None:
            pin.check("converted")
        raise
    if pin is not None:
        pin.check("converted")


def _copy_checks(options: ConvertOptions) -> AbstractContextManager[OutputChecks]:
    """Written bytes are compared with the source (when verifying) and checksummed on a
    second thread while the writing goes on (see ``readback``)."""
    return readback.checking_output(compare=options.verify, elements=compare_elements)


def sha256_of(path: Path) -> str:
    """The source's full-content sha256 (every file of a directory, in name order)."""

    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


# -- Hugging Face directories ------------------------------------------------------------------
def check_directory_target(
    source: Path, target: Path, writer: FormatReader, options: ConvertOptions
) -> None:
    if writer is not _hf_writer.TARGET:
        if options.shard_size is not None:
            raise UsageError("--shard-size applies to --to hf only")
        return
    _hf_writer.parse_size(options.shard_size)
    if target.exists() and source.exists() and source.resolve().is_relative_to(target.resolve()):
        raise ConversionError(
            f"{target}: replacing it would delete the input {source}; choose another directory"
        )
    if target.is_dir() and not options.overwrite:
        present = sorted(p.name for p in target.iterdir() if _hf_writer.superseded(p.name))
        if present:
            raise ConversionError(
                f"{target} already holds {', '.join(present)}; pass --overwrite to replace them"
            )


def directory_notes(
    source: Path, writer: FormatReader, plan: WritePlan, options: ConvertOptions
) -> list[str]:
    if writer is not _hf_writer.TARGET:
        return []
    limit = _hf_writer.parse_size(options.shard_size)
    planned = _hf_writer.layout(plan, limit)
    notes = []
    if len(planned.files) > 1:
        notes.append(
            f"{len(planned.files)} shards of at most {limit:,} bytes (a larger tensor gets "
            f"one of its own), with {_hf_writer.INDEX_NAME}"
        )
    carried, sidecar_notes = _hf_writer.sidecars(source, _hf_writer.weight_names(planned))
    notes.extend(sidecar_notes)
    if not any(p.name == _hf_writer.CONFIG_NAME for p in carried):
        notes.append("no config.json beside the source: add one before from_pretrained")
    return notes


def _write_directory(
    plan: WritePlan,
    target: Path,
    options: ConvertOptions,
    source: Path | None,
    pin: SourcePin | None,
) -> tuple[CastCheck, ...]:
    """Shards, index and sidecars built in a new directory beside ``target``, verified, then
    renamed into place; into an existing ``target`` (``--overwrite``) they are moved file by
    file, and only the older files of the same weights scheme are removed."""
    limit = _hf_writer.parse_size(options.shard_size)
    building = placing.sibling(target, "tmp")
    building.mkdir()
    try:
        with placing.full_disk_refused(target):
            with _copy_checks(options) as copies:
                planned = _hf_writer.write_directory(
                    building, plan, limit, source, options.dtype, options.fsync
                )
            with _pinned(pin):
                casts = verify_directory(building, plan, planned, copies) if options.verify else ()
            if target.is_dir():  # only what modelport writes is replaced; the rest stays
                placing.merge_directory(
                    building,
                    target,
                    _hf_writer.superseded,
                    overwrite=options.overwrite,
                    fsync=options.fsync,
                )
            else:
                placing.install_directory(building, target, options.fsync)
        return casts
    finally:
        if building.is_dir():
            shutil.rmtree(building, ignore_errors=True)


def bytes_on_disk(target: Path) -> int:
    if target.is_dir():
        return sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    return target.stat().st_size
