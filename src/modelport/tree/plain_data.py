"""A file's tree as plain data, for ``convert --all``: what a target can hold of it.

The tree a reader returns holds tensors, plain values and, from pickles, the inert records
of what a pickle names (``pickles.records``). ``plain`` copies it into what a target writes
around its tensors (``typed_json`` describes that data); ``map_tensors`` then swaps each
tensor for the one written, under the name ``names.tensors_of`` gives it, so the nested
tree and the flat tensor listing always agree.
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelport import limits
from modelport.errors import ConversionError, LimitExceededError, ModelportError
from modelport.pickles import modules
from modelport.pickles.numpy_types import NumpyArray, NumpyDType, NumpyScalar
from modelport.pickles.reading import PickledDict, Trusted
from modelport.pickles.records import ByteSpan, CallRecord, FileBytes, GlobalRef, ObjectRecord
from modelport.pickles.torch_types import SparseTensor, TorchDevice, TorchDType
from modelport.tensors import TensorRef
from modelport.transfer.write_plan import OutputTensor
from modelport.tree.names import ARGS, CUSTOM_STATE, tensors_of
from modelport.tree.weights import Apart

WHOLE_FILE = "(the whole file)"


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()  # returned by a ``map_tensors`` callback: leave this tensor out


# -- plain data ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plain:
    """A tree reduced to plain data with ``TensorRef`` leaves, and what was left out."""

    tree: Any
    dropped: tuple[str, ...]  # "path (what it was)"
    notes: tuple[str, ...]


def plain(tree: Any, *, drop: bool = False, records: bool = True) -> Plain:
    """``tree`` (as a reader returned it) as plain data, tensors kept as ``TensorRef``.

    With ``records`` the inert records of objects stay (copied, their class paths and state
    plain data in turn), and a container that holds one of its ancestors keeps that
    reference. Values that are not representable raise ``ConversionError`` naming their
    paths, or with ``drop`` are left out (removed from dicts, ``None`` in lists and tuples)
    and listed; without ``records`` an object that holds tensors then keeps its state as a
    plain mapping, under the names ``inspect`` gives its tensors.
    """
    walker = _Plainer(drop, records)
    result = walker.value(tree, "", 0)
    if walker.bad and not drop:
        listed = "; ".join(walker.bad[:10])
        more = f" and {len(walker.bad) - 10} more" if len(walker.bad) > 10 else ""
        kept = (
            "plain data and the state of objects"
            if records
            else "plain data only (dicts, lists, tuples, numbers, strings, bytes, tensors)"
        )
        raise ConversionError(
            f"--all keeps {kept}, and these values are not: {listed}{more}; pass "
            "--drop-unrepresentable (drop_unrepresentable=True) to leave them out"
        )
    notes = [*walker.notes, *walker.kept_notes()]
    return Plain(None if result is OMIT else result, tuple(walker.bad), tuple(notes))


def is_flat(tree: Any) -> bool:
    """A dict of tensors only, under string keys: names alone describe it."""
    return (
        type(tree) in (dict, OrderedDict, PickledDict)
        and getattr(tree, "pickle_state", None) is None
        and all(
            type(k) is str and isinstance(v, (TensorRef, OutputTensor)) for k, v in tree.items()
        )
    )


def _join(prefix: str, key: Any) -> str:
    """A child's dotted name, as ``names.tensors_of`` names tensors."""
    return f"{prefix}.{key}" if prefix else str(key)


def describe(value: Any) -> str:
    if isinstance(value, ObjectRecord):
        return f"{value.class_path} object"
    if isinstance(value, GlobalRef):
        return f"a reference to {value.path}"
    if isinstance(value, CallRecord):
        func = value.func.path if isinstance(value.func, GlobalRef) else repr(value.func)
        return f"the result of calling {func}"
    if isinstance(value, ByteSpan):
        return f"{value.length:,} bytes left in the pickle"
    if isinstance(value, SparseTensor):
        return f"a sparse tensor ({value.layout})"
    if isinstance(value, NumpyArray):
        return f"a numpy array of {value.dtype_text or 'objects'}"
    if isinstance(value, NumpyScalar):
        return "a numpy scalar that is not a number"
    return f"{type(value).__module__}.{type(value).__qualname__} value"


_SCALARS = (bool, int, float, str, bytes, bytearray, complex)
_MAX_READ_BYTES = limits.MAX_TYPED_JSON_CHARS * 3 // 4  # what base64 text of that size holds
_BUILDING: Any = object()  # a tuple or set being made: it exists only once its items do
_NOT_A_RECORD: Any = object()


