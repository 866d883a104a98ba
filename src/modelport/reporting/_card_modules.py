"""A model's shape in a few lines, for its card: parameters by dtype, and the top two levels of
its module tree by dotted tensor name with the parameters under each (class names where the
file pickled the module itself).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from modelport.reporting import _card_markdown as md
from modelport.tensors import TensorRef
from modelport.tree import names as trees

MAX_TOP: Final = 24  # top-level modules listed
MAX_CHILDREN: Final = 12  # children listed under each


@dataclass
class _Group:
    parameters: int = 0
    tensors: int = 0
    children: dict[str, _Group] = field(default_factory=dict)

    def add(self, ref: TensorRef) -> None:
        self.parameters += math.prod(ref.shape)
        self.tensors += 1


def dtype_rows(tensors: Mapping[str, TensorRef]) -> list[tuple[str, str, str, str]]:
    """``(dtype, tensors, parameters, stored bytes)`` per dtype, most parameters first; a
    tied tensor's bytes count once."""
    counts: dict[str, list[int]] = {}
    for ref in tensors.values():
        found = counts.setdefault(ref.dtype, [0, 0])
        found[0] += 1
        found[1] += math.prod(ref.shape)
    stored = trees.stored_bytes_by_dtype(dict(tensors))
    ordered = sorted(counts.items(), key=lambda item: -item[1][1])
    return [
        (md.code(d), md.count(n), md.count(p), md.count(stored.get(d, 0))) for d, (n, p) in ordered
    ]


def module_lines(tensors: Mapping[str, TensorRef], classes: dict[str, Any] | None) -> list[str]:
    """A nested Markdown list: each top-level name, then its children, with parameter and
    tensor counts; a run of numbered children (``layers.0`` … ``layers.31``) is one line."""
    top: dict[str, _Group] = {}
    for name, ref in tensors.items():
        head, _, rest = name.partition(".")
        group = top.setdefault(head, _Group())
        group.add(ref)
        if rest:
            group.children.setdefault(rest.partition(".")[0], _Group()).add(ref)
    if all(not g.children for g in top.values()):  # flat names: no tree to show
        return []
    known = _child_classes(classes)
    lines = []
    for name, group in list(top.items())[:MAX_TOP]:
        lines.append(f"- {_label(name, known.get(name, ''))}: {_counts(group)}")
        lines.extend(f"  {line}" for line in _child_lines(name, group.children))
    if len(top) > MAX_TOP:
        lines.append(f"- … and {len(top) - MAX_TOP} more")
    return lines


def _child_lines(parent: str, children: dict[str, _Group]) -> list[str]:
    numbered = [k for k in children if k.isdigit()]
    if len(numbered) >= 3 and len(numbered) == len(children):
        total = _Group(
            sum(g.parameters for g in children.values()), sum(g.tensors for g in children.values())
        )
        first, last = min(numbered, key=int), max(numbered, key=int)
        span = f"{md.code(f'{parent}.{first}')} … {md.code(f'{parent}.{last}')}"
        return [f"- {span}: {len(numbered)} blocks, {_counts(total)}"]
    lines = [
        f"- {md.code(f'{parent}.{name}')}: {_counts(group)}"
        for name, group in list(children.items())[:MAX_CHILDREN]
    ]
    if len(children) > MAX_CHILDREN:
        lines.append(f"- … and {len(children) - MAX_CHILDREN} more")
    return lines


def _child_classes(classes: dict[str, Any] | None) -> dict[str, str]:
    """Class paths of a pickled module's direct children, by attribute name."""
    if not isinstance(classes, dict) or not isinstance(classes.get("children"), dict):
        return {}
    return {
        str(name): str(node.get("class", ""))
        for name, node in classes["children"].items()
        if isinstance(node, dict)
    }


def _label(name: str, class_path: str) -> str:
    return md.code(name) + (f" ({md.code(class_path)})" if class_path else "")


def _counts(group: _Group) -> str:
    noun = "tensor" if group.tensors == 1 else "tensors"
    return f"{md.count(group.parameters)} parameters in {md.count(group.tensors)} {noun}"
