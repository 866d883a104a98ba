"""Chunked HDF5 datasets whose filter pipeline h5py cannot run but modelport can undo.

h5py has no blosc plugin, and PyTables writes blosc (filter 32001) by default for its
compressed arrays. modelport decodes blosc frames itself (``_blosc``), so such a dataset
is read chunk by chunk: h5py hands over each chunk's stored bytes (``read_direct_chunk``,
which runs no filter), and the pipeline is undone here, last filter first.

Pipeline (HDF5 File Format Specification 3.0, the filter pipeline message): filters run
in order when a chunk is written, so they are undone in reverse; bit ``i`` of a chunk's
filter mask set means filter ``i`` was skipped for it. Filters undone here: blosc (32001),
deflate (1, a zlib stream), shuffle (2: byte ``j`` of every element together, element
size in its first client value, the bytes past the last whole element as they are) and
fletcher32 (3: a 4-byte checksum after the data, dropped). A pipeline holding any other
filter is not read here. Chunks never written hold the dataset's fill value; an edge
chunk is whole on disk and only its part inside the dataset is kept.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import CorruptFileError
from modelport.formats import _blosc
from modelport.formats._hdf5_source import DatasetRead, H5Source
from modelport.tensors import NDArray

if TYPE_CHECKING:
    import numpy as np

DEFLATE = 1
SHUFFLE = 2
FLETCHER32 = 3
BLOSC = 32001
UNDONE_HERE = frozenset({DEFLATE, SHUFFLE, FLETCHER32, BLOSC})
CHECKSUM_BYTES = 4


def own_pipeline(h5py: Any, plist: Any) -> tuple[tuple[int, int], ...] | None:
    """(filter id, first client value) of each filter in order, when the dataset is chunked
    and modelport undoes every filter; None otherwise."""
    if plist.get_layout() != h5py.h5d.CHUNKED:
        return None
    found = []
    for index in range(plist.get_nfilters()):
        code, _, values, _ = plist.get_filter(index)
        if int(code) not in UNDONE_HERE:
            return None
        found.append((int(code), int(values[0]) if values else 0))
    return tuple(found)


def chunk_reader(
    source: H5Source,
    name: str,
    shape: tuple[int, ...],
    stored: np.dtype[Any],
    dtype_name: str,
    pipeline: tuple[tuple[int, int], ...],
    path: Path,
) -> Callable[[], NDArray]:
    """Reads one dataset chunk by chunk, undoing ``pipeline``, as little-endian flat bytes."""

    def read_bytes() -> NDArray:
        import numpy as np

        little = stored.newbyteorder("<")
        nbytes = int(np.prod(shape, dtype=np.uint64)) * stored.itemsize
        read = DatasetRead(source, name, shape, little, dtype_name, path)
        data = read.taking(
            lambda dset: _assemble(dset, shape, stored, pipeline, f"dataset {name!r}"), nbytes
        )
        return np.ascontiguousarray(data.astype(little, copy=False)).reshape(-1).view(np.uint8)

    return read_bytes


def _assemble(
    dset: Any,
    shape: tuple[int, ...],
    stored: np.dtype[Any],
    pipeline: tuple[tuple[int, int], ...],
    where: str,
) -> NDArray:
    import numpy as np

    chunks = tuple(int(c) for c in dset.chunks)
    if len(chunks) != len(shape) or any(c <= 0 for c in chunks):
        raise CorruptFileError(f"{where}: chunk shape {chunks} for a dataset of shape {shape}")
    chunk_bytes = int(np.prod(chunks, dtype=np.uint64)) * stored.itemsize
    out = np.full(shape, dset.fillvalue, dtype=stored)
    for index in range(dset.id.get_num_chunks()):
        offset = tuple(int(o) for o in dset.id.get_chunk_info(index).chunk_offset)
        if any(o % c or not 0 <= o < s for o, c, s in zip(offset, chunks, shape, strict=True)):
            raise CorruptFileError(f"{where}: a chunk at {offset} lies outside the dataset")
        mask, raw = dset.id.read_direct_chunk(offset)
        data = undo_pipeline(bytes(raw), int(mask), pipeline, chunk_bytes, where)
        if len(data) != chunk_bytes:
            raise CorruptFileError(
                f"{where}: the chunk at {offset} decodes to {len(data)} bytes, not {chunk_bytes}"
            )
        block = np.frombuffer(data, stored).reshape(chunks)
        region = tuple(
            slice(o, min(o + c, s)) for o, c, s in zip(offset, chunks, shape, strict=True)
        )
        out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
    return out


def undo_pipeline(
    raw: bytes, mask: int, pipeline: tuple[tuple[int, int], ...], size: int, where: str
) -> bytes:
    """A chunk's stored bytes with its filters undone, last first; ``size`` is its decoded
    size (the bound no step may pass, a checksum's 4 bytes aside)."""
    limit = size + CHECKSUM_BYTES * len(pipeline)
    data = raw
    for position in reversed(range(len(pipeline))):
        if mask >> position & 1:
            continue
        code, value = pipeline[position]
        if code == BLOSC:
            data = _blosc.decompress(data, limit, where)
        elif code == DEFLATE:
            data = _inflate(data, limit, where)
        elif code == SHUFFLE:
            data = _blosc.unshuffle(data, value) if value > 1 else data
        elif len(data) < CHECKSUM_BYTES:
            raise CorruptFileError(f"{where}: a chunk shorter than its fletcher32 checksum")
        else:
            data = data[:-CHECKSUM_BYTES]
    return data


def _inflate(data: bytes, limit: int, where: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        found = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise CorruptFileError(f"{where}: a deflated chunk does not inflate: {exc}") from None
    if len(found) > limit:
        raise CorruptFileError(f"{where}: a deflated chunk inflates past its size")
    return found