class _Plainer:
    def __init__(self, drop: bool, records: bool) -> None:
        self.drop = drop
        self.records = records
        self.bad: list[str] = []
        self.notes: list[str] = []
        self.budget = limits.MAX_TREE_NODES
        self.open: dict[int, Any] = {}  # id of a container being copied -> its copy
        self.kept: Counter[str] = Counter()  # class paths of the objects kept

    def refuse(self, path: str, value: Any) -> Any:
        try:
            held = len(tensors_of(value))
        except ModelportError:  # too big to count: its description is enough
            held = 0
        holding = f", holding {held} tensors" if held else ""
        self.bad.append(f"{path or WHOLE_FILE} ({describe(value)}{holding})")
        return OMIT

    def value(self, value: Any, path: str, depth: int) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise LimitExceededError(
                "values in the file's tree", limits.MAX_TREE_NODES, limits.MAX_TREE_NODES + 1
            )
        if depth > limits.MAX_DEPTH:
            raise ConversionError(f"{path}: nested deeper than {limits.MAX_DEPTH} containers")
        if value is None or type(value) in _SCALARS:
            return value
        if isinstance(value, FileBytes) and value.length <= _MAX_READ_BYTES:
            return value.read()
        if isinstance(value, (TensorRef, TorchDType, TorchDevice)):
            return value
        if isinstance(value, NumpyArray) and value.tensor is not None:
            return value.tensor
        if id(value) in self.open:
            return self.back_reference(value, path)
        if type(value) in (list, tuple):
            return self.sequence(value, path, depth)
        if type(value) in (set, frozenset):
            if all(self.key(item) for item in value) and (type(value) is set or self.records):
                return type(value)(value)
            return self.refuse(path, value)
        if isinstance(value, dict) and type(value) in (dict, OrderedDict, PickledDict, Apart):
            return self.mapping(value, path, depth)
        if modules.is_module(value):
            self.notes.append(
                f"{path or WHOLE_FILE}: a pickled {value.class_path} is kept as its state_dict"
            )
            return self.mapping(PickledDict(modules.state_dict(value)), path, depth)
        if self.records:
            made = self.record(value, path, depth)
            return self.refuse(path, value) if made is _NOT_A_RECORD else made
        if self.drop and isinstance(value, (ObjectRecord, CallRecord)) and tensors_of(value):
            self.notes.append(
                f"{path or WHOLE_FILE}: kept the state of {_the(describe(value))} as plain "
                "data, its tensors included; the object itself is not recreated"
            )
            return self.mapping(_state_of(value), path, depth)
        return self.refuse(path, value)

    def back_reference(self, value: Any, path: str) -> Any:
        """A container met again inside itself: the same copy, where the target keeps
        references; a tuple cannot hold itself once made, and a torch target no cycle."""
        made = self.open[id(value)]
        if made is _BUILDING or not self.records:
            self.bad.append(f"{path} (a reference back to a container that holds it)")
            return OMIT
        return made

    def sequence(self, value: list[Any] | tuple[Any, ...], path: str, depth: int) -> Any:
        made: list[Any] = []
        self.open[id(value)] = made if type(value) is list else _BUILDING
        try:
            for i, item in enumerate(value):
                kept = self.value(item, _join(path, i), depth + 1)
                made.append(None if kept is OMIT else kept)
        finally:
            del self.open[id(value)]
        return made if type(value) is list else tuple(made)

    def mapping(self, value: dict[Any, Any], path: str, depth: int) -> Any:
        result: dict[Any, Any] = PickledDict() if isinstance(value, OrderedDict) else {}
        self.open[id(value)] = result
        try:
            self.fill(result, value, path, depth)
        finally:
            del self.open[id(value)]
        state = getattr(value, "pickle_state", None)
        if state is not None:
            if isinstance(state, dict) and all(type(k) is str for k in state):
                kept = self.value(state, _join(path, "__dict__"), depth + 1)
                result.pickle_state = kept  # type: ignore[attr-defined]
            else:
                self.bad.append(f"{_join(path, '__dict__')} (OrderedDict state: {describe(state)})")
        return result

    def fill(self, result: dict[Any, Any], value: dict[Any, Any], path: str, depth: int) -> None:
        for key, item in value.items():
            child = _join(path, key)
            if not self.key(key):
                self.bad.append(f"{child} (a key: {describe(key)})")
                continue
            converted = self.value(item, child, depth + 1)
            if converted is not OMIT:
                result[key] = converted

    def key(self, key: Any) -> bool:
        """Whether a dict key or set item is plain and hashable (no tensors)."""
        if key is None or type(key) in (bool, int, float, str, bytes, complex):
            return True
        if isinstance(key, TorchDType):
            return True
        if type(key) is frozenset and self.records:
            return all(self.key(item) for item in key)
        return type(key) is tuple and all(self.key(item) for item in key)

    # records ----------------------------------------------------------------------------
    def record(self, value: Any, path: str, depth: int) -> Any:
        """A copy of an inert record with plain parts, or ``_NOT_A_RECORD``."""
        if isinstance(value, (GlobalRef, Trusted)):  # a class or function named, not called
            return GlobalRef(value.module, value.name)
        if isinstance(value, NumpyDType):
            return _NOT_A_RECORD if value.structured else _dtype_copy(value)
        if isinstance(value, NumpyArray) and value.objects is not None:
            array = NumpyArray(None, [], value.shape, value.dtype_text)
            alone = len(value.objects) == 1 and not value.shape  # named as its one item
            self.open[id(value)] = array
            try:
                for i, item in enumerate(value.objects):
                    kept = self.value(item, path if alone else _join(path, i), depth + 1)
                    array.objects.append(None if kept is OMIT else kept)  # type: ignore[union-attr]
            finally:
                del self.open[id(value)]
            return array
        if isinstance(value, (ObjectRecord, CallRecord)):
            return self.instance(value, path, depth)
        return _NOT_A_RECORD

    def instance(self, value: ObjectRecord | CallRecord, path: str, depth: int) -> Any:
        """An object or call result: its named parts (attributes, items) walked as
        ``names.tensors_of`` names them; its class, constructor arguments and any other
        state kept too, where a tensor would have no name and is refused."""
        made: ObjectRecord | CallRecord
        if isinstance(value, ObjectRecord):
            made = ObjectRecord(GlobalRef(value.cls.module, value.cls.name))
            self.kept[made.class_path] += 1
        else:
            made = CallRecord(None, ())
        self.open[id(value)] = made
        try:
            made.args = self.value(value.args, _join(path, ARGS), depth + 1)
            if isinstance(value, ObjectRecord) and isinstance(made, ObjectRecord):
                if value.kwargs is not None:
                    made.kwargs = self.unnamed(value.kwargs, _join(path, "__kwargs__"), depth)
            elif isinstance(value, CallRecord) and isinstance(made, CallRecord):
                made.func = self.unnamed(value.func, _join(path, "__func__"), depth)
            made.state = self.state(value.state, path, depth)
            self.fill(made.dict_items, value.dict_items, path, depth)
            items = [
                self.value(v, _join(path, i), depth + 1) for i, v in enumerate(value.list_items)
            ]
            made.list_items = [None if item is OMIT else item for item in items]
        finally:
            del self.open[id(value)]
        return made

    def state(self, state: Any, path: str, depth: int) -> Any:
        """BUILD's state: an attribute dict, or a ``(dict, slots)`` pair, named by attribute;
        anything else (what the object's own ``__setstate__`` reads) named as a whole."""
        if isinstance(state, dict) and type(state) in (dict, PickledDict, OrderedDict):
            return self.attributes(state, path, depth)
        if type(state) is tuple and len(state) == 2 and all(_attribute_dict(p) for p in state):
            return tuple(None if p is None else self.attributes(p, path, depth) for p in state)
        kept = self.value(state, _join(path, CUSTOM_STATE), depth + 1)
        return None if kept is OMIT else kept

    def attributes(self, state: dict[Any, Any], path: str, depth: int) -> dict[Any, Any]:
        named = {k: v for k, v in state.items() if isinstance(k, str)}
        result: dict[Any, Any] = PickledDict() if isinstance(state, OrderedDict) else {}
        self.fill(result, named, path, depth)
        others = {k: v for k, v in state.items() if not isinstance(k, str)}
        if others:
            result.update(self.unnamed(others, _join(path, "__state__"), depth))
        return result

    def unnamed(self, value: Any, path: str, depth: int) -> Any:
        """A part ``names.tensors_of`` does not walk: kept while it holds no tensor."""
        kept = self.value(value, path, depth + 1)
        if kept is not OMIT and tensors_of(kept):
            self.bad.append(f"{path} (tensors where inspect gives them no name)")
            kept = OMIT
        if kept is OMIT:
            return type(value)() if type(value) in (tuple, dict) else None
        return kept

    def kept_notes(self) -> list[str]:
        shown = [
            f"kept the state of the {cls} object"
            if n == 1
            else f"kept the state of {n} {cls} objects"
            for cls, n in list(self.kept.items())[:5]
        ]
        if not shown:
            return []
        more = f"; and objects of {len(self.kept) - 5} more classes" if len(self.kept) > 5 else ""
        return [
            f"{'; '.join(shown)}{more}: class paths and state as data (typed JSON), tensors "
            "included; nothing recreates the objects"
        ]


