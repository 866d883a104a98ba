"""Keras 3 variable names (``dense/kernel``) for the datasets Keras 3 stores by index.

Keras 3 (keras/src/saving/saving_lib.py) writes each layer's variables as
``<path>/vars/<i>``, ``i`` the order the layer's ``save_own_variables`` stores them, which is
the order its ``build`` creates them; the file never names a variable. ``<path>`` is the walk
of the model: ``layers/<snake_case class>[_<n>]`` for a layer of a model's layer list (``n``
counts earlier layers of that class), the attribute name for a layer held by another
(``lstm/cell``, ``multi_head_attention/query_dense``). Newer Keras 3 releases (3.15 does) set
the layer's own ``name`` as an attribute of its ``vars`` group.

The readable name is what ``Variable.path`` gives in Keras: the layer names from the model
down (the model itself left out), then the variable's name. Layer names come from the
``name`` attributes, else from the model config (``config.json`` of a ``.keras``), else
from the group name. The variable names come from the layer's class, taken from the config
where it lists the layer, else from the group name of a layer list entry, else from the
attribute of a known parent, with the optional variables the layer's config switches on
(``use_bias``, ``center``, ``scale``); without a config, the count of stored variables
decides where only one optional variable is possible. A layer whose class or variable count
is not known keeps ``<path>/vars/<i>``, as does any name that would collide with another.
Optimizer variables (``optimizer/vars/<i>``) and the model's own keep their paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from modelport import limits
from modelport.errors import LimitExceededError
from modelport.formats._hdf5_attrs import AttributeReader
from modelport.formats.protocol import Contents

VARIABLE = re.compile(r"^(?:(.*)/)?vars/(\d+)$")
LAYER_LISTS = ("layers", "_layer_checkpoint_dependencies")  # Keras 3 / Keras 2.13-2.15
KEPT_PATHS = ("optimizer",)
COUNTER = re.compile(r"^(.*)_(\d+)$")

Flag = Callable[[Mapping[str, Any]], bool]


def _flag(key: str) -> Flag:
    return lambda config: bool(config.get(key, True))


_BIAS = _flag("use_bias")
_CONV = (("kernel", None), ("bias", _BIAS))
_RECURRENT = (("kernel", None), ("recurrent_kernel", None), ("bias", _BIAS))


def _layer_norm_gamma(config: Mapping[str, Any]) -> bool:
    return bool(config.get("scale", True) or config.get("rms_scaling", False))


def _layer_norm_beta(config: Mapping[str, Any]) -> bool:
    return bool(config.get("center", True) and not config.get("rms_scaling", False))


# Variables in build order: (name, the config switch that creates it, None when always made).
VARIABLES: dict[str, tuple[tuple[str, Flag | None], ...]] = {
    "Dense": _CONV,
    "EinsumDense": (("kernel", None), ("bias", lambda config: bool(config.get("bias_axes")))),
    **{f"{kind}{rank}D": _CONV for kind in ("Conv", "DepthwiseConv") for rank in (1, 2, 3)},
    **{f"Conv{rank}DTranspose": _CONV for rank in (1, 2, 3)},
    **{
        f"SeparableConv{rank}D": (
            ("depthwise_kernel", None),
            ("pointwise_kernel", None),
            ("bias", _BIAS),
        )
        for rank in (1, 2)
    },
    "BatchNormalization": (
        ("gamma", _flag("scale")),
        ("beta", _flag("center")),
        ("moving_mean", None),
        ("moving_variance", None),
    ),
    "LayerNormalization": (("gamma", _layer_norm_gamma), ("beta", _layer_norm_beta)),
    "GroupNormalization": (("gamma", _flag("scale")), ("beta", _flag("center"))),
    "RMSNormalization": (("scale", None),),
    "Embedding": (("embeddings", None),),
    "PReLU": (("alpha", None),),
    "LSTMCell": _RECURRENT,
    "GRUCell": _RECURRENT,
    "SimpleRNNCell": _RECURRENT,
}
# Layers a known layer holds under an attribute (the path names the attribute, not a class).
HELD_LAYERS: dict[tuple[str, str], str] = {
    ("MultiHeadAttention", "query_dense"): "EinsumDense",
    ("MultiHeadAttention", "key_dense"): "EinsumDense",
    ("MultiHeadAttention", "value_dense"): "EinsumDense",
    ("MultiHeadAttention", "output_dense"): "EinsumDense",
    ("LSTM", "cell"): "LSTMCell",
    ("GRU", "cell"): "GRUCell",
    ("SimpleRNN", "cell"): "SimpleRNNCell",
}


def _snake_case(class_name: str) -> str:
    """Keras' ``naming.to_snake_case``: the group name of a layer in a layer list."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


SNAKE_CLASSES = {
    _snake_case(name): name for name in [*VARIABLES, *(parent for parent, _ in HELD_LAYERS)]
}


@dataclass(frozen=True)
class LayerEntry:
    """What the model config says of the layer at one path: its name, class and config."""

    name: str
    class_name: str
    config: Mapping[str, Any]


def readable_names(
    attrs: AttributeReader, handle: Any, names: list[str], model_config: Any = None
) -> dict[str, str]:
    """``{stored name: readable name}`` for the Keras 3 variables among ``names``."""
    owners: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        match = VARIABLE.match(name)
        if match and match.group(1) and match.group(1).split("/", 1)[0] not in KEPT_PATHS:
            owners.setdefault(match.group(1), []).append((int(match.group(2)), name))
    if not owners:
        return {}
    entries = config_entries(model_config)
    renamed: dict[str, str] = {}
    for owner, stored in owners.items():
        variables = _variable_names(owner, len(stored), entries)
        if variables is None or sorted(i for i, _ in stored) != list(range(len(stored))):
            continue
        layer_path = "/".join(_layer_names(owner, attrs, handle, entries))
        renamed.update({name: f"{layer_path}/{variables[i]}" for i, name in stored})
    return _without_collisions(renamed, names)


