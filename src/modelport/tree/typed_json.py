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
- an object with a ``"$"`` tag, for what JSON would otherwise lose: ``tuple`` / ``set`` /
  ``frozenset`` (``items``), ``dict`` / ``odict`` (``items``: ``[key, value]`` pairs, keys
  any hashable NODE, so int keys stay ints; an ``odict`` is a ``collections.OrderedDict``
  and MAY carry ``state``, the attribute dict torch pickles with a state_dict: its
  ``_metadata``), ``int`` (``hex``, outside int64), ``float`` (``bits``: 16 hex digits of
  the IEEE double, for nan with its payload and the infinities), ``str`` (``utf8``: base64
  of a string with lone surrogates, which JSON parsers elsewhere reject), ``bytes`` /
  ``bytearray`` (``base64``), ``complex`` (``real``, ``imag``), ``torch.dtype`` (``name``),
  ``torch.device`` (``spec``), ``tensor`` (``name``: a stored tensor);
- the inert records a pickle leaves where it names code (``pickles.records``), never
  imported when read back: ``object`` (``module``, ``name``: the class path; MAY carry
  ``args`` and ``list`` arrays, ``kwargs`` and ``dict`` pairs, and ``state``, what BUILD
  gave it), ``call`` (``func``, the callable's NODE; MAY carry ``args``, ``state``,
  ``list``, ``dict``), ``global`` (``module``, ``name``), ``ndarray`` (a numpy object array:
  ``dtype`` text, ``shape``, ``items``), ``numpy.dtype`` (``spec``, ``byteorder``);
- a container reached again from inside itself (a config node pointing back at its parent)
  carries an ``id`` (an int; a ``list`` is then written as ``{"$": "list", "items": ...}``)
  and the inner reference is ``{"$": "ref", "id": ...}``; ``id`` MAY appear on ``list``,
  ``dict``, ``odict``, ``object``, ``call`` and ``ndarray`` nodes, and a ``ref`` MUST come
  after the node that carries its ``id`` began.

Plain data is what ``torch.load(weights_only=True)`` accepts: the first two groups above.
``plain`` keeps that, and, for targets that store typed JSON (``records``), the records
too, so a scikit-learn estimator, a gensim model, an omegaconf config or an
``argparse.Namespace`` survives with its class path and state; a torch target takes plain
data only. What neither holds (a sparse tensor, bytes left in the pickle, a numpy scalar
that is not a number) is named by its path. A pickled ``nn.Module`` is kept as its
state_dict (an ``OrderedDict``), which is what of it can be kept.

Decoding (``typed_json_decoding``) is strict: a document past
``limits.MAX_TYPED_JSON_CHARS``, nesting past ``limits.MAX_DEPTH``, more than
``limits.MAX_TREE_NODES`` values, an unknown tag, a missing or extra field, a key that is not
hashable, a reference to an id not yet seen or to a tensor the file does not hold raises a
modelport error.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections import OrderedDict
from typing import Any

from modelport import limits
from modelport.errors import ConversionError, LimitExceededError
from modelport.pickles.numpy_types import NumpyArray, NumpyDType
from modelport.pickles.reading import PickledDict
from modelport.pickles.records import CallRecord, GlobalRef, ObjectRecord
from modelport.pickles.torch_types import TorchDevice, TorchDType
from modelport.transfer.write_plan import OutputTensor
from modelport.tree.plain_data import OMIT as OMIT
from modelport.tree.plain_data import WHOLE_FILE as WHOLE_FILE
from modelport.tree.plain_data import Plain as Plain
from modelport.tree.plain_data import describe
from modelport.tree.plain_data import is_flat as is_flat
from modelport.tree.plain_data import map_tensors as map_tensors
from modelport.tree.plain_data import plain as plain

KEY = "modelport.tree"  # the metadata entry holding the document
VERSION = 1
TAG = "$"
INT64 = 1 << 63


# -- encoding ------------------------------------------------------------------------------
def encode(tree: Any) -> str:
    """The typed JSON document for a plain tree whose tensors are ``OutputTensor`` leaves."""
    document = {"version": VERSION, "root": _Encoder().node(tree, 0)}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _float(value: float) -> Any:
    if math.isfinite(value):
        return value
    return {TAG: "float", "bits": struct.pack(">d", value).hex()}