def _the(description: str) -> str:
    return description if description.startswith("the ") else f"the {description}"


def _attribute_dict(part: Any) -> bool:
    return part is None or (isinstance(part, dict) and type(part) in (dict, PickledDict))


def _dtype_copy(dtype: NumpyDType) -> NumpyDType:
    copy = NumpyDType(dtype.spec)
    copy.byteorder = dtype.byteorder
    return copy


def _state_of(value: ObjectRecord | CallRecord) -> dict[str, Any]:
    """An object's parts under the names ``names.tensors_of`` gives them."""
    state = value.attributes()
    if value.custom_state() is not None:
        state[CUSTOM_STATE] = value.custom_state()
    if value.args:
        state[ARGS] = value.args
    state.update((str(k), v) for k, v in value.dict_items.items())
    state.update((str(i), v) for i, v in enumerate(value.list_items))
    return state


def map_tensors(tree: Any, replace: Callable[[str, TensorRef], Any]) -> Any:
    """A copy of a plain tree with each tensor replaced by ``replace(path, tensor)``, named
    as ``names.tensors_of`` names it; ``OMIT`` removes it from a dict and leaves ``None`` in
    a list or tuple. A reference back to a container points at its copy."""
    return _Mapper(replace).walk(tree, "")


class _Mapper:
    def __init__(self, replace: Callable[[str, TensorRef], Any]) -> None:
        self.replace = replace
        self.open: dict[int, Any] = {}

    def walk(self, value: Any, path: str) -> Any:
        if isinstance(value, TensorRef):
            return self.replace(path, value)
        if id(value) in self.open:
            return self.open[id(value)]
        if type(value) in (list, tuple):
            made: list[Any] = []
            self.open[id(value)] = made
            items = [self.walk(item, _join(path, i)) for i, item in enumerate(value)]
            made.extend(None if item is OMIT else item for item in items)
            del self.open[id(value)]
            return made if type(value) is list else tuple(made)
        if isinstance(value, dict):
            result: dict[Any, Any] = PickledDict() if isinstance(value, OrderedDict) else {}
            self.open[id(value)] = result
            self.fill(result, value, path)
            del self.open[id(value)]
            if getattr(value, "pickle_state", None) is not None:
                result.pickle_state = value.pickle_state  # type: ignore[attr-defined]
            return result
        if isinstance(value, NumpyArray) and value.objects is not None:
            array = NumpyArray(None, [], value.shape, value.dtype_text)
            self.open[id(value)] = array
            alone = len(value.objects) == 1 and not value.shape  # named as its one item
            for i, item in enumerate(value.objects):
                kept = self.walk(item, path if alone else _join(path, i))
                array.objects.append(None if kept is OMIT else kept)  # type: ignore[union-attr]
            del self.open[id(value)]
            return array
        if isinstance(value, (ObjectRecord, CallRecord)):
            return self.instance(value, path)
        return value

    def fill(self, result: dict[Any, Any], value: dict[Any, Any], path: str) -> None:
        for key, item in value.items():
            converted = self.walk(item, _join(path, key))
            if converted is not OMIT:
                result[key] = converted

    def instance(self, value: ObjectRecord | CallRecord, path: str) -> Any:
        """A record's copy: its unnamed parts hold no tensor (``plain`` saw to it)."""
        made = copy.copy(value)
        self.open[id(value)] = made
        made.args = tuple(self.walk(value.args, _join(path, ARGS)))
        state = value.state
        if state is not None:
            if isinstance(state, dict):
                made.state = PickledDict() if isinstance(state, OrderedDict) else {}
                self.fill(made.state, state, path)
            elif value.custom_state() is None:  # a (dict, slots) pair
                parts = [None if p is None else self.fill_new(p, path) for p in state]
                made.state = tuple(parts)
            else:
                kept = self.walk(state, _join(path, CUSTOM_STATE))
                made.state = None if kept is OMIT else kept
        made.dict_items = {}
        self.fill(made.dict_items, value.dict_items, path)
        items = [self.walk(v, _join(path, i)) for i, v in enumerate(value.list_items)]
        made.list_items = [None if item is OMIT else item for item in items]
        del self.open[id(value)]
        return made

    def fill_new(self, part: dict[Any, Any], path: str) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        self.fill(result, part, path)
        return result
