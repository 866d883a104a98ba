"""The arithmetic of DeepSpeed's ``zero_to_fp32``: whole parameters out of flat partitions.

ZeRO keeps the fp32 master copy of each parameter group as one flat vector split across the
data-parallel ranks. The saved shapes (``param_shapes``, in the optimizer's order) are the
only key to where each parameter lies, so the order and the padding rules below must match
DeepSpeed's exactly (deepspeed/utils/zero_to_fp32.py):

- stages 1 and 2: each group's partitions, one per rank, are concatenated; parameters follow
  one another in it, each followed by its ``param_alignment_paddings`` entry when the file
  records them. The vector's tail is padding up to a multiple of ``2 * world_size``;
- stage 3: every parameter is cut into ``ceil(numel / world_size)`` elements per rank (the
  last rank's fragment padded). Rank ``r``'s flat groups, read one after another, hold its
  fragments in order; a parameter is its fragments from every rank, joined and cut to
  ``numel``. Frozen parameters of stage 3 are stored the same way, one fragment per rank.

Each merged parameter is a ``TensorRef``: a view of the partition when it lies whole in
one (always so with one rank), else a reader that joins the pieces when the bytes are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from modelport import dtypes
from modelport.errors import CorruptFileError
from modelport.tensors import NDArray, Storage, TensorRef

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Piece:
    """``length`` elements from ``start`` of a flat (1-d) saved tensor."""

    flat: TensorRef
    start: int
    length: int


def merge_partitioned(
    group_shapes: list[Shapes],
    partitions: list[list[TensorRef]],
    paddings: list[list[int]] | None,
) -> dict[str, TensorRef]:
    """Stages 1 and 2: ``partitions[rank][group]`` are the ranks' slices of each group."""
    world = len(partitions)
    merged: dict[str, TensorRef] = {}
    for group, shapes in enumerate(group_shapes):
        parts = [rank[group] for rank in partitions]
        available = sum(p.numel for p in parts)
        pads = paddings[group] if paddings is not None else [0] * len(shapes)
        if len(pads) != len(shapes):
            raise CorruptFileError(
                f"group {group} records {len(pads)} alignment paddings for {len(shapes)} parameters"
            )
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads, strict=True):
            numel = math.prod(shape)
            merged[name] = joined(name, shape, take(parts, offset, numel, name))
            offset += numel + pad
        align = 2 * world
        if _round_up(offset, align) != _round_up(available, align):
            raise CorruptFileError(
                f"group {group}'s parameters take {offset} elements of the {available} its "
                f"{world} partitions hold: the shapes do not describe these partitions"
            )
    return merged


