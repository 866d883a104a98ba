"""Reading typed JSON (the layout is described in ``typed_json``) back into a tree.

It is data only: decoding never imports or calls anything, and every limit is checked
before the work it bounds.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    UnsupportedVersionError,
)
from modelport.pickles.numpy_types import NumpyArray, NumpyDType
from modelport.pickles.reading import PickledDict
from modelport.pickles.records import CallRecord, GlobalRef, ObjectRecord
from modelport.pickles.torch_types import TorchDevice, TorchDType
from modelport.tree.typed_json import (
    KEY,
    TAG,
    VERSION,
)

_DEVICE = re.compile(r"^[a-z_]{1,32}(:[0-9]{1,6})?$")
_HEX_INT = re.compile(r"^-?[0-9a-f]+$")
_BITS = re.compile(r"^[0-9a-f]{16}$")
_DTYPE_NAMES = frozenset(dtypes.TORCH_DTYPE_ATTRS.values())
_PATH_PART = re.compile(r"^[^\x00-\x1f]{1,512}$")  # a module or name: text, never imported
_NUMPY_SPEC = re.compile(r"^[^\x00-\x1f]{1,64}$")
_BYTE_ORDERS = frozenset("<>|=")
_MAX_SHAPE = 64


def decode(text: str, tensors: Mapping[str, Any], *, complete: bool = False) -> Any:
    """The tree ``text`` describes, with ``tensors[name]`` at each tensor reference.

    ``complete`` also requires every entry of ``tensors`` to be referenced, so a file whose
    tensors and tree disagree is noticed rather than half shown.
    """
    if len(text) > limits.MAX_TYPED_JSON_CHARS:
        raise LimitExceededError(
            f"{KEY} metadata characters", limits.MAX_TYPED_JSON_CHARS, len(text)
        )
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
        self.budget = limits.MAX_TREE_NODES
        self.ids: dict[int, Any] = {}  # id -> the container that carries it

    def node(self, value: Any, depth: int, *, key: bool) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise LimitExceededError(
                f"values in the {KEY} metadata", limits.MAX_TREE_NODES, limits.MAX_TREE_NODES + 1
            )
        if depth > limits.MAX_DEPTH:
            raise LimitExceededError(
                f"nesting depth of the {KEY} metadata", limits.MAX_DEPTH, depth
            )
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
        self.register(node, result)
        self.pairs(node["items"], depth, result)
        if "state" in node:
            if not ordered:
                raise CorruptFileError(f"{KEY}: only an odict carries state")
            state = self.node(node["state"], depth + 1, key=False)
            if type(state) is not dict or not all(type(k) is str for k in state):
                raise CorruptFileError(f"{KEY}: odict state must be a dict of string keys")
            result.pickle_state = state  # type: ignore[attr-defined]
        return result

    def pairs(self, pairs: Any, depth: int, result: dict[Any, Any]) -> dict[Any, Any]:
        if type(pairs) is not list:
            raise CorruptFileError(f"{KEY}: dict items must be a list of pairs")
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise CorruptFileError(f"{KEY}: dict items must be [key, value] pairs")
            name = self.hashable(self.node(pair[0], depth + 1, key=True))
            if name in result:
                raise CorruptFileError(f"{KEY}: a dict repeats the key {name!r:.40}")
            result[name] = self.node(pair[1], depth + 1, key=False)
        return result

    def register(self, node: dict[str, Any], made: Any) -> None:
        """A container that a later ``ref`` may name, known before its items are read so
        that a reference back from inside it finds it."""
        if "id" not in node:
            return
        number = node["id"]
        if type(number) is not int or number in self.ids:
            raise CorruptFileError(f"{KEY}: an id must be an int that no other node carries")
        self.ids[number] = made

    def ref(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        number = node["id"]
        if key or type(number) is not int or number not in self.ids:
            raise CorruptFileError(f"{KEY}: a ref names no container read before it")
        return self.ids[number]

    def list_(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        if key:
            raise CorruptFileError(f"{KEY}: a list cannot be a dict key or set item")
        result: list[Any] = []
        self.register(node, result)
        result.extend(self.items(node["items"], depth, False))
        return result

    def frozenset_(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        items = [self.hashable(item) for item in self.items(node["items"], depth, True)]
        result = frozenset(items)
        if len(result) != len(items):
            raise CorruptFileError(f"{KEY}: a frozenset repeats an item")
        return result

    def ndarray(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        shape = node["shape"]
        if type(shape) is not list or len(shape) > _MAX_SHAPE:
            raise CorruptFileError(f"{KEY}: an 'ndarray' node has a malformed 'shape'")
        if key or not all(type(n) is int and n >= 0 for n in shape):
            raise CorruptFileError(f"{KEY}: an 'ndarray' node has a malformed 'shape'")
        array = NumpyArray(None, [], tuple(shape), _text(node, "dtype", _NUMPY_SPEC))
        self.register(node, array)
        array.objects = self.items(node["items"], depth, False)
        return array

    def object_(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        if key:
            raise CorruptFileError(f"{KEY}: an object cannot be a dict key or set item")
        made = ObjectRecord(_global(node))
        self.register(node, made)
        made.args = tuple(self.items(node.get("args", []), depth, False))
        if "kwargs" in node:
            made.kwargs = self.pairs(node["kwargs"], depth, {})
        return self.filled(made, node, depth)

    def call(self, node: dict[str, Any], depth: int, key: bool) -> Any:
        if key:
            raise CorruptFileError(f"{KEY}: a call cannot be a dict key or set item")
        made = CallRecord(None, ())
        self.register(node, made)
        made.func = self.node(node["func"], depth + 1, key=False)
        made.args = tuple(self.items(node.get("args", []), depth, False))
        return self.filled(made, node, depth)

    def filled(self, made: Any, node: dict[str, Any], depth: int) -> Any:
        made.state = self.node(node["state"], depth + 1, key=False) if "state" in node else None
        made.list_items = self.items(node.get("list", []), depth, False)
        self.pairs(node.get("dict", []), depth, made.dict_items)
        return made

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
    if len(digits) > limits.MAX_INT_HEX_DIGITS:
        raise LimitExceededError(
            f"hex digits of an int in the {KEY} metadata", limits.MAX_INT_HEX_DIGITS, len(digits)
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


def _global(node: dict[str, Any]) -> GlobalRef:
    """A class or function path, kept as text: decoding never imports it."""
    return GlobalRef(_text(node, "module", _PATH_PART), _text(node, "name", _PATH_PART))


def _numpy_dtype(node: dict[str, Any]) -> NumpyDType:
    dtype = NumpyDType(_text(node, "spec", _NUMPY_SPEC))
    order = _text(node, "byteorder")
    if order not in _BYTE_ORDERS:
        raise CorruptFileError(f"{KEY}: a 'numpy.dtype' node has a malformed 'byteorder'")
    dtype.byteorder = order
    return dtype


# tag -> (required fields, optional fields); containers are ``_Decoder`` methods, the rest
# are leaves built from their own fields
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "tuple": (frozenset({"items"}), frozenset()),
    "set": (frozenset({"items"}), frozenset()),
    "frozenset": (frozenset({"items"}), frozenset()),
    "list": (frozenset({"items"}), frozenset({"id"})),
    "dict": (frozenset({"items"}), frozenset({"id"})),
    "odict": (frozenset({"items"}), frozenset({"state", "id"})),
    "ref": (frozenset({"id"}), frozenset()),
    "object": (
        frozenset({"module", "name"}),
        frozenset({"args", "kwargs", "state", "list", "dict", "id"}),
    ),
    "call": (frozenset({"func"}), frozenset({"args", "state", "list", "dict", "id"})),
    "ndarray": (frozenset({"dtype", "shape", "items"}), frozenset({"id"})),
    "global": (frozenset({"module", "name"}), frozenset()),
    "numpy.dtype": (frozenset({"spec", "byteorder"}), frozenset()),
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
    "frozenset": _Decoder.frozenset_,
    "list": _Decoder.list_,
    "ref": _Decoder.ref,
    "ndarray": _Decoder.ndarray,
    "object": _Decoder.object_,
    "call": _Decoder.call,
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
    "global": _global,
    "numpy.dtype": _numpy_dtype,
}
