"""Reading a written file back and comparing it with what was meant to be written.

A conversion is only installed once this passes: every planned tensor is read back by the
target format's own reader and compared with its source chunk by chunk, bit for bit, or,
for a cast, against the same cast of the source (with the cast's error reported). Flat
ranges are compared through reused buffers, so memory stays bounded whatever the size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport import dtypes
from modelport.errors import VerificationError
from modelport.formats import _hf_writer, _pipeline_writer, hf_dir
from modelport.formats.gguf.writer import q8_0_blocks
from modelport.formats.protocol import Probe
from modelport.formats.registry import candidates
from modelport.formats.sniffing import probe_model, unrecognised
from modelport.tensors import TensorRef
from modelport.transfer import readback
from modelport.transfer.pinning import SourcePin
from modelport.transfer.progress import advance
from modelport.transfer.readback import CopiedRange, OutputChecks, RangeComparer
from modelport.transfer.streaming import CAST_CHUNK, cast_chunk, paired_chunks
from modelport.transfer.write_plan import OutputTensor, WritePlan
from modelport.tree import names as trees

if TYPE_CHECKING:  # imported by the comparisons that need it: ``--no-verify`` starts faster
    import numpy as np


@contextmanager
def pinned(pin: SourcePin | None) -> Iterator[None]:
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


def copy_checks(compare: bool) -> AbstractContextManager[OutputChecks]:
    """Written bytes are compared with the source (when ``compare``) and checksummed on a
    second thread while the writing goes on (see ``readback``)."""
    return readback.checking_output(compare=compare, elements=compare_elements)


@dataclass(frozen=True)
class CastCheck:
    """How a lossy cast went: the largest error against the source, and overflows to inf."""

    name: str
    max_abs_error: float
    overflow: int


def verify(
    path: Path, plan: WritePlan, copies: OutputChecks | None = None
) -> tuple[CastCheck, ...]:
    """Read ``path`` back with modelport's reader for its format and compare every tensor
    with its source, chunk by chunk: bit for bit, or, for casts, against the same cast of
    the source (and report the cast's error). Ranges that ``copies`` already compared while
    they were written are not read again, once the reader finds the tensor at that range."""
    probe = probe_model(path)  # the reader ``detect`` picks, without its warnings about the
    # temporary file's name (which would import every reader to name its extension's owner)
    reader = next((r for r in candidates(probe) if r.sniff(probe)), None)
    if reader is None:
        raise unrecognised(probe)
    contents = reader.contents(probe)
    written = trees.tensors_of(contents.tree)
    expected = {t.name for t in plan.tensors}
    missing = sorted(expected - set(written))
    if missing:
        raise VerificationError(f"{path.name}: tensors missing after writing: {missing[:5]}")
    casts = []
    comparer = RangeComparer()
    for tensor in plan.tensors:
        out = written[tensor.name]
        if out.dtype != tensor.dtype or out.shape != tensor.shape:
            raise VerificationError(
                f"{tensor.name}: wrote {tensor.dtype}{list(tensor.shape)}, read back "
                f"{out.dtype}{list(out.shape)}"
            )
        check = _compare(tensor, out, comparer, copies)
        if check is not None:
            casts.append(check)
    if contents.close is not None:
        contents.close()
    return tuple(casts)


def _compare(
    tensor: OutputTensor, out: TensorRef, comparer: RangeComparer, copies: OutputChecks | None
) -> CastCheck | None:
    source_range, out_range = tensor.source.byte_range(), out.byte_range()
    source_path = tensor.source.storage.path if tensor.source.storage else None
    out_path = out.storage.path if out.storage else None
    if not tensor.is_cast and source_range and out_range and source_path and out_path:
        copied = CopiedRange.of(source_path, source_range[0], out_path, *out_range)
        same = copies.verdict(copied) if copies is not None else None
        if same is None:
            same = comparer.same(
                (source_path, source_range[0]), (out_path, out_range[0]), out_range[1]
            )
        else:
            advance(out_range[1])
        if not same:
            raise VerificationError(f"{tensor.name}: the bytes read back differ from the source")
        return None
    import numpy as np  # a copied range is compared without it

    if dtypes.dtype(out.dtype).numpy is None:  # quantized blocks: compare raw bytes
        expected = (
            np.concatenate([b.reshape(-1).view(np.uint8) for b in _quantized(tensor)])
            if tensor.is_cast
            else tensor.source.raw_bytes()
        )
        if not np.array_equal(expected, out.raw_bytes()):
            raise VerificationError(f"{tensor.name}: the bytes read back differ from the source")
        return None
    if dtypes.dtype(tensor.source.dtype).block is not None:  # dequantized: whole tensor
        expected_values = cast_chunk(tensor.source.raw_bytes(), tensor.source.dtype, tensor.dtype)
        if not np.array_equal(_as_bytes(expected_values), _as_bytes(out.numpy())):
            raise VerificationError(f"{tensor.name}: the dequantized values read back differ")
        return None
    if copies is not None and out_path and out_range:
        found, checked = copies.outcome(out_path, out_range[0])
        if checked:  # compared on the checking thread while the file was written
            advance(out.nbytes)
            return found if isinstance(found, CastCheck) else None
    return compare_elements(tensor, out)


def compare_elements(tensor: OutputTensor, out: TensorRef) -> CastCheck | None:
    """A tensor written element by element (cast, gathered from a view) against its
    source, chunk by chunk: the same bytes, or for a cast the same cast of the source and
    its error. Raises ``VerificationError``."""
    import numpy as np

    worst, overflow = 0.0, 0
    for expected_chunk, got_chunk in paired_chunks(tensor.source, out, CAST_CHUNK):
        expected = (
            cast_chunk(expected_chunk, tensor.source.dtype, tensor.dtype)
            if tensor.is_cast
            else expected_chunk
        )
        if not np.array_equal(_as_bytes(expected), _as_bytes(got_chunk)):
            raise VerificationError(f"{tensor.name}: the bytes read back differ from the source")
        advance(got_chunk.nbytes)
        if tensor.is_cast:
            chunk_worst, chunk_overflow = _cast_error(expected_chunk, got_chunk)
            worst, overflow = max(worst, chunk_worst), overflow + chunk_overflow
    return CastCheck(tensor.name, worst, overflow) if tensor.is_cast else None


def _cast_error(
    original: np.ndarray[Any, Any], converted: np.ndarray[Any, Any]
) -> tuple[float, int]:
    """Largest absolute error of a cast chunk, and how many finite values became inf. The
    16-bit floats widen to float32 exactly, so float32 arithmetic suffices below 64 bits.
    An infinite error can only come from an overflow, so only then are they counted."""
    import numpy as np

    wide = np.float64 if original.dtype.itemsize > 4 else np.float32
    before = original.astype(wide, copy=False)
    after = converted.astype(wide)
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(np.subtract(before, after, out=after), out=after)
    worst = float(np.fmax.reduce(error)) if error.size else 0.0  # NaN - NaN is left out
    if math.isnan(worst):
        return 0.0, 0
    if math.isfinite(worst):
        return worst, 0
    overflow = int(np.count_nonzero(np.isfinite(before) & ~np.isfinite(converted)))
    error[~np.isfinite(error)] = 0
    return float(error.max()), overflow


def _as_bytes(chunk: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The chunk's bytes, compared as bytes (NaN payloads and -0.0 included), without a copy."""
    import numpy as np

    return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)


