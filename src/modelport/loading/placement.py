"""Tensor references to torch tensors, placed where ``map_location`` says, as ``torch.load`` does.

``map_location`` takes what ``torch.load`` takes:

- ``None``: the CPU (``torch.load`` would restore the device the file was saved from;
  modelport never moves tensors to an accelerator unasked);
- a device string or ``torch.device``: every storage there;
- a dict: a storage saved from ``key`` goes to ``value``, any other stays where it was saved;
- a callable ``(storage, location) -> storage | None``: called once per storage with the CPU
  ``torch.UntypedStorage`` and the location tag it was saved with (``"cpu"``, ``"cuda:0"``);
  ``None`` restores it where it was saved.

Formats other than torch's record no location: their storages are ``"cpu"``. Storages are
placed once, so tensors that shared storage in the file share it after placement too.

``place_tree`` does the same for a whole checkpoint (``load(weights=False)``): the tree the
restricted unpickler built comes back as ``torch.load(weights_only=True)`` would give it:
tensors, dicts (``OrderedDict`` with its ``_metadata``), lists, tuples, sets, plain values,
``torch.dtype`` and ``torch.device``; what no allowlist admits stays an inert record
(``ObjectRecord``, ``CallRecord``, ``GlobalRef``) whose contents are placed in turn.
"""

from __future__ import annotations

import builtins
import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from modelport import dtypes, limits
from modelport.errors import LimitExceededError, UsageError
from modelport.pickles.numpy_types import NumpyArray
from modelport.pickles.reading import PickledDict
from modelport.pickles.records import CallRecord, ObjectRecord
from modelport.pickles.torch_types import SparseTensor, TorchConstant, TorchDevice, TorchDType
from modelport.tensors import Storage, TensorRef, contiguous_strides
from modelport.transfer.streaming import dequantize

if TYPE_CHECKING:
    import torch

MapLocation: TypeAlias = "str | torch.device | Mapping[str, Any] | Callable[..., Any] | None"
CPU = "cpu"


class Placement:
    """Turns the tensors of one file into torch tensors on their devices, one storage at a
    time; ``default_location`` is the tag of storages that record none."""

    def __init__(
        self, map_location: MapLocation, *, default_location: str = CPU, dequantize: bool = False
    ) -> None:
        _check_map_location(map_location)
        self.map_location = map_location
        self.default_location = default_location or CPU
        self.dequantize = dequantize
        self._placed: dict[int, torch.Tensor] = {}  # id(Storage) -> 1-d uint8 on its device

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """``ref`` as a torch tensor on its device, a view of its placed storage."""
        import torch

        storage = ref.storage
        info = dtypes.dtype(ref.dtype)
        if storage is None:
            return ref.torch()  # a meta tensor: torch.load gives it back on meta as well
        location = storage.location or self.default_location
        if info.block is not None and self.dequantize:
            values = dequantize(ref.raw_bytes(), ref.dtype).reshape(ref.shape)
            return self._moved(torch.from_numpy(values), location)
        if ref.dtype.startswith(("q", "float4", "complex32")) or info.block or not ref.nbytes:
            return self._moved(ref.torch(), location)  # ref.torch() says why it cannot
        base = self._storage(storage, location)
        torch_dtype = getattr(torch, ref.dtype)
        itemsize = builtins.max(1, torch.empty(0, dtype=torch_dtype).element_size())
        usable = base.numel() - base.numel() % itemsize
        typed = base[:usable].view(torch_dtype)
        strides = ref.strides or contiguous_strides(ref.shape)
        view: torch.Tensor = typed.as_strided(ref.shape, strides, ref.element_offset)
        return view

    def _storage(self, storage: Storage, location: str) -> torch.Tensor:
        key = id(storage)
        if key not in self._placed:
            import torch

            raw = storage.bytes_view()
            cpu = torch.from_numpy(raw if raw.flags.writeable else raw.copy())
            self._placed[key] = self._place(cpu, location)
        return self._placed[key]

    def _moved(self, tensor: torch.Tensor, location: str) -> torch.Tensor:
        """A tensor made on the CPU, placed as a storage of its own would be."""
        import torch

        flat = tensor.contiguous().reshape(-1).view(torch.uint8)
        if flat.storage_offset() or flat.untyped_storage().nbytes() != flat.numel():
            flat = flat.clone()  # a storage holding exactly these bytes, nothing around them
        return self._place(flat, location).view(tensor.dtype).view(tensor.shape)

    def _place(self, cpu: torch.Tensor, location: str) -> torch.Tensor:
        """One storage (a 1-d uint8 CPU tensor) where ``map_location`` sends it."""
        import torch

        where = self.map_location
        if callable(where):
            result = where(cpu.untyped_storage(), location)
            if result is None:
                return _restore(cpu, location)
            if isinstance(result, torch.TypedStorage):
                typed = torch.empty(0, dtype=result.dtype, device=result.device).set_(result)
                return typed.view(torch.uint8)
            if not isinstance(result, torch.UntypedStorage):
                raise UsageError(
                    f"map_location returned a {type(result).__name__}; it must return a "
                    "storage (or None to keep the saved location), as torch.load expects"
                )
            return torch.empty(0, dtype=torch.uint8, device=result.device).set_(result)
        return _restore(cpu, self._device_for(location))

    def _device_for(self, location: str) -> Any:
        where = self.map_location
        if where is None:
            return CPU
        if isinstance(where, Mapping):
            return where.get(location, location)
        return where