def _text(value: str) -> Any:
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogatepass")
        return {TAG: "str", "utf8": base64.b64encode(raw).decode()}


class _Encoder:
    def __init__(self) -> None:
        self.budget = limits.MAX_TREE_NODES
        self.open: dict[int, list[int]] = {}  # containers being written -> [its id] once used
        self.ids = 0

    def node(self, value: Any, depth: int) -> Any:
        self.budget -= 1
        if self.budget < 0:
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
            return _text(value)
        if kind in (bytes, bytearray):
            return {TAG: kind.__name__, "base64": base64.b64encode(value).decode()}
        if kind is complex:
            return {TAG: "complex", "real": _float(value.real), "imag": _float(value.imag)}
        if kind in (tuple, set, frozenset):
            return {TAG: kind.__name__, "items": self.items(value, depth)}
        leaf = _leaf(value)
        if leaf is not None:
            return leaf
        if id(value) in self.open:  # a reference back to a container being written
            ids = self.open[id(value)]
            if not ids:
                self.ids += 1
                ids.append(self.ids)
            return {TAG: "ref", "id": ids[0]}
        self.open[id(value)] = []
        written = self.container(value, depth)
        ids = self.open.pop(id(value))
        if ids and type(written) is list:
            written = {TAG: "list", "items": written}
        if ids:
            written["id"] = ids[0]
        return written

    def items(self, values: Any, depth: int) -> list[Any]:
        return [self.node(item, depth + 1) for item in values]

    def pairs(self, mapping: dict[Any, Any], depth: int) -> list[Any]:
        return [[self.node(k, depth + 1), self.node(v, depth + 1)] for k, v in mapping.items()]

    def container(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind is list:
            return self.items(value, depth)
        if isinstance(value, dict) and kind in (dict, OrderedDict, PickledDict):
            pairs = self.pairs(value, depth)
            node: dict[str, Any] = {TAG: "dict" if kind is dict else "odict", "items": pairs}
            state = getattr(value, "pickle_state", None)
            if state is not None:
                node["state"] = self.node(state, depth + 1)
            return node
        if isinstance(value, NumpyArray) and value.objects is not None:
            return {
                TAG: "ndarray",
                "dtype": value.dtype_text,
                "shape": list(value.shape),
                "items": self.items(value.objects, depth),
            }
        if isinstance(value, ObjectRecord):
            node = {TAG: "object", "module": value.cls.module, "name": value.cls.name}
            if value.args:
                node["args"] = self.items(value.args, depth)
            if value.kwargs is not None:
                node["kwargs"] = self.pairs(value.kwargs, depth)
            return self.filled(node, value, depth)
        if isinstance(value, CallRecord):
            node = {TAG: "call", "func": self.node(value.func, depth + 1)}
            if value.args:
                node["args"] = self.items(value.args, depth)
            return self.filled(node, value, depth)
        raise ConversionError(f"typed JSON cannot hold {describe(value)}")

    def filled(
        self, node: dict[str, Any], value: ObjectRecord | CallRecord, depth: int
    ) -> dict[str, Any]:
        if value.state is not None:
            node["state"] = self.node(value.state, depth + 1)
        if value.list_items:
            node["list"] = self.items(value.list_items, depth)
        if value.dict_items:
            node["dict"] = self.pairs(value.dict_items, depth)
        return node


def _leaf(value: Any) -> dict[str, Any] | None:
    if isinstance(value, OutputTensor):
        return {TAG: "tensor", "name": value.name}
    if isinstance(value, TorchDType):
        return {TAG: "torch.dtype", "name": value.name}
    if isinstance(value, TorchDevice):
        return {TAG: "torch.device", "spec": value.spec}
    if isinstance(value, GlobalRef):
        return {TAG: "global", "module": value.module, "name": value.name}
    if isinstance(value, NumpyDType) and not value.structured:
        return {TAG: "numpy.dtype", "spec": value.spec, "byteorder": value.byteorder}
    return None
