"""Typed JSON: a checkpoint's whole structure, non-tensor values included, without pickle.

``modelport convert --all`` keeps a training checkpoint whole: the tensors go into the
target format as usual, and the rest (the nesting, ``epoch``, ``loss``, the optimizer's
``param_groups`` and the int keys of its ``state``) is written as one JSON document in the
target's string metadata, under ``KEY``. The tensors appear in it as references to the names
they are stored under, so readers rebuild the nested tree with the stored tensors at its
leaves. It is data only: decoding never imports or calls anything.

Layout of the document (``{"version": 1, "root": NODE}``); a NODE is:

- ``null``, ``true``, ``false``, a string, a JSON number (an int in the int64 range, or a
  finite float written as Python's ``repr``, which reads back to the same bits, ``-0.0``
  included), or an array (a Python ``list``);
- an object with a ``"$"`` tag, for what JSON would otherwise lose: ``tuple`` / ``set``
  (``items``), ``dict`` / ``odict`` (``items``: ``[key, value]`` pairs, keys any hashable
  NODE, so int keys stay ints; an ``odict`` is a ``collections.OrderedDict`` and MAY carry
  ``state``, the attribute dict torch pickles with a state_dict: its ``_metadata``),
  ``int`` (``hex``, outside int64), ``float`` (``bits``: 16 hex digits of the IEEE double,
  for nan with its payload and the infinities), ``str`` (``utf8``: base64 of a string with
  lone surrogates, which JSON parsers elsewhere reject), ``bytes`` / ``bytearray``
  (``base64``), ``complex`` (``real``, ``imag``), ``torch.dtype`` (``name``),
  ``torch.device`` (``spec``), ``tensor`` (``name``: a stored tensor).

Plain data is what ``torch.load(weights_only=True)`` accepts: the types above. Anything
else in a file (an ``argparse.Namespace``, a class of the training code, a frozenset) is
not plain data; ``plain`` names where it is. A pickled ``nn.Module`` is kept as its
state_dict (an ``OrderedDict``), which is what of it can be kept.

Decoding (``typed_json_decoding``) is strict: a document past
``limits.MAX_TYPED_JSON_CHARS``, nesting past ``limits.MAX_DEPTH``, more than
``limits.MAX_TREE_NODES`` values, an unknown tag, a missing or extra field, a key that is not
hashable or a reference to a tensor the file does not hold raises a
modelport error.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelport import limits
from modelport.errors import ConversionError, LimitExceededError, ModelportError
from modelport.pickles import modules
from modelport.pickles.numpy_types import NumpyArray, NumpyScalar
from modelport.pickles.reading import PickledDict
from modelport.pickles.records import ByteSpan, CallRecord, GlobalRef, ObjectRecord
from modelport.pickles.torch_types import SparseTensor, TorchDevice, TorchDType
from modelport.tensors import TensorRef
from modelport.transfer.write_plan import OutputTensor
from modelport.tree.names import tensors_of
from modelport.tree.weights import Apart

KEY = "modelport.tree"  # the metadata entry holding the document
VERSION = 1
TAG = "$"
INT64 = 1 << 63
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


def plain(tree: Any, *, drop: bool = False) -> Plain:
    """``tree`` (as a reader returned it) as plain data, tensors kept as ``TensorRef``.

    Values that are not plain data raise ``ConversionError`` naming their paths, or with
    ``drop`` are left out (removed from dicts, ``None`` in lists and tuples) and listed; an
    object that holds tensors (a scikit-learn estimator, a gensim model) then keeps its
    state as a plain mapping, under the names ``inspect`` gives its tensors.
    """
    walker = _Plainer(drop)
    result = walker.value(tree, "", 0)
    if walker.bad and not drop:
        listed = "; ".join(walker.bad[:10])
        more = f" and {len(walker.bad) - 10} more" if len(walker.bad) > 10 else ""
        raise ConversionError(
            f"--all keeps plain data only (dicts, lists, tuples, numbers, strings, bytes, "
            f"tensors), and these values are not: {listed}{more}; pass "
            "--drop-unrepresentable (drop_unrepresentable=True) to leave them out"
        )
    return Plain(None if result is OMIT else result, tuple(walker.bad), tuple(walker.notes))


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


def _describe(value: Any) -> str:
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


class _Plainer:
    def __init__(self, drop: bool) -> None:
        self.drop = drop
        self.bad: list[str] = []
        self.notes: list[str] = []
        self.budget = limits.MAX_TREE_NODES

    def refuse(self, path: str, value: Any) -> Any:
        try:
            held = len(tensors_of(value))
        except ModelportError:  # too big to count: its description is enough
            held = 0
        holding = f", holding {held} tensors" if held else ""
        self.bad.append(f"{path or WHOLE_FILE} ({_describe(value)}{holding})")
        return OMIT

    def value(self, value: Any, path: str, depth: int) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise LimitExceededError(
                "values in the file's tree", limits.MAX_TREE_NODES, limits.MAX_TREE_NODES + 1
            )
        if depth > limits.MAX_DEPTH:
            raise ConversionError(f"{path}: nested deeper than {limits.MAX_DEPTH} containers")
        if value is None or type(value) in (bool, int, float, str, bytes, bytearray, complex):
            return value
        if isinstance(value, (TensorRef, TorchDType, TorchDevice)):
            return value
        if isinstance(value, NumpyArray) and value.tensor is not None:
            return value.tensor
        if type(value) in (list, tuple):
            items = [self.value(item, _join(path, i), depth + 1) for i, item in enumerate(value)]
            kept = [None if item is OMIT else item for item in items]
            return kept if type(value) is list else tuple(kept)
        if type(value) is set:
            if all(self.key(item) for item in value):
                return set(value)
            return self.refuse(path, value)
        if isinstance(value, dict) and type(value) in (dict, OrderedDict, PickledDict, Apart):
            return self.mapping(value, path, depth)
        if modules.is_module(value):
            self.notes.append(
                f"{path or WHOLE_FILE}: a pickled {value.class_path} is kept as its state_dict"
            )
            return self.mapping(PickledDict(modules.state_dict(value)), path, depth)
        if self.drop and isinstance(value, (ObjectRecord, CallRecord)) and tensors_of(value):
            self.notes.append(
                f"{path or WHOLE_FILE}: kept the state of the {_describe(value)} as plain "
                "data, its tensors included; the object itself is not recreated"
            )
            return self.mapping(_state_of(value), path, depth)
        return self.refuse(path, value)

    def mapping(self, value: dict[Any, Any], path: str, depth: int) -> Any:
        result: dict[Any, Any] = PickledDict() if isinstance(value, OrderedDict) else {}
        for key, item in value.items():
            child = _join(path, key)
            if not self.key(key):
                self.bad.append(f"{child} (a key: {_describe(key)})")
                continue
            converted = self.value(item, child, depth + 1)
            if converted is not OMIT:
                result[key] = converted
        state = getattr(value, "pickle_state", None)
        if state is not None:
            if isinstance(state, dict) and all(type(k) is str for k in state):
                kept = self.value(state, _join(path, "__dict__"), depth + 1)
                result.pickle_state = kept  # type: ignore[attr-defined]
            else:
                self.bad.append(
                    f"{_join(path, '__dict__')} (OrderedDict state: {_describe(state)})"
                )
        return result

    def key(self, key: Any) -> bool:
        """Whether a dict key or set item is plain and hashable (no tensors)."""
        if key is None or type(key) in (bool, int, float, str, bytes, complex):
            return True
        if isinstance(key, TorchDType):
            return True
        return type(key) is tuple and all(self.key(item) for item in key)


def _state_of(value: ObjectRecord | CallRecord) -> dict[str, Any]:
    """An object's parts under the names ``names.tensors_of`` gives them."""
    state: dict[str, Any] = value.attributes() if isinstance(value, ObjectRecord) else {}
    state.update((str(k), v) for k, v in value.dict_items.items())
    state.update((str(i), v) for i, v in enumerate(value.list_items))
    return state


