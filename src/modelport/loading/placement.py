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
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from modelport import dtypes
from modelport.errors import UsageError
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
