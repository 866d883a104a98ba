"""From a file's object tree to what people ask about: named tensors, extras, aliases, weights.

Names follow what ``torch.load`` users see: state_dict keys, nested checkpoint entries
joined with ``.`` (``optimizer_state_dict.state.0.exp_avg``), a pickled module's
state_dict keys under its place in the tree. The walk is iterative and budgeted, so a
hostile tree (deep, cyclic, or a DAG that would explode into exponentially many paths)
costs bounded time and gives a clear error.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from operator import attrgetter
from typing import Any

from modelport import limits
from modelport.errors import LimitExceededError
from modelport.pickles import modules
from modelport.pickles.numpy_types import NumpyArray
from modelport.pickles.records import ByteSpan, CallRecord, GlobalRef, ObjectRecord
from modelport.pickles.torch_types import (
    SparseTensor,
    TorchConstant,
    TorchDevice,
    TorchDType,
)
from modelport.tensors import TensorRef

# Prefixes a training wrapper lays over every state_dict key, and the wrapper.
WRAPPER_PREFIXES: dict[str, str] = {
    "module.": "DistributedDataParallel / DataParallel",
    "_orig_mod.": "torch.compile",
    "model.": "a Lightning-style wrapper",
}
LIGHTNING_WRAPPER = "model"  # a wrapper only in some files: see conversion.selecting

# Checkpoint keys that hold the model weights, in the order they are preferred.


def wrapper_prefix(names: Iterable[str]) -> str:
    """The wrapper prefixes every name carries, outermost first (``_orig_mod.module.`` for a
    compiled DDP model), or "" when there is none. ``--strip-prefix auto`` strips exactly
    this, in convert, diff and check alike; a name that is nothing but the prefix stops it."""
    current = list(names)
    removed = ""
    while current:
        prefix = next(
            (
                p
                for p in WRAPPER_PREFIXES
                if all(n.startswith(p) and len(n) > len(p) for n in current)
            ),
            None,
        )
        if prefix is None:
            break
        removed += prefix
        current = [n[len(prefix) :] for n in current]
    return removed


# The name of an object's state that is not attributes (what its own __setstate__ reads).
CUSTOM_STATE = "__state__"
# The name of the arguments an object was constructed with, or a call made with.
ARGS = "__args__"


def tensors_of(tree: Any) -> dict[str, TensorRef]:
    """Every tensor in the tree under its dotted name, in the tree's order.

    A pickle can make a container hold one of its own ancestors (a config node pointing back
    at its parent, as omegaconf objects in Lightning's ``hyper_parameters`` do): such a
    reference is a cycle, not nesting, and is not followed, as it holds nothing new."""
    if isinstance(tree, dict) and len(tree) < limits.MAX_TREE_NODES and _flat(tree):
        return dict(tree)
    found: dict[str, TensorRef] = {}
    budget = limits.MAX_TREE_NODES
    on_path: set[int] = set()  # the containers being walked, from the root down
    stack: list[tuple[str, Any, int, bool]] = [("", tree, 0, False)]
    while stack:
        name, value, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(value))
            continue
        budget -= 1
        if budget < 0:
            raise LimitExceededError(
                "objects in the file's tree", limits.MAX_TREE_NODES, limits.MAX_TREE_NODES + 1
            )
        if depth > limits.MAX_DEPTH:
            raise LimitExceededError("nesting depth of the file's tree", limits.MAX_DEPTH, depth)
        if isinstance(value, NumpyArray) and value.objects is None:
            value = value.tensor
        if isinstance(value, TensorRef):
            found.setdefault(name, value)
            continue
        children = _children(value)
        if not children or id(value) in on_path:
            continue
        on_path.add(id(value))
        stack.append((name, value, depth, True))
        stack.extend(
            (_join(name, key), child, depth + 1, False) for key, child in reversed(children)
        )
    return found


def _flat(tree: dict[Any, Any]) -> bool:
    """Every key a string, every value a TensorRef: a plain state_dict, the common case, is
    its own tensor listing, with no walk."""
    return {*map(type, tree.values())} <= {TensorRef} and {*map(type, tree)} <= {str}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _children(value: Any) -> list[tuple[str, Any]]:
    """The named parts of a container value, in order; leaves have none."""
    if isinstance(value, dict):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(value)]
    if isinstance(value, SparseTensor):
        return [(k, v) for k, v in value.parts.items() if isinstance(v, TensorRef)]
    if isinstance(value, NumpyArray) and value.objects is not None:
        if value.shape == () and len(value.objects) == 1:  # what ``.item()`` gives
            return _children(value.objects[0])
        return [(str(i), v) for i, v in enumerate(value.objects)]
    if isinstance(value, (ObjectRecord, CallRecord)):  # state, then what was filled in
        if isinstance(value, ObjectRecord) and modules.is_module(value):
            return list(modules.state_dict(value).items())
        custom = value.custom_state()
        return (
            list(value.attributes().items())
            + ([] if custom is None else [(CUSTOM_STATE, custom)])
            + ([(ARGS, value.args)] if value.args else [])
            + [(str(k), v) for k, v in value.dict_items.items()]
            + [(str(i), v) for i, v in enumerate(value.list_items)]
        )
    return []


def aliases(tensors: dict[str, TensorRef]) -> list[list[str]]:
    """Groups of names whose tensors share one storage (tied weights, views)."""
    if _storages_distinct(tensors):
        return []
    groups: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.storage is not None and tensor.storage.nbytes > 0:
            groups.setdefault(id(tensor.storage), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def stored_bytes_by_dtype(tensors: dict[str, TensorRef]) -> dict[str, int]:
    """Bytes per dtype, largest first, counting each tensor once however many names it has
    (tied weights; the same view listed twice)."""
    totals: Counter[str] = Counter()
    if _storages_distinct(tensors):
        kinds = {*map(_DTYPE, tensors.values())}
        if len(kinds) == 1:  # one dtype, the common case: summed in C
            return {kinds.pop(): sum(map(_NBYTES, tensors.values()))}
        for tensor in tensors.values():
            totals[tensor.dtype] += tensor.nbytes
        return dict(totals.most_common())
    seen: set[tuple[Any, ...]] = set()
    for tensor in tensors.values():
        place = view_key(tensor)
        if place not in seen:
            seen.add(place)
            totals[tensor.dtype] += tensor.nbytes
    return dict(totals.most_common())


def view_key(tensor: TensorRef) -> tuple[Any, ...]:
    """Equal for two names of one stored view (tied weights, a view listed twice): the same
    storage, offset, shape, strides and dtype."""
    if tensor.storage is None:
        return (id(tensor),)
    return (id(tensor.storage), tensor.element_offset, tensor.shape, tensor.strides, tensor.dtype)


def _storages_distinct(tensors: dict[str, TensorRef]) -> bool:
    """Whether no two tensors hold one storage (no ties, no views, at most one meta tensor):
    the common case, told by one pass in C, where grouping a million names would not be."""
    storages = list(map(_STORAGE, tensors.values()))
    return len(set(storages)) == len(storages)  # a Storage is equal only to itself


_STORAGE, _DTYPE, _NBYTES = map(attrgetter, ("storage", "dtype", "nbytes"))


def parameter_count(tensors: dict[str, TensorRef]) -> int:
    return sum(math.prod(t.shape) for t in tensors.values())


def extras(tree: Any) -> Any:
    """The tree's non-tensor values as JSON-ready data; tensor-only branches are dropped, and
    a reference back to a container being converted (a cycle) is shown as such."""
    converted = _to_json(tree, 0, set())
    return {} if converted is _DROP else converted


_DROP = object()
_CONTAINERS = (dict, list, tuple, set, frozenset, ObjectRecord, CallRecord)


def _to_json(value: Any, depth: int, on_path: set[int]) -> Any:
    if depth > limits.MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, _CONTAINERS):
        if id(value) in on_path:
            return "<cycle>"
        on_path.add(id(value))
        try:
            return _container_to_json(value, depth, on_path)
        finally:
            on_path.discard(id(value))
    return _leaf_to_json(value)


def _container_to_json(value: Any, depth: int, on_path: set[int]) -> Any:
    if isinstance(value, CallRecord):  # a call's result: its text, and the state BUILD gave it
        if not value.attributes():
            return repr(value)
        state = {k: _to_json(v, depth + 1, on_path) for k, v in value.attributes().items()}
        func = value.func.path if isinstance(value.func, GlobalRef) else repr(value.func)
        return {"__call__": func, **{k: v for k, v in state.items() if v is not _DROP}}
    if isinstance(value, ObjectRecord):
        if modules.is_module(value):
            return _DROP
        attributes = value.attributes().items()
        state = {k: _to_json(v, depth + 1, on_path) for k, v in attributes}
        return {"__class__": value.class_path, **{k: v for k, v in state.items() if v is not _DROP}}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            converted = _to_json(item, depth + 1, on_path)
            if converted is not _DROP:
                out[str(key)] = converted
        return out if out or not value else _DROP
    items = [_to_json(v, depth + 1, on_path) for v in value]
    if items and all(v is _DROP for v in items):
        return _DROP
    return [None if v is _DROP else v for v in items]


def _leaf_to_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, NumpyArray) and value.tensor is None:
        return {"__class__": "numpy.ndarray", "dtype": value.dtype_text, "shape": list(value.shape)}
    if isinstance(value, (TensorRef, NumpyArray, SparseTensor)):
        return _DROP
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": len(value)}
    if isinstance(value, ByteSpan):
        return {"__bytes__": value.length}
    if isinstance(value, (TorchDType, TorchDevice, TorchConstant)):
        return str(value)
    if isinstance(value, complex):
        return {"real": value.real, "imag": value.imag}
    return repr(value)  # records of globals and calls, dtypes, storages: their text
