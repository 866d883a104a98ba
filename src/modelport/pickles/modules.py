"""A pickled ``nn.Module`` without its class: its state_dict and module tree from records.

``torch.save(model)`` writes each module as NEWOBJ of its class followed by BUILD with the
instance ``__dict__``: ``_parameters``, ``_buffers``, ``_non_persistent_buffers_set`` and
``_modules``. Walking those records gives exactly what ``model.state_dict()`` returns
(parameters, then persistent buffers, then submodules, each prefixed), and the class path of
every submodule, without importing any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelport.pickles.records import ObjectRecord
from modelport.tensors import TensorRef


def is_module(value: Any) -> bool:
    """True for a record with the attribute layout every ``nn.Module`` pickles."""
    if not isinstance(value, ObjectRecord):
        return False
    attributes = value.attributes()
    return isinstance(attributes.get("_parameters"), dict) and isinstance(
        attributes.get("_modules"), dict
    )


@dataclass
class ModuleNode:
    """One module of the tree: its class path and its named children."""

    class_path: str
    children: dict[str, ModuleNode] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        node: dict[str, Any] = {"class": self.class_path}
        if self.children:
            node["children"] = {name: child.to_json() for name, child in self.children.items()}
        return node


def state_dict(module: ObjectRecord) -> dict[str, Any]:
    """``module.state_dict()`` as torch would order it; values are ``TensorRef``s or, for
    tensors torch rebuilds in ways modelport only records, the record itself."""
    result: dict[str, Any] = {}
    pending: list[tuple[str, ObjectRecord]] = [("", module)]
    seen: set[int] = set()
    while pending:
        prefix, current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        attributes = current.attributes()
        for name, value in attributes.get("_parameters", {}).items():
            if value is not None:
                result[prefix + str(name)] = value
        skipped = attributes.get("_non_persistent_buffers_set") or set()
        skipped = skipped if isinstance(skipped, (set, frozenset, list, tuple)) else set()
        for name, value in _items(attributes.get("_buffers")):
            if value is not None and name not in skipped:
                result[prefix + str(name)] = value
        children = [(prefix + str(n) + ".", m) for n, m in _items(attributes.get("_modules"))]
        # depth-first in declaration order: push in reverse so the first child pops first
        pending.extend(reversed([(p, m) for p, m in children if is_module(m)]))
    return result


def _items(value: Any) -> list[tuple[Any, Any]]:
    return list(value.items()) if isinstance(value, dict) else []


def module_tree(module: ObjectRecord) -> ModuleNode:
    """The class path of the module and of each submodule, nested by attribute name."""
    root = ModuleNode(module.class_path)
    pending: list[tuple[ModuleNode, ObjectRecord]] = [(root, module)]
    seen = {id(module)}
    while pending:
        node, current = pending.pop()
        for name, child in _items(current.attributes().get("_modules")):
            if is_module(child) and id(child) not in seen:
                seen.add(id(child))
                child_node = ModuleNode(child.class_path)
                node.children[str(name)] = child_node
                pending.append((child_node, child))
    return root


def tensors_of(values: dict[str, Any]) -> dict[str, TensorRef]:
    return {name: value for name, value in values.items() if isinstance(value, TensorRef)}
