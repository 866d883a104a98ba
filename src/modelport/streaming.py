"""Moving tensor bytes in bounded memory: from a source file to an output file, or to a hash.

Peak memory must not grow with the file, and mapped file pages count, so nothing here maps
a whole file: contiguous ranges go through ``os.copy_file_range`` (in the kernel, no user
buffer) or ``os.pread`` into one reused buffer; casts and strided views are done a chunk at
a time. A zip writer needs the CRC-32 of what it writes, so bytes pass through user space
whenever a checksum is asked for.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from modelport import dtypes
from modelport.errors import CorruptFileError, MissingDependencyError, TruncatedFileError
from modelport.tensors import NDArray, TensorRef

CHUNK = 16 << 20  # bytes per read step; memory use is a small multiple of this
CAST_CHUNK = 4 << 20  # casts hold several temporaries per chunk: smaller steps


@dataclass(frozen=True)
class OutputTensor:
    """One tensor as a writer will store it: its name, the dtype written, and its source."""

    name: str
    dtype: str
    source: TensorRef

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return dtypes.dtype(self.dtype).nbytes(self.source.numel)

    @property
    def is_cast(self) -> bool:
        return self.dtype != self.source.dtype


def source_chunks(tensor: TensorRef, chunk: int = CHUNK) -> Iterator[NDArray]:
    """The tensor's elements in C order, as 1-d arrays of its own dtype, ``chunk`` bytes at a
    time. Flat file storages are read with ``pread``; other storages through their reader."""
    if tensor.numel == 0:  # no elements: nothing to read (an empty strided view included)
        return
    info = dtypes.dtype(tensor.dtype)
    per_chunk = max(1, chunk // info.itemsize)
    span = tensor.byte_range()
    if span is not None and tensor.storage is not None and tensor.storage.path is not None:
        offset, length = span
        with open(tensor.storage.path, "rb") as handle:
            for start in range(0, length, per_chunk * info.itemsize):
                size = min(per_chunk * info.itemsize, length - start)
                raw = os.pread(handle.fileno(), size, offset + start)
                if len(raw) != size:
                    raise TruncatedFileError(
                        f"tensor data ends early at byte {offset + start + len(raw)}",
                        expected=offset + start + size,
                        actual=offset + start + len(raw),
                        path=tensor.storage.path,
                    )
                yield np.frombuffer(raw, dtype=_carrier(info))
        return
    if info.numpy is None:  # quantized blocks: raw bytes only
        yield tensor.raw_bytes()
        return
    # Strided views, storages inside compressed members, in-memory pickles: a view, walked
    # in row blocks so only one chunk is ever copied at a time.
    view = tensor.numpy()
    flat_rows = view.reshape(view.shape[0], -1) if view.ndim > 1 else view.reshape(1, -1)
    row_bytes = max(1, flat_rows.shape[1] * info.itemsize)
    rows_per_chunk = max(1, chunk // row_bytes)
    for start in range(0, flat_rows.shape[0], rows_per_chunk):
        block = np.ascontiguousarray(flat_rows[start : start + rows_per_chunk]).reshape(-1)
        yield block


def _carrier(info: dtypes.DType) -> np.dtype[Any]:
    return info.numpy if info.numpy is not None else np.dtype(np.uint8)


def cast_chunk(chunk: NDArray, source_dtype: str, target_dtype: str) -> NDArray:
    """One chunk converted to ``target_dtype`` (floating types only: the planner refuses the
    rest before anything is written)."""
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
            raise OSError(28, "the output file accepted no more bytes (disk full?)")
        view = view[written:]


def dequantize(raw: NDArray, ggml_type: str) -> NDArray:
    """GGML blocks to float32 with gguf-py's reference dequantizer (``modelport[gguf]``)."""
    try:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as reference
    except ImportError:
        raise MissingDependencyError("gguf", "gguf", "Dequantizing GGUF tensors") from None
    block_bytes = (dtypes.dtype(ggml_type).block or (1, 1))[1]
    blocks = raw.reshape(-1).view(np.uint8).reshape(-1, block_bytes)
    values: NDArray = reference(blocks, GGMLQuantizationType[ggml_type]).reshape(-1)
    return values.astype(np.float32, copy=False)


def write_tensor(handle: BinaryIO, tensor: OutputTensor, *, checksum: bool = False) -> int:
    """Append ``tensor``'s bytes (cast if needed) to ``handle``, an unbuffered file; return
    their CRC-32 if ``checksum``.

    Bytes that pass unchanged from a flat file range go through ``os.copy_file_range``
    when no checksum is needed (no user-space copy at all)."""
    source = tensor.source
    span = source.byte_range()
    if (
        not checksum
        and not tensor.is_cast
        and span is not None
        and source.storage is not None
        and source.storage.path is not None
    ):
        handle.flush()
        _copy_range(source.storage.path, span[0], span[1], handle)
        advance(span[1])
        return 0
    if (
        not tensor.is_cast
        and span is not None
        and source.storage is not None
        and source.storage.path
    ):
        return _copy_with_crc(source.storage.path, span[0], span[1], handle)
    crc = 0
    written = 0
    for chunk in source_chunks(source, CAST_CHUNK if tensor.is_cast else CHUNK):
        out = cast_chunk(chunk, source.dtype, tensor.dtype) if tensor.is_cast else chunk
        data = np.ascontiguousarray(out).reshape(-1).view(np.uint8).data
        write_all(handle, data)
        advance(len(data))
        written += len(data)
        if checksum:
            crc = zlib.crc32(data, crc)
    if written != tensor.nbytes:
        raise CorruptFileError(
            f"tensor {tensor.name!r}: wrote {written} bytes, expected {tensor.nbytes}"
        )
    return crc