def map_tensors(tree: Any, replace: Callable[[str, TensorRef], Any]) -> Any:
    """A copy of a plain tree with each tensor replaced by ``replace(path, tensor)``;
    ``OMIT`` removes it from a dict and leaves ``None`` in a list or tuple."""

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, TensorRef):
            return replace(path, value)
        if type(value) in (list, tuple):
            items = [walk(item, _join(path, i)) for i, item in enumerate(value)]
            kept = [None if item is OMIT else item for item in items]
            return kept if type(value) is list else tuple(kept)
        if isinstance(value, dict):
            result: dict[Any, Any] = PickledDict() if isinstance(value, OrderedDict) else {}
            for key, item in value.items():
                converted = walk(item, _join(path, key))
                if converted is not OMIT:
                    result[key] = converted
            if getattr(value, "pickle_state", None) is not None:
                result.pickle_state = value.pickle_state  # type: ignore[attr-defined]
            return result
        return value

    return walk(tree, "")


# -- encoding ------------------------------------------------------------------------------
def encode(tree: Any) -> str:
    """The typed JSON document for a plain tree whose tensors are ``OutputTensor`` leaves."""
    budget = [limits.MAX_TREE_NODES]
    document = {"version": VERSION, "root": _encode(tree, 0, budget)}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _float(value: float) -> Any:
    if math.isfinite(value):
        return value
    return {TAG: "float", "bits": struct.pack(">d", value).hex()}


def _encode(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise LimitExceededError(
            "values in the tree", limits.MAX_TREE_NODES, limits.MAX_TREE_NODES + 1
        )
    if depth > limits.MAX_DEPTH:
        raise ConversionError(f"the tree nests deeper than {limits.MAX_DEPTH} containers")
    kind = type(value)
    if value is None or kind is bool:
        return value
    if kind is int:
        return value if -INT64 <= value < INT64 else {TAG: "int", "hex": format(value, "x")}
    if kind is float:
        return _float(value)
    if kind is str:
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            raw = value.encode("utf-8", "surrogatepass")
            return {TAG: "str", "utf8": base64.b64encode(raw).decode()}
    if kind in (bytes, bytearray):
        return {TAG: kind.__name__, "base64": base64.b64encode(value).decode()}
    if kind is complex:
        return {TAG: "complex", "real": _float(value.real), "imag": _float(value.imag)}
    if kind is list:
        return [_encode(item, depth + 1, budget) for item in value]
    if kind in (tuple, set):
        items = [_encode(item, depth + 1, budget) for item in value]
        return {TAG: kind.__name__, "items": items}
    if isinstance(value, dict) and kind in (dict, OrderedDict, PickledDict):
        pairs = [
            [_encode(k, depth + 1, budget), _encode(v, depth + 1, budget)] for k, v in value.items()
        ]
        node: dict[str, Any] = {TAG: "dict" if kind is dict else "odict", "items": pairs}
        state = getattr(value, "pickle_state", None)
        if state is not None:
            node["state"] = _encode(state, depth + 1, budget)
        return node
    if isinstance(value, OutputTensor):
        return {TAG: "tensor", "name": value.name}
    if isinstance(value, TorchDType):
        return {TAG: "torch.dtype", "name": value.name}
    if isinstance(value, TorchDevice):
        return {TAG: "torch.device", "spec": value.spec}
    raise ConversionError(f"typed JSON cannot hold {_describe(value)}")