def _restore(cpu: torch.Tensor, device: Any) -> torch.Tensor:
    import torch

    target = torch.device(device)
    return cpu if target.type == CPU else cpu.to(target)


def _check_map_location(where: MapLocation) -> None:
    """Refuse what torch.load would refuse, before anything is read."""
    import torch

    if where is None or callable(where) or isinstance(where, (str, torch.device, Mapping)):
        return
    raise UsageError(
        f"map_location must be a device string, a torch.device, a dict or a callable, "
        f"as torch.load takes; got {type(where).__name__}"
    )


def place_tree(tree: Any, placement: Placement) -> Any:
    """``tree`` with torch objects for what the file held as tensors, dtypes and devices.

    Containers are copied, never changed: the tree stays what the reader made. An object the
    tree reaches twice (a tensor in two places, a config node pointing back at its parent)
    is converted once and reached twice in the result, as ``torch.load``'s memo gives it."""
    return _TreeCopy(placement).value(tree, 0)


_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray)


class _TreeCopy:
    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.done: dict[int, Any] = {}  # id(value in the tree) -> its copy
        self.nodes = 0

    def value(self, value: Any, depth: int) -> Any:
        if isinstance(value, _LEAVES):
            return value
        found = self.done.get(id(value), _MISSING)
        if found is not _MISSING:
            return found
        self.nodes += 1
        if self.nodes > limits.MAX_TREE_NODES:
            raise LimitExceededError(
                "objects in the file's tree", limits.MAX_TREE_NODES, self.nodes
            )
        if depth > limits.MAX_DEPTH:
            raise LimitExceededError("nesting depth of the file's tree", limits.MAX_DEPTH, depth)
        if isinstance(value, (dict, list, ObjectRecord, CallRecord, SparseTensor)):
            return self._mutable(value, depth + 1)
        copied = self._immutable(value, depth + 1)
        self.done[id(value)] = copied
        return copied

    def _mutable(self, value: Any, depth: int) -> Any:
        """A container that may hold itself: made empty and remembered before it is filled."""
        if isinstance(value, dict):
            made: Any = OrderedDict() if isinstance(value, OrderedDict) else {}
            self.done[id(value)] = made
            for key, item in value.items():
                made[self.value(key, depth)] = self.value(item, depth)
            state = value.pickle_state if isinstance(value, PickledDict) else None
            if isinstance(state, dict):  # torch's state_dict ``_metadata``, set as BUILD sets it
                attributes = {k: v for k, v in state.items() if isinstance(k, str)}
                vars(made).update(self.value(attributes, depth))
            return made
        if isinstance(value, list):
            listed: list[Any] = []
            self.done[id(value)] = listed
            listed.extend(self.value(item, depth) for item in value)
            return listed
        record = copy.copy(value)  # an inert record: its parts placed, itself left inert
        self.done[id(value)] = record
        if isinstance(value, SparseTensor):
            record.parts = self.value(value.parts, depth)
            return record
        record.args = self.value(value.args, depth)
        record.list_items = self.value(value.list_items, depth)
        record.dict_items = self.value(value.dict_items, depth)
        record.state = self.value(value.state, depth)
        if isinstance(value, ObjectRecord):
            record.kwargs = self.value(value.kwargs, depth)
        return record

    def _immutable(self, value: Any, depth: int) -> Any:
        import torch

        if isinstance(value, TensorRef):
            return self.placement.tensor(value)
        if isinstance(value, (tuple, set, frozenset)):
            items = [self.value(item, depth) for item in value]
            return tuple(items) if isinstance(value, tuple) else type(value)(items)
        if isinstance(value, NumpyArray):
            return self._numpy(value, depth)
        if isinstance(value, (TorchDType, TorchConstant)):
            named = getattr(torch, value.name, None)
            known = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
            return named if isinstance(named, known) else value
        if isinstance(value, TorchDevice):
            try:
                return torch.device(value.spec)
            except (RuntimeError, ValueError, TypeError):
                return value
        return value  # GlobalRef and other records: inert as they are

    def _numpy(self, value: NumpyArray, depth: int) -> Any:
        """A numpy array of its own (a copy), or an object array of the converted items."""
        import numpy as np

        if value.tensor is not None:
            return np.array(value.tensor.numpy())
        if value.objects is None or len(value.objects) != math.prod(value.shape):
            return value
        array = np.empty(len(value.objects), dtype=object)
        for index, item in enumerate(value.objects):
            array[index] = self.value(item, depth)
        return array.reshape(value.shape)


_MISSING = object()