def name_variables(
    contents: Contents,
    open_file: Callable[[], AbstractContextManager[Any]],
    attrs: AttributeReader,
    translate: Callable[[BaseException], Exception],
    model_config: Any = None,
) -> None:
    """Give ``contents`` (an HDF5 file's, read by ``hdf5.read_contents``) Keras' variable
    names, its file opened by ``open_file``; h5py's errors become ``translate``'s, and close
    the contents, as a failed read does."""
    tree = contents.tree
    if not isinstance(tree, dict) or not any(VARIABLE.match(str(name)) for name in tree):
        return
    try:
        with open_file() as handle:
            renamed = readable_names(attrs, handle, list(tree), model_config)
    except Exception as exc:
        if contents.close is not None:
            contents.close()
        raise translate(exc) from None
    contents.tree = {renamed.get(name, name): value for name, value in tree.items()}


def config_entries(model_config: Any) -> dict[str, LayerEntry]:
    """Each layer of the config's layer lists by the path Keras 3 stores it under
    (``layers/dense_1``, ``layers/sequential/layers/dense``), counted as Keras counts them."""
    found: dict[str, LayerEntry] = {}
    stack: list[tuple[str, Any, int]] = [("", model_config, 0)]
    while stack:
        path, model, depth = stack.pop()
        if depth > limits.MAX_DEPTH:
            raise LimitExceededError(
                "nesting depth of the Keras model config", limits.MAX_DEPTH, depth
            )
        inner = model.get("config") if isinstance(model, dict) else None
        layers = inner.get("layers") if isinstance(inner, dict) else None
        if not isinstance(layers, list):
            continue
        used: dict[str, int] = {}
        for layer in layers[: limits.MAX_TREE_NODES]:
            if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
                continue
            class_name = layer["class_name"]
            snake = _snake_case(class_name)
            count = used.get(snake)
            used[snake] = 0 if count is None else count + 1
            unique = snake if count is None else f"{snake}_{count + 1}"
            where = f"{path}layers/{unique}"
            config = layer.get("config")
            config = config if isinstance(config, dict) else {}
            name = config.get("name", layer.get("name"))
            found[where] = LayerEntry(name if isinstance(name, str) else "", class_name, config)
            stack.append((f"{where}/", layer, depth + 1))
    return found


def _variable_names(owner: str, count: int, entries: Mapping[str, LayerEntry]) -> list[str] | None:
    entry = entries.get(owner)
    class_name = entry.class_name if entry is not None else _class_of(owner, entries)
    variables = VARIABLES.get(class_name or "")
    if variables is None:
        return None
    if entry is not None:
        made = [name for name, flag in variables if flag is None or flag(entry.config)]
        return made if len(made) == count else None
    required = [name for name, flag in variables if flag is None]
    if count == len(variables):
        return [name for name, _ in variables]
    if count == len(required):
        return required
    return None  # which optional variables exist is the config's to say


def _class_of(owner: str, entries: Mapping[str, LayerEntry]) -> str | None:
    """The class of a layer the config does not list: from its group name in a layer list,
    or from the attribute a known parent holds it under."""
    parent, _, last = owner.rpartition("/")
    container = parent.rpartition("/")[2]
    if container in LAYER_LISTS:
        if last in SNAKE_CLASSES:
            return SNAKE_CLASSES[last]
        counted = COUNTER.match(last)
        return SNAKE_CLASSES.get(counted.group(1)) if counted else None
    parent_class = entries[parent].class_name if parent in entries else _class_of(parent, entries)
    return HELD_LAYERS.get((parent_class or "", last))


def _layer_names(
    owner: str, attrs: AttributeReader, handle: Any, entries: Mapping[str, LayerEntry]
) -> list[str]:
    """The names of the layers from the model down to ``owner`` (the model left out): the
    groups on the way that hold a ``vars`` group are layers, the others layer lists."""
    parts = owner.split("/")
    names: list[str] = []
    group = handle
    for index, part in enumerate(parts):
        group = _hard_group(attrs, group, part)
        variables = _hard_group(attrs, group, "vars")
        if index < len(parts) - 1 and (part in LAYER_LISTS or variables is None):
            continue
        path = "/".join(parts[: index + 1])
        entry = entries.get(path)
        stored = _stored_name(attrs, variables)
        names.append(stored or (entry.name if entry is not None and entry.name else part))
    return names


def _hard_group(attrs: AttributeReader, group: Any, part: str) -> Any:
    if group is None:
        return None
    h5py = attrs.h5py
    if not isinstance(group.get(part, getlink=True), h5py.HardLink):
        return None
    child = group[part]
    return child if isinstance(child, h5py.Group) else None


def _stored_name(attrs: AttributeReader, variables: Any) -> str | None:
    """The ``name`` attribute newer Keras 3 releases set on a layer's ``vars`` group."""
    if variables is None:
        return None
    name = attrs.get(variables, "name", missing=None)
    return name if isinstance(name, str) and name and "/" not in name else None


def _without_collisions(renamed: dict[str, str], names: list[str]) -> dict[str, str]:
    """Only the renames that leave every name distinct."""
    kept = set(names) - set(renamed)
    counts: dict[str, int] = {}
    for new in renamed.values():
        counts[new] = counts.get(new, 0) + 1
    return {old: new for old, new in renamed.items() if counts[new] == 1 and new not in kept}