def _quantized(tensor: OutputTensor) -> Any:
    return q8_0_blocks(tensor)


def verify_directory(
    directory: Path,
    plan: WritePlan,
    planned: _hf_writer.Layout,
    copies: OutputChecks | None = None,
) -> tuple[CastCheck, ...]:
    """Every shard against its part of the plan (``verify``), the parts against the whole
    plan, then the directory as one model: the index, the shards it names, the aliases."""
    casts: list[CastCheck] = []
    for name, part in planned.shards:
        casts.extend(verify(directory / name, part, copies))
    stored = [t.name for t in plan.tensors]
    covered = [t.name for _, part in planned.shards for t in part.tensors]
    if sorted(covered) != sorted(stored):
        raise VerificationError(f"{directory.name}: the shards do not hold the plan's tensors")
    contents = hf_dir.read_model_folder(directory)  # the folder's own weights, not a whole model
    try:
        tree, details = contents.tree, contents.details
        if sorted(details.get("files", ())) != sorted(planned.files):
            raise VerificationError(
                f"{directory.name}: read back shards {details.get('files')}, "
                f"wrote {list(planned.files)}"
            )
        aliases = _hf_writer.aliases_of(plan)
        restored = details.get("aliases", {})
        for alias, kept in aliases.items():
            if tree.get(alias) is not tree.get(kept) and restored.get(alias) != kept:
                raise VerificationError(f"{alias}: the alias of {kept} was not read back")
        extra = sorted(set(tree) - set(stored) - set(aliases))
        missing = sorted(set(stored) - set(tree))
        if extra or missing:
            raise VerificationError(
                f"{directory.name}: read back {len(extra)} unexpected and {len(missing)} "
                f"missing tensors ({(extra + missing)[:5]})"
            )
        if planned.index is not None:
            declared = contents.metadata.get("total_size")
            if declared != planned.index["metadata"]["total_size"]:
                raise VerificationError(f"{directory.name}: index total_size {declared!r} is off")
    finally:
        if contents.close is not None:
            contents.close()
    return tuple(casts)


def verify_pipeline(
    directory: Path,
    plan: WritePlan,
    planned: _pipeline_writer.Planned,
    copies: OutputChecks | None = None,
) -> tuple[CastCheck, ...]:
    """Every component folder (``verify_directory``), then the pipeline read back as one
    model: every name of the plan, and its aliases, under ``<component>.``."""
    casts: list[CastCheck] = []
    for part in planned.parts:
        casts.extend(verify_directory(directory / part.name, part.plan, part.layout, copies))
    contents = hf_dir.READER.read(directory, Probe.of(directory))
    try:
        expected = {t.name for t in plan.tensors} | set(_hf_writer.aliases_of(plan))
        found = set(contents.tree)
        if found != expected:
            odd = sorted(found ^ expected)
            raise VerificationError(
                f"{directory.name}: the pipeline read back differs in {len(odd)} names {odd[:5]}"
            )
    finally:
        if contents.close is not None:
            contents.close()
    return tuple(casts)
