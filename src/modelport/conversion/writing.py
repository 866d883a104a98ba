"""Writing a conversion's output beside its target, verifying it against the source, and
installing it: a single file renamed into place without replacing what is there (unless
asked), or a Hugging Face folder built beside and moved in file by file (``folders``). A
pinned source is checked once the copy is verified, so a source that changed installs
nothing."""

from __future__ import annotations

import os
from pathlib import Path

from modelport.conversion import folders
from modelport.conversion.options import ConvertOptions
from modelport.conversion.verifying import CastCheck, copy_checks, pinned, verify
from modelport.formats import _hf_writer
from modelport.formats.protocol import FormatReader
from modelport.transfer import placing
from modelport.transfer.pinning import SourcePin
from modelport.transfer.write_plan import WritePlan


def write_verified(
    plan: WritePlan,
    target: Path,
    writer: FormatReader,
    options: ConvertOptions,
    source: Path,
    pin: SourcePin | None = None,
) -> tuple[tuple[CastCheck, ...], int]:
    """Written beside the target, verified, then installed; the casts and the bytes
    written. A pinned source is checked once the copy is verified, so a source that changed
    installs nothing."""
    if _hf_writer.is_target(writer):  # a directory of shards: built beside, then renamed
        return folders.write_verified(plan, target, writer, options, source, pin)
    assert writer.write is not None
    temporary = placing.sibling(target, "tmp")
    try:
        with placing.refused_writes(target):
            checks = copy_checks(options.verify)
            with open(temporary, "w+b", buffering=0) as handle, checks as copies:
                writer.write(handle, plan)
                if options.fsync:
                    os.fsync(handle.fileno())
            with pinned(pin):
                casts = verify(temporary, plan, copies) if options.verify else ()
            written = temporary.stat().st_size
            placing.install_file(temporary, target, overwrite=options.overwrite)
            if options.fsync:
                placing.fsync_directory(target.parent)
        return casts, written
    finally:
        placing.discard(temporary)
