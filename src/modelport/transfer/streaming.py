"""Moving tensor bytes in bounded memory: from a source file to an output file, or to a hash.

Peak memory must not grow with the file, and mapped file pages count, so nothing here maps
a whole file: contiguous ranges are copied in the kernel (``os.copy_file_range``, else
``os.splice`` through a pipe), or through one small reused buffer where neither works
(``_copy_range`` says why); casts and strided views are done a chunk at a time.
Checking what was written (the comparison with the source, a zip member's CRC-32) is
``readback``'s job.
"""

from __future__ import annotations

import errno
import fcntl
import math
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

from modelport import dtypes
from modelport.errors import CorruptFileError, MissingDependencyError, TruncatedFileError
from modelport.tensors import NDArray, TensorRef
from modelport.transfer import readback
from modelport.transfer.progress import advance
from modelport.transfer.write_plan import OutputTensor

if TYPE_CHECKING:
    import numpy as np

CHUNK = 16 << 20  # bytes per read step; memory use is a small multiple of this
CAST_CHUNK = 4 << 20  # casts and gathers hold several buffers per chunk: smaller steps
RUNS_PER_BATCH = 1 << 16  # file offsets of a gathered block, computed this many at a time
WRITE_STEP = 64 << 10  # a copy writes the output in aligned blocks of this size (see _copy_range)
COPY_BUFFER = 4 * WRITE_STEP  # read at a time; small enough to stay in the CPU's cache
PAGE = mmap.PAGESIZE
PIPE_SIZE = 64 << 10  # a spliced copy's pipe (see _copy_range)
# splice refused for these files (a file system without it): the buffer copies instead
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EBADF})


