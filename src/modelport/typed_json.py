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

Decoding is strict: a document past ``MAX_CHARS``, nesting past ``MAX_DEPTH``, more than
``MAX_NODES`` values, an unknown tag, a missing or extra field, a key that is not hashable
or a reference to a tensor the file does not hold raises a modelport error.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from modelport import dtypes
from modelport.errors import (
    ConversionError,
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    UnsupportedVersionError,
)
from modelport.pickles import modules
from modelport.pickles.numpy_types import NumpyArray, NumpyScalar
from modelport.pickles.reading import PickledDict
from modelport.pickles.records import ByteSpan, CallRecord, GlobalRef, ObjectRecord
from modelport.pickles.torch_types import SparseTensor, TorchDevice, TorchDType
from modelport.streaming import OutputTensor
from modelport.tensors import TensorRef
from modelport.tree import tensors_of

KEY = "modelport.tree"  # the metadata entry holding the document
VERSION = 1
MAX_CHARS = 100 << 20  # a safetensors header's own cap
MAX_DEPTH = 100  # containers within containers; checkpoints nest a handful
MAX_NODES = 5_000_000
MAX_INT_HEX = 4096  # digits of an int outside int64 (a pickle's LONG1 holds 255 bytes)
TAG = "$"
INT64 = 1 << 63
_DEVICE = re.compile(r"^[a-z_]{1,32}(:[0-9]{1,6})?$")
_HEX_INT = re.compile(r"^-?[0-9a-f]+$")
_BITS = re.compile(r"^[0-9a-f]{16}$")
_DTYPE_NAMES = frozenset(dtypes.TORCH_DTYPE_ATTRS.values())
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
    ``drop`` are left out (removed from dicts, ``None`` in lists and tuples) and listed.
    """
    walker = _Plainer()
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
    """A child's dotted name, as ``tree.flatten`` names tensors."""
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
    def __init__(self) -> None:
        self.bad: list[str] = []
        self.notes: list[str] = []
        self.budget = MAX_NODES

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
            raise LimitExceededError("values in the file's tree", MAX_NODES, MAX_NODES + 1)
        if depth > MAX_DEPTH:
            raise ConversionError(f"{path}: nested deeper than {MAX_DEPTH} containers")
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
        if isinstance(value, dict) and type(value) in (dict, OrderedDict, PickledDict):
            return self.mapping(value, path, depth)
        if modules.is_module(value):
            self.notes.append(
                f"{path or WHOLE_FILE}: a pickled {value.class_path} is kept as its state_dict"
            )
            return self.mapping(PickledDict(modules.state_dict(value)), path, depth)
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
    budget = [MAX_NODES]
    document = {"version": VERSION, "root": _encode(tree, 0, budget)}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _float(value: float) -> Any:
    if math.isfinite(value):
        return value
    return {TAG: "float", "bits": struct.pack(">d", value).hex()}


def _encode(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise LimitExceededError("values in the tree", MAX_NODES, MAX_NODES + 1)
    if depth > MAX_DEPTH:
        raise ConversionError(f"the tree nests deeper than {MAX_DEPTH} containers")
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


# -- decoding ------------------------------------------------------------------------------
def decode(text: str, tensors: Mapping[str, Any], *, complete: bool = False) -> Any:
    """The tree ``text`` describes, with ``tensors[name]`` at each tensor reference.

    ``complete`` also requires every entry of ``tensors`` to be referenced, so a file whose
    tensors and tree disagree is noticed rather than half shown.
    """
    if len(text) > MAX_CHARS:
        raise LimitExceededError(f"{KEY} metadata characters", MAX_CHARS, len(text))
    try:
        document = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_object)
    except (ValueError, RecursionError) as exc:
        raise CorruptFileError(f"{KEY} metadata is not valid typed JSON ({exc})") from None
    if not isinstance(document, dict) or set(document) != {"version", "root"}:
        raise CorruptFileError(f"{KEY} metadata must be an object with version and root")
    if document["version"] != VERSION or type(document["version"]) is not int:
        raise UnsupportedVersionError(
            f"{KEY} metadata version {document['version']!r} (modelport reads {VERSION})"
        )
    decoder = _Decoder(tensors)
    root = decoder.node(document["root"], 0, key=False)
    if complete:
        unused = [name for name in tensors if name not in decoder.used]
        if unused:
            raise CorruptFileError(
                f"{KEY} metadata does not place {len(unused)} stored tensors: {unused[:5]}"
            )
    return root


