"""Tensor statistics in bounded memory, in parallel threads: ``modelport.open(path).stats()``.

Every tensor is read with ``transfer.streaming.source_chunks``: ``preadv`` into one reused
buffer per thread, never a memory map, since mapped pages count towards a process's memory
and a map of a 4 GB file would end up holding 4 GB. A chunk is 1 MiB, so the few passes the
statistics make over it (``accumulating``) run in the CPU's cache, not in main memory.

Work is shared as *pieces*: a tensor stored flat and larger than 64 MiB is split into
slices, so one huge embedding keeps every thread busy; small tensors travel in batches, so
ten thousand of them do not cost ten thousand thread hand-offs. Finished pieces are merged
in the order they were planned (the same sums whatever the thread count), and at most a few
batches per thread are in flight, so memory does not grow with the tensor count either.

Tensors that share their storage at the same place (tied weights, aliases) are read once.
GGML block-quantized tensors are dequantized a chunk of blocks at a time with gguf-py's
reference dequantizer (``modelport[gguf]``). Complex, torch-quantized and packed float4
tensors, and tensors saved without data, are listed with ``computed=False`` and a note, as is
a tensor whose bytes cannot be read (a truncated file): one bad tensor does not stop the rest.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import ml_dtypes
import numpy as np

from modelport import dtypes
from modelport.errors import ModelportError
from modelport.measuring import flags as flagging
from modelport.measuring.accumulating import LAYOUTS, Accumulator
from modelport.measuring.stats_records import Histogram, StatsReport, TensorStats
from modelport.tensors import TensorRef
from modelport.transfer.streaming import dequantize, source_chunks

STATS_CHUNK: Final = 1 << 20  # bytes per read: small enough that every pass stays in cache
PIECE: Final = 64 << 20  # a flat tensor larger than this is shared out in slices
BATCH: Final = 32 << 20  # small tensors go to a thread about this many bytes at a time
IN_FLIGHT: Final = 4  # batches queued per thread: bounds results waiting to be merged
MAX_THREADS: Final = 8  # beyond this the page cache, not the arithmetic, is the limit

_NOT_COMPUTED: Final = {
    "complex": "complex values: statistics not computed",
    "q": "torch-quantized: statistics of the stored integers would mislead; not computed",
    "float4": "packed float4 pairs: not computed",
}


@dataclass(frozen=True)
class _Piece:
    """Part of the work: a tensor (by index among the distinct ones) or a slice of it, or
    for a GGML tensor its raw bytes, dequantized as they are read."""

    index: int
    ref: TensorRef
    ggml: str = ""


def report(
    path: Path,
    format_name: str,
    tensors: Mapping[str, TensorRef],
    weight_names: Collection[str],
    *,
    threads: int | None = None,
) -> StatsReport:
    """Statistics and flags of every tensor of one file (``ModelFile.stats``); the flags that
    compare layers look at ``weight_names`` only, the file's weights by the one weights rule."""
    started = time.perf_counter()
    count = _thread_count(threads)
    measured = measure(tensors, threads=count)
    raised = flagging.find(measured, tensors, weight_names)
    return StatsReport(
        path=str(path),
        format=format_name,
        tensors=flagging.attach(measured, raised),
        flags=raised,
        threads=count,
        seconds=time.perf_counter() - started,
    )


def measure(
    tensors: Mapping[str, TensorRef],
    *,
    threads: int | None = None,
    chunk: int = STATS_CHUNK,
    piece: int = PIECE,
) -> tuple[TensorStats, ...]:
    """The statistics of each tensor, in the mapping's order (no flags: see ``flags``)."""
    distinct: dict[tuple[Any, ...], int] = {}
    index_of: dict[str, int] = {}
    refs: list[TensorRef] = []
    for name, ref in tensors.items():
        key = _placement(ref)
        if key not in distinct:
            distinct[key] = len(refs)
            refs.append(ref)
        index_of[name] = distinct[key]
    results = _run(refs, _thread_count(threads), chunk, piece)
    return tuple(replace(results[index_of[name]], name=name) for name in tensors)


def _placement(ref: TensorRef) -> tuple[Any, ...]:
    """Where a tensor's values lie: equal for names of one tensor (tied weights)."""
    if ref.storage is None:
        return ("no-data", id(ref))
    return (id(ref.storage), ref.element_offset, ref.shape, ref.strides, ref.dtype)


def _thread_count(threads: int | None) -> int:
    if threads is not None:
        return max(1, threads)
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, min(MAX_THREADS, len(usable) if usable else (os.cpu_count() or 1)))


def _run(refs: list[TensorRef], threads: int, chunk: int, piece: int) -> list[TensorStats]:
    """Measure every ref, sharing the pieces out to ``threads`` threads."""
    results: list[TensorStats | None] = [None] * len(refs)
    pending_pieces: dict[int, int] = {}
    partial: dict[int, Accumulator] = {}
    failed: dict[int, str] = {}
    for index, ref in enumerate(refs):
        reason = _reason_not_computed(ref)
        if reason:
            results[index] = TensorStats("", ref.dtype, ref.shape, False, reason)
    work = [p for i, ref in enumerate(refs) if results[i] is None for p in _pieces(i, ref, piece)]
    for item in work:
        pending_pieces[item.index] = pending_pieces.get(item.index, 0) + 1

    def merge(done: list[tuple[int, Accumulator | str]]) -> None:
        for index, outcome in done:
            if isinstance(outcome, str):
                failed.setdefault(index, outcome)
            elif index in partial:
                partial[index].merge(outcome)
            else:
                partial[index] = outcome
            pending_pieces[index] -= 1
            if pending_pieces[index] == 0:
                results[index] = _finish(refs[index], partial.pop(index, None), failed.get(index))

    with ThreadPoolExecutor(threads, thread_name_prefix="modelport-stats") as pool:
        queued: deque[Future[list[tuple[int, Accumulator | str]]]] = deque()
        for batch in _batches(work):
            queued.append(pool.submit(_measure_batch, batch, chunk))
            if len(queued) >= threads * IN_FLIGHT:
                merge(queued.popleft().result())
        while queued:
            merge(queued.popleft().result())
    return [
        r if r is not None else _finish(refs[i], None, "not read") for i, r in enumerate(results)
    ]