_BUFFER = threading.local()  # one reusable read buffer per thread (see _copy_with_crc)
_PROGRESS = threading.local()  # the callback ``progress`` installs, per thread


@contextmanager
def progress(callback: Callable[[int], None] | None) -> Iterator[None]:
    """Within the block, every byte written or verified is reported to ``callback`` (the
    writers stay unaware of progress bars)."""
    previous = getattr(_PROGRESS, "callback", None)
    _PROGRESS.callback = callback
    try:
        yield
    finally:
        _PROGRESS.callback = previous


def advance(nbytes: int) -> None:
    callback = getattr(_PROGRESS, "callback", None)
    if callback is not None:
        callback(nbytes)


def _copy_with_crc(path: os.PathLike[str] | str, offset: int, length: int, handle: BinaryIO) -> int:
    """Copy a flat range through user space, for its CRC-32. The buffer is reused across
    calls: reading into fresh memory would cost a page fault per 4 KiB of every tensor."""
    buffer: bytearray | None = getattr(_BUFFER, "data", None)
    if buffer is None:
        buffer = _BUFFER.data = bytearray(CHUNK)
    crc = 0
    with open(path, "rb") as source:
        done = 0
        while done < length:
            n = min(len(buffer), length - done)
            view = memoryview(buffer)[:n]
            if os.preadv(source.fileno(), [view], offset + done) != n:
                raise TruncatedFileError(
                    "tensor data ends early",
                    expected=offset + length,
                    actual=offset + done,
                    path=str(path),
                )
            crc = zlib.crc32(view, crc)
            write_all(handle, view)
            advance(n)
            done += n
    return crc


def _copy_range(path: os.PathLike[str] | str, offset: int, length: int, handle: BinaryIO) -> None:
    out_fd = handle.fileno()
    position = os.lseek(out_fd, 0, os.SEEK_CUR)
    with open(path, "rb") as source:
        in_fd = source.fileno()
        done = 0
        while done < length:
            try:
                moved = os.copy_file_range(
                    in_fd, out_fd, min(length - done, 1 << 30), offset + done, position + done
                )
            except OSError:
                moved = 0
            if moved <= 0:  # other filesystems, old kernels: a bounded buffer instead
                size = min(length - done, CHUNK)
                data = os.pread(in_fd, size, offset + done)
                if len(data) != size:
                    raise TruncatedFileError(
                        "tensor data ends early",
                        expected=offset + length,
                        actual=offset + done + len(data),
                        path=str(path),
                    )
                moved = os.pwrite(out_fd, data, position + done)
            done += moved
    os.lseek(out_fd, position + length, os.SEEK_SET)


class RangeComparer:
    """Compares byte ranges of files through two buffers reused for every chunk: reading
    into fresh memory each time would cost a page fault per 4 KiB, more than the reading."""

    def __init__(self, chunk: int = CHUNK // 2) -> None:
        self.left = bytearray(chunk)
        self.right = bytearray(chunk)
        self.equal = np.empty(chunk, dtype=bool)

    def same(
        self,
        a: tuple[str | os.PathLike[str], int],
        b: tuple[str | os.PathLike[str], int],
        length: int,
    ) -> bool:
        with open(a[0], "rb") as first, open(b[0], "rb") as second:
            done = 0
            while done < length:
                n = min(len(self.left), length - done)
                got_a = os.preadv(first.fileno(), [memoryview(self.left)[:n]], a[1] + done)
                got_b = os.preadv(second.fileno(), [memoryview(self.right)[:n]], b[1] + done)
                if got_a != n or got_b != n:
                    raise TruncatedFileError(
                        "a compared range ends early", expected=n, actual=min(got_a, got_b)
                    )
                left = np.frombuffer(self.left, np.uint8, n)
                right = np.frombuffer(self.right, np.uint8, n)
                if not np.equal(left, right, out=self.equal[:n]).all():
                    return False
                advance(n)
                done += n
        return True


def paired_chunks(
    a: TensorRef, b: TensorRef, chunk: int = CHUNK
) -> Iterator[tuple[NDArray, NDArray]]:
    """Two tensors with the same element count, walked side by side in equal-length pieces
    (their own chunk boundaries may differ: a strided view against a flat range)."""
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