def restore(tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """The nested tree a ``KEY`` metadata entry describes over a file's ``tensors``, or None
    when there is none, or (with a warning) when it is malformed or does not place exactly
    those tensors: the file is then shown flat rather than half nested."""
    text = metadata.get(KEY)
    if text is None:
        return None, []
    if not isinstance(text, str):
        return None, [f"metadata {KEY!r} ignored (not a string), the tensors are shown flat"]
    try:
        return decode(text, tensors, complete=True), []
    except ModelportError as exc:
        return None, [f"metadata {KEY!r} ignored, the tensors are shown flat: {exc}"]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("an object repeats a field")
    return result


class _Decoder:
    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()
        self.budget = MAX_NODES

    def node(self, value: Any, depth: int, *, key: bool) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise LimitExceededError(f"values in the {KEY} metadata", MAX_NODES, MAX_NODES + 1)
        if depth > MAX_DEPTH:
            raise LimitExceededError(f"nesting depth of the {KEY} metadata", MAX_DEPTH, depth)
        if value is None or type(value) in (bool, int, float, str):
            return value
        if type(value) is list:
            if key:
                raise CorruptFileError(f"{KEY}: a list cannot be a dict key or set item")
            return [self.node(item, depth + 1, key=False) for item in value]
        if type(value) is not dict or type(value.get(TAG)) is not str:
            raise CorruptFileError(f"{KEY}: an object without a {TAG!r} tag")
        tag = value[TAG]
        if tag not in _FIELDS:
            raise CorruptFileError(f"{KEY}: unknown type tag {tag!r:.40}")
        fields, optional = _FIELDS[tag]
        present = set(value) - {TAG}
        if not fields <= present or not present <= fields | optional:
            wanted = ", ".join(sorted(fields | optional))
            raise CorruptFileError(f"{KEY}: a {tag!r} node takes the fields {wanted}")
        if tag in _CONTAINERS:
            return _CONTAINERS[tag](self, value, depth, key)
        return _LEAVES[tag](value)

    def items(self, value: Any, depth: int, key: bool) -> list[Any]:
        if type(value) is not list:
            raise CorruptFileError(f"{KEY}: items must be a list")
        return [self.node(item, depth + 1, key=key) for item in value]

    def hashable(self, value: Any) -> Any:
        try:
            hash(value)
        except TypeError:
            raise CorruptFileError(f"{KEY}: a dict key or set item is not hashable") from None
        return value

    def tuple_(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        items = tuple(self.items(node["items"], depth, key))
        return self.hashable(items) if key else items

    def set_(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        if key:
            raise CorruptFileError(f"{KEY}: a set cannot be a dict key or set item")
        items = [self.hashable(item) for item in self.items(node["items"], depth, True)]
        result = set(items)
        if len(result) != len(items):
            raise CorruptFileError(f"{KEY}: a set repeats an item")
        return result

    def dict_(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        if key:
            raise CorruptFileError(f"{KEY}: a dict cannot be a dict key or set item")
        ordered = node[TAG] == "odict"
        result: dict[Any, Any] = PickledDict() if ordered else {}
        pairs = node["items"]
        if type(pairs) is not list:
            raise CorruptFileError(f"{KEY}: dict items must be a list of pairs")
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise CorruptFileError(f"{KEY}: dict items must be [key, value] pairs")
            name = self.hashable(self.node(pair[0], depth + 1, key=True))
            if name in result:
                raise CorruptFileError(f"{KEY}: a dict repeats the key {name!r:.40}")
            result[name] = self.node(pair[1], depth + 1, key=False)
        if "state" in node:
            if not ordered:
                raise CorruptFileError(f"{KEY}: only an odict carries state")
            state = self.node(node["state"], depth + 1, key=False)
            if type(state) is not dict or not all(type(k) is str for k in state):
                raise CorruptFileError(f"{KEY}: odict state must be a dict of string keys")
            result.pickle_state = state  # type: ignore[attr-defined]
        return result

    def tensor(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        name = node["name"]
        if key:
            raise CorruptFileError(f"{KEY}: a tensor cannot be a dict key or set item")
        if type(name) is not str or name not in self.tensors:
            raise CorruptFileError(f"{KEY}: refers to a tensor {name!r:.80} the file does not hold")
        self.used.add(name)
        return self.tensors[name]


def _text(node: dict[str, Any], field: str, pattern: re.Pattern[str] | None = None) -> str:
    value = node[field]
    if type(value) is not str or (pattern is not None and not pattern.match(value)):
        raise CorruptFileError(f"{KEY}: a {node[TAG]!r} node has a malformed {field!r}")
    return value


def _base64(node: dict[str, Any], field: str) -> bytes:
    try:
        return base64.b64decode(_text(node, field), validate=True)
    except binascii.Error:
        raise CorruptFileError(f"{KEY}: a {node[TAG]!r} node has invalid base64") from None


def _decode_int(node: dict[str, Any]) -> int:
    digits = _text(node, "hex", _HEX_INT)
    if len(digits) > MAX_INT_HEX:
        raise LimitExceededError(
            f"hex digits of an int in the {KEY} metadata", MAX_INT_HEX, len(digits)
        )
    return int(digits, 16)


def _decode_float(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is dict and value.get(TAG) == "float" and set(value) == {TAG, "bits"}:
        bits: float = struct.unpack(">d", bytes.fromhex(_text(value, "bits", _BITS)))[0]
        return bits
    raise CorruptFileError(f"{KEY}: expected a float")


def _decode_str(node: dict[str, Any]) -> str:
    try:
        return _base64(node, "utf8").decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise CorruptFileError(f"{KEY}: a 'str' node is not UTF-8") from None


def _dtype(node: dict[str, Any]) -> TorchDType:
    name = _text(node, "name")
    if name not in _DTYPE_NAMES:
        raise CorruptFileError(f"{KEY}: unknown torch dtype {name!r:.40}")
    return TorchDType(name)


def _decode_bytes(node: dict[str, Any]) -> bytes:
    return _base64(node, "base64")


def _decode_complex(node: dict[str, Any]) -> complex:
    return complex(_decode_float(node["real"]), _decode_float(node["imag"]))


def _device(node: dict[str, Any]) -> TorchDevice:
    return TorchDevice(_text(node, "spec", _DEVICE))


# tag -> (required fields, optional fields); containers are ``_Decoder`` methods, the rest
# are leaves built from their own fields
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "tuple": (frozenset({"items"}), frozenset()),
    "set": (frozenset({"items"}), frozenset()),
    "dict": (frozenset({"items"}), frozenset()),
    "odict": (frozenset({"items"}), frozenset({"state"})),
    "tensor": (frozenset({"name"}), frozenset()),
    "int": (frozenset({"hex"}), frozenset()),
    "float": (frozenset({"bits"}), frozenset()),
    "str": (frozenset({"utf8"}), frozenset()),
    "bytes": (frozenset({"base64"}), frozenset()),
    "bytearray": (frozenset({"base64"}), frozenset()),
    "complex": (frozenset({"real", "imag"}), frozenset()),
    "torch.dtype": (frozenset({"name"}), frozenset()),
    "torch.device": (frozenset({"spec"}), frozenset()),
}
_CONTAINERS: dict[str, Callable[[_Decoder, dict[str, Any], int, bool], Any]] = {
    "tuple": _Decoder.tuple_,
    "set": _Decoder.set_,
    "dict": _Decoder.dict_,
    "odict": _Decoder.dict_,
    "tensor": _Decoder.tensor,
}
_LEAVES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "int": _decode_int,
    "float": _decode_float,
    "str": _decode_str,
    "bytes": _decode_bytes,
    "bytearray": lambda node: bytearray(_decode_bytes(node)),
    "complex": _decode_complex,
    "torch.dtype": _dtype,
    "torch.device": _device,
}