def merge_fragmented(shapes: Shapes, flat_groups: list[list[TensorRef]]) -> dict[str, TensorRef]:
    """Stage 3: ``flat_groups[rank]`` hold the rank's fragment of every parameter, in order."""
    world = len(flat_groups)
    lengths = [g.numel for g in flat_groups[0]]
    for rank, groups in enumerate(flat_groups):
        if [g.numel for g in groups] != lengths:
            raise CorruptFileError(
                f"rank {rank}'s flat groups hold {[g.numel for g in groups]} elements, "
                f"rank 0's {lengths}: the partitions do not belong together"
            )
    merged: dict[str, TensorRef] = {}
    offset = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        fragment = -(-numel // world)
        pieces = [p for groups in flat_groups for p in take(groups, offset, fragment, name)]
        merged[name] = joined(name, shape, _first(pieces, numel))
        offset += fragment
    if offset != sum(lengths):
        raise CorruptFileError(
            f"the parameters take {offset} elements of each rank's {sum(lengths)}: the shapes "
            "do not describe these partitions"
        )
    return merged


def merge_frozen_fragments(
    shapes: Shapes, fragments: list[dict[str, TensorRef]]
) -> dict[str, TensorRef]:
    """Stage 3's frozen parameters: one fragment per rank, joined and cut to size."""
    merged: dict[str, TensorRef] = {}
    for name, shape in shapes.items():
        found = [rank.get(name) for rank in fragments]
        flats = [f for f in found if f is not None]
        if len(flats) != len(found):
            raise CorruptFileError(f"frozen parameter {name!r} lacks a fragment on some rank")
        pieces = [Piece(f, 0, f.numel) for f in flats]
        merged[name] = joined(name, shape, _first(pieces, math.prod(shape)))
    return merged


def take(flats: list[TensorRef], start: int, length: int, name: str) -> list[Piece]:
    """The pieces of ``flats``, read as one vector, that hold elements ``start`` to
    ``start + length``."""
    pieces: list[Piece] = []
    base = 0
    for flat in flats:
        low, high = max(start, base), min(start + length, base + flat.numel)
        if low < high:
            pieces.append(Piece(flat, low - base, high - low))
        base += flat.numel
    if start + length > base:
        raise CorruptFileError(
            f"parameter {name!r} needs elements up to {start + length}, the partitions hold {base}"
        )
    return pieces


def _first(pieces: list[Piece], numel: int) -> list[Piece]:
    kept: list[Piece] = []
    left = numel
    for piece in pieces:
        if left <= 0:
            break
        kept.append(Piece(piece.flat, piece.start, min(piece.length, left)))
        left -= kept[-1].length
    if left > 0:
        raise CorruptFileError(f"fragments hold {numel - left} of {numel} elements")
    return kept


def joined(name: str, shape: tuple[int, ...], pieces: list[Piece]) -> TensorRef:
    """The parameter the pieces make, without reading them: a view when there is one."""
    if not pieces:
        return TensorRef("float32", shape, Storage(None, 0, 0, key=name))
    kinds = {p.flat.dtype for p in pieces}
    if len(kinds) != 1:
        raise CorruptFileError(f"parameter {name!r} is stored in mixed dtypes {sorted(kinds)}")
    dtype = kinds.pop()
    nbytes = dtypes.dtype(dtype).nbytes(math.prod(shape))
    first = pieces[0]
    if len(pieces) == 1 and first.flat.is_contiguous and first.flat.storage is not None:
        offset = first.flat.element_offset + first.start
        flat = first.flat.storage
        if flat.reader is not None or flat.path is None:
            return TensorRef(dtype, shape, flat, element_offset=offset)
        # a storage of its own over the same bytes: parameters are not views of each other
        start = flat.offset + dtypes.dtype(dtype).nbytes(offset)
        if start + nbytes > flat.offset + flat.nbytes:
            raise CorruptFileError(f"parameter {name!r} runs past its partition's storage")
        return TensorRef(dtype, shape, Storage(flat.path, start, nbytes, name, None, flat.location))
    return TensorRef(dtype, shape, Storage(None, 0, nbytes, key=name, reader=_joiner(pieces)))


def as_float32(name: str, tensor: TensorRef) -> TensorRef:
    """A floating buffer as fp32, as ``zero_to_fp32`` returns buffers (``.float()``)."""
    if tensor.dtype == "float32" or not dtypes.dtype(tensor.dtype).is_floating:
        return tensor

    def cast() -> NDArray:
        import numpy as np

        array: NDArray = np.ascontiguousarray(tensor.numpy(), dtype=np.float32)
        return array.reshape(-1).view(np.uint8)

    nbytes = dtypes.dtype("float32").nbytes(tensor.numel)
    return TensorRef("float32", tensor.shape, Storage(None, 0, nbytes, key=name, reader=cast))


def _joiner(pieces: list[Piece]) -> Callable[[], NDArray]:
    def join() -> NDArray:
        import numpy as np

        arrays = [p.flat.numpy().reshape(-1)[p.start : p.start + p.length] for p in pieces]
        whole: NDArray = np.concatenate(arrays)
        return whole.view(np.uint8)

    return join


def _round_up(value: int, step: int) -> int:
    return step * -(-value // step)