def _reason_not_computed(ref: TensorRef) -> str:
    if ref.storage is None:
        return "saved without data (a meta tensor)"
    for prefix, reason in _NOT_COMPUTED.items():
        if ref.dtype.startswith(prefix):
            return reason
    info = dtypes.dtype(ref.dtype)
    if info.numpy is None and info.block is None:
        return f"{ref.dtype}: no numpy equivalent; not computed"
    return ""


def _pieces(index: int, ref: TensorRef, size: int) -> list[_Piece]:
    """The tensor as pieces of about ``size`` bytes when it lies flat in its file, else
    whole; a GGML tensor as its raw bytes, cut on block boundaries."""
    info = dtypes.dtype(ref.dtype)
    span = ref.byte_range()
    flat = span is not None and ref.storage is not None and ref.storage.path is not None
    if info.block is not None:
        if not flat or ref.storage is None or span is None:
            return [_Piece(index, ref, ref.dtype)]
        block_bytes = info.block[1]
        step = max(1, size // block_bytes) * block_bytes
        start = span[0] - ref.storage.offset
        return [
            _Piece(index, _bytes_ref(ref, start + at, min(step, span[1] - at)), ref.dtype)
            for at in range(0, span[1], step)
        ]
    if not flat or ref.nbytes <= size:
        return [_Piece(index, ref)]
    per = max(1, size // info.itemsize)
    return [
        _Piece(index, TensorRef(ref.dtype, (min(per, ref.numel - at),), ref.storage, at))
        for at in range(ref.element_offset, ref.element_offset + ref.numel, per)
    ]


def _bytes_ref(ref: TensorRef, start: int, length: int) -> TensorRef:
    return TensorRef("uint8", (length,), ref.storage, start)


def _batches(work: list[_Piece]) -> Iterator[list[_Piece]]:
    batch: list[_Piece] = []
    size = 0
    for item in work:
        batch.append(item)
        size += item.ref.nbytes
        if size >= BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _measure_batch(batch: list[_Piece], chunk: int) -> list[tuple[int, Accumulator | str]]:
    """One thread's share: each piece measured, or the reason it could not be read."""
    done: list[tuple[int, Accumulator | str]] = []
    for item in batch:
        try:
            done.append((item.index, _measure_piece(item, chunk)))
        except (ModelportError, OSError, ValueError) as exc:
            done.append((item.index, f"could not read the values: {exc}"))
    return done


def _measure_piece(item: _Piece, chunk: int) -> Accumulator:
    if item.ggml:
        block_bytes = (dtypes.dtype(item.ggml).block or (1, 1))[1]
        step = max(1, chunk // block_bytes) * block_bytes
        accumulator = Accumulator(LAYOUTS[np.dtype(np.float32)])
        for raw in source_chunks(item.ref, step):
            data = raw.reshape(-1).view(np.uint8)
            for at in range(0, data.size, step):  # a whole in-memory tensor: a step at a time
                accumulator.add(dequantize(data[at : at + step], item.ggml))
        return accumulator
    carrier = _carrier(item.ref.dtype)
    accumulator = Accumulator(LAYOUTS[carrier])
    for values in source_chunks(item.ref, chunk):
        flat = values.reshape(-1)
        accumulator.add(flat if flat.dtype == carrier else flat.astype(carrier))
    return accumulator


def _carrier(name: str) -> np.dtype[Any]:
    """float32 for every type it holds exactly, float64 for the rest."""
    if name == "float64" or (not dtypes.dtype(name).is_floating and dtypes.dtype(name).bits > 16):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _finish(ref: TensorRef, accumulator: Accumulator | None, error: str | None) -> TensorStats:
    if error is not None or accumulator is None:
        return TensorStats("", ref.dtype, ref.shape, False, error or "not read")
    info = dtypes.dtype(ref.dtype)
    note = f"dequantized from {ref.dtype}" if info.block is not None else ""
    if ref.dtype in ("int64", "uint64") and max(-accumulator.low, accumulator.high) > 2.0**53:
        note = "values past 2**53 are rounded to float64"
    moments = accumulator.moments()
    found = accumulator.histogram()
    return TensorStats(
        name="",
        dtype=ref.dtype,
        shape=ref.shape,
        computed=True,
        note=note,
        min=accumulator.low if moments else None,
        max=accumulator.high if moments else None,
        mean=moments[0] if moments else None,
        std=moments[1] if moments else None,
        rms=moments[2] if moments else None,
        nan=accumulator.nan,
        inf=accumulator.inf,
        zeros=accumulator.zeros,
        subnormal=_subnormals(ref.dtype, accumulator),
        over_float16=accumulator.over_float16,
        over_bfloat16=accumulator.over_bfloat16,
        histogram=Histogram(*found) if found else None,
    )


def _subnormals(name: str, accumulator: Accumulator) -> int:
    """Values below the smallest normal of the stored type (floats stored as such only)."""
    info = dtypes.dtype(name)
    if not info.is_floating or info.block is not None or info.numpy is None:
        return 0
    return accumulator.below(int(ml_dtypes.finfo(info.numpy).minexp))  # type: ignore[no-untyped-call]