def source_chunks(tensor: TensorRef, chunk: int = CHUNK) -> Iterator[NDArray]:
    """The tensor's elements in C order, as 1-d arrays of its own dtype, ``chunk`` bytes at a
    time. Flat file storages are read with ``preadv`` into one buffer reused for every chunk
    (fresh memory would cost a page fault per 4 KiB), so a chunk is valid only until the
    next is asked for; other storages go through their reader."""
    import numpy as np

    if tensor.numel == 0:  # no elements: nothing to read (an empty strided view included)
        return
    info = dtypes.dtype(tensor.dtype)
    per_chunk = max(1, chunk // info.itemsize)
    span = tensor.byte_range()
    if span is not None and tensor.storage is not None and tensor.storage.path is not None:
        offset, length = span
        with (
            _borrowed(per_chunk * info.itemsize) as buffer,
            open(tensor.storage.path, "rb") as handle,
        ):
            for start in range(0, length, len(buffer)):
                size = min(len(buffer), length - start)
                got = readback.read_into(handle.fileno(), memoryview(buffer)[:size], offset + start)
                if got != size:
                    raise TruncatedFileError(
                        f"tensor data ends early at byte {offset + start + got}",
                        expected=offset + start + size,
                        actual=offset + start + got,
                        path=tensor.storage.path,
                    )
                yield np.frombuffer(buffer, dtype=_carrier(info), count=size // info.itemsize)
        return
    if info.numpy is None:  # quantized blocks: raw bytes only
        yield tensor.raw_bytes()
        return
    view = tensor.numpy()
    storage = tensor.storage
    if storage is not None and storage.path is not None and storage.reader is None:
        yield from _strided_file_chunks(view, storage.path, tensor.byte_start(), chunk)
        return
    # Storages inside compressed members, in-memory pickles: already in memory.
    for _, block in _blocks(view, chunk):
        yield np.ascontiguousarray(block).reshape(-1)


def _blocks(view: NDArray, chunk: int, at: int = 0) -> Iterator[tuple[int, NDArray]]:
    """Sub-views of ``view`` that together are its elements in C order, each of at most
    ``chunk`` bytes (or one element), with their byte offsets from ``view``'s first element:
    whole rows where a row fits, else each row split the same way."""
    if view.ndim == 0:
        yield at, view.reshape(1)
        return
    if view.ndim > 1 and view[0].nbytes > chunk:
        for i in range(view.shape[0]):
            yield from _blocks(view[i], chunk, at + i * view.strides[0])
        return
    rows = max(1, chunk // max(1, view[0].nbytes))
    for start in range(0, view.shape[0], rows):
        yield at + start * view.strides[0], view[start : start + rows]


def _strided_file_chunks(
    view: NDArray, path: os.PathLike[str] | str, start: int, chunk: int
) -> Iterator[NDArray]:
    """A strided view of a file, a block at a time. A block whose elements lie within a few
    chunks of the file (slices, narrowed rows) is read with ``preadv`` and gathered there;
    one spread wider (a transposed matrix) is gathered from the memory map, whose pages are
    then dropped, so neither way keeps more than a block's pages."""
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

    span_limit = 4 * chunk
    with _borrowed(span_limit) as buffer, open(path, "rb") as handle:
        for at, block in _blocks(view, chunk):
            extent = view.itemsize + sum(
                (n - 1) * step for n, step in zip(block.shape, block.strides, strict=True)
            )
            if extent > span_limit:
                gathered = _gather_runs(handle.fileno(), block, start + at)
                if gathered is None:
                    gathered = np.ascontiguousarray(block).reshape(-1)
                    _drop_mapped_pages(view)
                yield gathered
                continue
            got = readback.read_into(handle.fileno(), memoryview(buffer)[:extent], start + at)
            if got != extent:
                raise TruncatedFileError(
                    "tensor data ends early", expected=start + at + extent, actual=start + at + got
                )
            local = np.frombuffer(buffer, dtype=view.dtype, count=extent // view.itemsize)
            gathered = as_strided(local, shape=block.shape, strides=block.strides)
            yield np.ascontiguousarray(gathered).reshape(-1)


def _gather_runs(fd: int, block: NDArray, start: int) -> NDArray | None:
    """A block spread across the file whose elements still lie in contiguous runs along one
    axis (a transposed matrix: along its first), read one run per ``preadv`` and put in C
    order in memory; None when no axis is contiguous in the file."""
    import numpy as np

    axis = next(
        (
            k
            for k, step in enumerate(block.strides)
            if step == block.itemsize and block.shape[k] > 1
        ),
        None,
    )
    if axis is None:
        return None
    outer_shape = block.shape[:axis] + block.shape[axis + 1 :]
    outer_strides = np.array(block.strides[:axis] + block.strides[axis + 1 :], dtype=np.int64)
    runs = np.empty((*outer_shape, block.shape[axis]), dtype=block.dtype)
    run_bytes = block.shape[axis] * block.itemsize
    target = runs.reshape(-1).view(np.uint8).data
    count = math.prod(outer_shape)
    for first in range(0, count, RUNS_PER_BATCH):  # offsets a batch at a time: bounded
        flat = np.arange(first, min(count, first + RUNS_PER_BATCH))
        if outer_shape:
            index = np.stack(np.unravel_index(flat, outer_shape))
            offsets = (start + outer_strides @ index).tolist()
        else:
            offsets = [start]
        for i, offset in enumerate(offsets, first):
            piece = target[i * run_bytes : (i + 1) * run_bytes]
            got = readback.read_into(fd, piece, offset)
            if got != run_bytes:
                raise TruncatedFileError(
                    "tensor data ends early", expected=offset + run_bytes, actual=offset + got
                )
    return np.ascontiguousarray(np.moveaxis(runs, -1, axis)).reshape(-1)


def _drop_mapped_pages(view: NDArray) -> None:
    """Let the kernel take back the pages of the memory map under ``view`` (a private map
    never written to: they are read from the file again if touched)."""
    import numpy as np

    base: Any = view
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    mapped = getattr(base, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mapped is not None and advice is not None and hasattr(mapped, "madvise"):
        mapped.madvise(advice)


_BUFFER = threading.local()  # this thread's pool of read buffers (see _borrowed)


@contextmanager
def _borrowed(size: int) -> Iterator[bytearray]:
    """A read buffer of ``size`` bytes from this thread's pool, returned after use: fresh
    ones would be page-faulted in for every tensor."""
    pool: list[bytearray] = _BUFFER.__dict__.setdefault("pool", [])
    buffer = next((b for b in pool if len(b) == size), None)
    if buffer is None:
        buffer = bytearray(size)
    else:
        pool.remove(buffer)
    try:
        yield buffer
    finally:
        pool.append(buffer)
        del pool[:-4]  # paired reads hold two at a time; a few sizes are in use


def _carrier(info: dtypes.DType) -> np.dtype[Any]:
    import numpy as np

    return info.numpy if info.numpy is not None else np.dtype(np.uint8)


def cast_chunk(chunk: NDArray, source_dtype: str, target_dtype: str) -> NDArray:
    """One chunk converted to ``target_dtype`` (floating types only: the planner refuses the
    rest before anything is written)."""
    import numpy as np

    if source_dtype == target_dtype:
        return chunk
    if dtypes.dtype(source_dtype).block is not None:
        chunk = dequantize(chunk, source_dtype)
        if target_dtype == "float32":
            return chunk
    with np.errstate(over="ignore"):  # overflow to inf is what the cast means; it is counted
        return chunk.astype(dtypes.to_numpy(target_dtype))


def write_all(handle: BinaryIO, data: bytes | memoryview) -> None:
    """``write`` on an unbuffered file MAY write less than asked: loop until done."""
    view = memoryview(data).cast("B")
    while view:
        written = handle.write(view)
        if not written:
            raise OSError(errno.ENOSPC, "the output file accepted no more bytes (disk full?)")
        view = view[written:]


def dequantize(raw: NDArray, ggml_type: str) -> NDArray:
    """GGML blocks to float32 with gguf-py's reference dequantizer (``modelport[gguf]``)."""
    import numpy as np

    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as reference
    except ImportError:
        raise MissingDependencyError("gguf", "gguf", "Dequantizing GGUF tensors") from None
    block_bytes = (dtypes.dtype(ggml_type).block or (1, 1))[1]
    blocks = raw.reshape(-1).view(np.uint8).reshape(-1, block_bytes)
    values: NDArray = reference(blocks, GGMLQuantizationType[ggml_type]).reshape(-1)
    return values.astype(np.float32, copy=False)


def write_tensor(
    handle: BinaryIO, tensor: OutputTensor, *, checksum: bool = False
) -> readback.Checksum:
    """Append ``tensor``'s bytes (cast if needed) to ``handle``, an unbuffered file opened
    by path; return what gives their CRC-32 when called (0 without ``checksum``).

    Bytes that pass unchanged from a flat file range are copied in the kernel where it
    can (``_copy_range``: no user-space copy at all). Under ``readback.checking_output``
    the written range is then compared with its source and checksummed on the checking
    thread; otherwise the CRC is taken by re-reading the range from the page cache."""
    source = tensor.source
    span = copied_span(tensor)
    start = os.lseek(handle.fileno(), 0, os.SEEK_CUR)
    output = getattr(handle, "name", None)
    if not isinstance(output, (str, os.PathLike)):
        output = None
    copied: readback.CopiedRange | None = None
    if span is not None and source.storage is not None and source.storage.path is not None:
        _copy_range(source.storage.path, span[0], span[1], handle)
        advance(span[1])
        if output is not None:
            copied = readback.CopiedRange.of(source.storage.path, span[0], output, start, span[1])
    else:
        _write_chunks(handle, tensor)
    checks = readback.current()
    if checks is not None and output is not None:
        elementwise = copied is None and _has_elements(tensor)
        written = tensor if elementwise else None
        return checks.submit(output, start, tensor.nbytes, copied, crc=checksum, written=written)
    crc = 0
    if checksum:  # taken from the page cache the write just filled
        with _borrowed(readback.COMPARE_CHUNK) as buffer:
            crc = readback.crc32_of_range(handle, start, tensor.nbytes, buffer)
    return lambda: crc


def copied_span(tensor: OutputTensor) -> tuple[int, int] | None:
    """(offset, length) of the file range ``write_tensor`` copies unchanged into the output
    for ``tensor``; None where its bytes are computed (a cast, a strided view, a storage not
    stored flat in a file)."""
    source = tensor.source
    if tensor.is_cast or source.storage is None or source.storage.path is None:
        return None
    return source.byte_range()


def _has_elements(tensor: OutputTensor) -> bool:
    """Written element by element from elements (not GGML blocks on either side)."""
    return (
        dtypes.dtype(tensor.dtype).numpy is not None
        and dtypes.dtype(tensor.source.dtype).block is None
    )


def _write_chunks(handle: BinaryIO, tensor: OutputTensor) -> None:
    """Casts, strided views, storages not stored flat: a bounded buffer at a time."""
    import numpy as np

    source = tensor.source
    written = 0
    small = tensor.is_cast or not source.is_contiguous  # several buffers per chunk
    for chunk in source_chunks(source, CAST_CHUNK if small else CHUNK):
        out = cast_chunk(chunk, source.dtype, tensor.dtype) if tensor.is_cast else chunk
        data = np.ascontiguousarray(out).reshape(-1).view(np.uint8).data
        write_all(handle, data)
        advance(len(data))
        written += len(data)
    if written != tensor.nbytes:
        raise CorruptFileError(
            f"tensor {tensor.name!r}: wrote {written} bytes, expected {tensor.nbytes}"
        )


def _copy_range(path: os.PathLike[str] | str, offset: int, length: int, handle: BinaryIO) -> None:
    """Copy ``length`` bytes at ``offset`` of ``path`` to ``handle``'s position, and move
    that position past them.

    ``os.copy_file_range`` is what ``cp`` uses, and the cheapest way found for every range
    (4 GB torch zip to safetensors on ext4, Linux 6.18, CPU time against ``cp`` of the
    same file, median of alternating rounds): where source and output start at the same
    place within a page it costs what ``cp`` does (or nothing, where the file system
    shares blocks); where they do not, 1.25-1.4x (each page it moves lands in two of the
    output's). The alternatives for ranges that do not line up cost more: ``os.splice``
    through a 64 KiB pipe 1.7x, through a 1 MiB pipe 2.4x (``perf``: the extra time is
    the kernel's own memcpy), a read into a buffer and a write from it 1.8-2.1x (every
    byte copied twice), writing from a map of the source 1.8x (its page faults). The
    safetensors writer chooses where its data starts so that most bytes line up
    (``safetensors_writer.data_start``).

    Where the kernel's copy is refused (across file systems on older kernels, platforms
    without it), the range goes through a pipe, and where that is refused too, through a
    buffer that stays in the CPU's cache, written in blocks that each fill one aligned
    ``WRITE_STEP`` of the output, so the kernel allocates the output's page cache in
    blocks of that size, as it does for ``cp``."""
    out_fd = handle.fileno()
    position = os.lseek(out_fd, 0, os.SEEK_CUR)
    with open(path, "rb") as source:
        in_fd = source.fileno()
        done = _copy_in_kernel(in_fd, out_fd, offset, position, length)
        if length - done >= WRITE_STEP:  # below, a pipe's set-up costs more than it saves
            done += _copy_spliced(in_fd, out_fd, (offset + done, position + done), length - done)
        if done < length:
            _copy_through_buffer(
                in_fd, out_fd, (offset + done, position + done), length - done, path
            )
    os.lseek(out_fd, position + length, os.SEEK_SET)


def _copy_spliced(in_fd: int, out_fd: int, at: tuple[int, int], length: int) -> int:
    """As much of the range as ``os.splice`` moves from ``at[0]`` of ``in_fd`` to ``at[1]``
    of ``out_fd`` through a ``PIPE_SIZE`` pipe; the rest (a source that ends early, a file
    system without splice, a pipe that cannot be sized) is the caller's."""
    splice = getattr(os, "splice", None)  # Linux, Python 3.10+
    resize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if splice is None or resize is None:
        return 0
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, resize, PIPE_SIZE)
    except OSError:  # over /proc/sys/fs/pipe-max-size, or the user's pipe pages
        os.close(read_end)
        os.close(write_end)
        return 0
    offset, position = at
    done = 0
    try:
        while done < length:
            step = min(PIPE_SIZE, length - done)
            moved: int = splice(in_fd, write_end, step, offset_src=offset + done)
            if moved <= 0:
                return done
            drained = 0
            while drained < moved:
                out = position + done + drained
                put: int = splice(read_end, out_fd, moved - drained, offset_dst=out)
                if put <= 0:
                    raise OSError(errno.ENOSPC, "the output file accepted no more bytes")
                drained += put
            done += moved
    except OSError as exc:  # what was moved stays moved; bytes left in the pipe go again
        if exc.errno not in _NO_SPLICE:
            raise
    finally:
        os.close(read_end)
        os.close(write_end)
    return done


_LINE = 64  # bytes in a CPU cache line


@contextmanager
def _copy_buffer() -> Iterator[mmap.mmap]:
    """This thread's copy buffer: page-aligned memory (an anonymous map), so that a copy
    can start it at the output's offset within a cache line. The copies ran 1.1-1.3x
    slower from a buffer at another offset, and where a ``bytearray`` starts depends on
    the heap."""
    buffer: mmap.mmap | None = _BUFFER.__dict__.pop("copy", None)
    if buffer is None or len(buffer) < COPY_BUFFER + _LINE:
        buffer = mmap.mmap(-1, COPY_BUFFER + _LINE)
    try:
        yield buffer
    finally:
        _BUFFER.copy = buffer


def _copy_in_kernel(in_fd: int, out_fd: int, offset: int, position: int, length: int) -> int:
    """As much of the range as ``os.copy_file_range`` copies; the rest is the caller's."""
    copy = getattr(os, "copy_file_range", None)  # Linux only
    done = 0
    while copy is not None and done < length:
        try:
            moved: int = copy(
                in_fd, out_fd, min(length - done, 1 << 30), offset + done, position + done
            )
        except OSError:  # across file systems on old kernels, special files
            return done
        if moved <= 0:
            return done
        done += moved
    return done


def _copy_through_buffer(
    in_fd: int, out_fd: int, at: tuple[int, int], length: int, path: os.PathLike[str] | str
) -> None:
    """Copy ``length`` bytes from ``at[0]`` of ``in_fd`` to ``at[1]`` of ``out_fd`` through
    one reused ``COPY_BUFFER``, written in pieces that end on multiples of ``WRITE_STEP``."""
    offset, position = at
    with _copy_buffer() as buffer:
        lead = position % _LINE  # the buffer starts where the output does within a cache line
        whole = memoryview(buffer)[lead : lead + COPY_BUFFER]
        for start in range(0, length, COPY_BUFFER):
            size = min(COPY_BUFFER, length - start)
            got = readback.read_into(in_fd, whole[:size], offset + start)
            if got != size:
                raise TruncatedFileError(
                    "tensor data ends early",
                    expected=offset + length,
                    actual=offset + start + got,
                    path=str(path),
                )
            done = 0
            while done < size:
                at_output = position + start + done
                end = min(size, done + WRITE_STEP - at_output % WRITE_STEP)
                moved = os.pwrite(out_fd, whole[done:end], at_output)
                if moved <= 0:
                    raise OSError(errno.ENOSPC, "the output file accepted no more bytes")
                done += moved


def paired_chunks(
    a: TensorRef, b: TensorRef, chunk: int = CHUNK
) -> Iterator[tuple[NDArray, NDArray]]:
    """Two tensors with the same element count, walked side by side in equal-length pieces
    (their own chunk boundaries may differ: a strided view against a flat range)."""
    import numpy as np

    left, right = source_chunks(a, chunk), source_chunks(b, chunk)
    piece_a: NDArray = np.empty(0)
    piece_b: NDArray = np.empty(0)
    while True:
        while piece_a.size == 0:
            following = next(left, None)
            if following is None:
                break
            piece_a = following.reshape(-1)
        while piece_b.size == 0:
            following = next(right, None)
            if following is None:
                break
            piece_b = following.reshape(-1)
        if piece_a.size == 0 or piece_b.size == 0:
            if piece_a.size or piece_b.size:
                raise CorruptFileError("two tensors of one shape gave different element counts")
            return
        step = min(piece_a.size, piece_b.size)
        yield piece_a[:step], piece_b[:step]
        piece_a, piece_b = piece_a[step:], piece_b[step:]
