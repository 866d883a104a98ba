"""TFLite sparse tensors (``Tensor.sparsity``), densified when their values are read.

The schema (tensorflow/lite/schema/schema.fbs) stores a sparse constant as its non-zero
values in traversal order plus ``SparsityParameters``:

- ``traversal_order``: the order of the n original dims and the k block dims (n + k
  entries), ``block_map``: which original dim each block dim splits;
- ``dim_metadata``: one ``DimensionMetadata`` per traversed dim, in traversal order:
  ``DENSE`` with a ``dense_size``, or ``SPARSE_CSR`` with ``array_segments`` and
  ``array_indices`` (a union of int32, uint16 and uint8 vectors).

A DENSE level runs 0..dense_size and carries ``position * dense_size + i`` down; a
SPARSE_CSR level runs ``segments[position]..segments[position + 1]``, takes its coordinate
from ``indices`` and carries the running index down; at the last level the position is the
index of the value. A blocked dim's coordinate is ``outer * block_size + inner``. This is the
walk TFLite's ``FormatConverter`` makes for its DENSIFY op.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from modelport import limits
from modelport.errors import CorruptFileError
from modelport.formats._flatbuffers import Table
from modelport.tensors import NDArray


class SparsitySlot(IntEnum):
    TRAVERSAL_ORDER = 0
    BLOCK_MAP = 1
    DIM_METADATA = 2


class DimensionSlot(IntEnum):
    FORMAT = 0
    DENSE_SIZE = 1
    SEGMENTS_TYPE = 2
    SEGMENTS = 3
    INDICES_TYPE = 4
    INDICES = 5


SPARSE_CSR = 1
# SparseIndexVector's members: Int32Vector, Uint16Vector, Uint8Vector, each ``values`` at 0.
_INDEX_FORMATS = {1: "<i", 2: "<H", 3: "<B"}


@dataclass(frozen=True)
class Level:
    """One traversed dim: DENSE (``segments`` and ``indices`` empty) or SPARSE_CSR."""

    sparse: bool
    dense_size: int
    segments: tuple[int, ...] = ()
    indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sparsity:
    traversal_order: tuple[int, ...]
    block_map: tuple[int, ...]
    levels: tuple[Level, ...]


def read_sparsity(table: Table, rank: int) -> Sparsity:
    """The sparsity parameters of a tensor of ``rank`` dims, checked for shape."""
    limit = limits.MAX_RANK * 2
    order = tuple(table.scalars(SparsitySlot.TRAVERSAL_ORDER, "<i", limit))
    block_map = tuple(table.scalars(SparsitySlot.BLOCK_MAP, "<i", limit))
    dims = table.tables(SparsitySlot.DIM_METADATA, "dimension metadata")
    total = rank + len(block_map)
    if sorted(order) != list(range(total)) or len(dims) != total:
        raise CorruptFileError(
            f"sparse tensor: traversal order {list(order)} and {len(dims)} dim metadata do not "
            f"describe {rank} dims and {len(block_map)} blocks",
            path=table.buf.path,
        )
    if any(not 0 <= d < rank for d in block_map):
        raise CorruptFileError(f"sparse tensor: block map {list(block_map)}", path=table.buf.path)
    return Sparsity(order, block_map, tuple(_level(dim) for dim in dims))


def _level(dim: Table) -> Level:
    size = dim.scalar(DimensionSlot.DENSE_SIZE, "<i", 0)
    if dim.scalar(DimensionSlot.FORMAT, "<b", 0) != SPARSE_CSR:
        return Level(False, size)
    segments = _index_vector(dim, DimensionSlot.SEGMENTS_TYPE, DimensionSlot.SEGMENTS)
    indices = _index_vector(dim, DimensionSlot.INDICES_TYPE, DimensionSlot.INDICES)
    return Level(True, size, segments, indices)


def _index_vector(dim: Table, type_slot: int, value_slot: int) -> tuple[int, ...]:
    kind = dim.scalar(type_slot, "<B", 0)
    where = dim.ref(value_slot)
    if kind not in _INDEX_FORMATS or where == 0:
        raise CorruptFileError(
            "sparse tensor: a CSR dim without its index vector", path=dim.buf.path
        )
    values = dim.buf.table(where, "sparse index vector")
    return tuple(values.scalars(0, _INDEX_FORMATS[kind], limits.MAX_FLATBUFFER_ITEMS))


def densify(sparsity: Sparsity, shape: tuple[int, ...], values: NDArray) -> NDArray:
    """The dense array of ``shape`` that the stored non-zero ``values`` stand for."""
    import numpy as np

    rank = len(shape)
    dense = np.zeros(shape, dtype=values.dtype)
    block_sizes = {
        rank + j: sparsity.levels[sparsity.traversal_order.index(rank + j)].dense_size
        for j in range(len(sparsity.block_map))
    }
    coords = [0] * len(sparsity.levels)
    flat = values.reshape(-1)

    def place(position: int) -> None:
        point = list(coords[:rank])
        for j, dim in enumerate(sparsity.block_map):
            point[dim] = point[dim] * block_sizes[rank + j] + coords[rank + j]
        if position >= flat.size or any(not 0 <= p < s for p, s in zip(point, shape, strict=True)):
            raise CorruptFileError("sparse tensor: a value or index lies outside the tensor")
        dense[tuple(point)] = flat[position]

    def walk(level: int, position: int) -> None:
        if level == len(sparsity.levels):
            place(position)
            return
        spec, dim = sparsity.levels[level], sparsity.traversal_order[level]
        if not spec.sparse:
            for i in range(spec.dense_size):
                coords[dim] = i
                walk(level + 1, position * spec.dense_size + i)
            return
        if position + 1 >= len(spec.segments):
            raise CorruptFileError("sparse tensor: a CSR segment lies outside its vector")
        for i in range(spec.segments[position], spec.segments[position + 1]):
            if i >= len(spec.indices):
                raise CorruptFileError("sparse tensor: a CSR index lies outside its vector")
            coords[dim] = spec.indices[i]
            walk(level + 1, i)

    walk(0, 0)
    return dense
