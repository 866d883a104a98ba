"""Pieces of the HTML report that know nothing of its layout: escaping, numbers, values of
any shape as tables, the module tree, the sparkline histograms and the diff heat map.

Everything that comes from a file (names, metadata, templates, findings) goes through
``text`` (``html.escape`` with quotes), in element content and in attributes alike; nothing
from a file is ever placed in a script, a style or a URL.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from modelport.loading.inspect_report import TensorSummary
from modelport.measuring.stats_records import Histogram

INITIAL_ROWS: Final = 200  # table rows in the HTML itself; the script pages through the rest
MAX_TEXT: Final = 2000  # characters of one metadata value shown before "... more"
MAX_ITEMS: Final = 200  # keys of a mapping, rows of a table of records
MAX_DEPTH: Final = 4  # nesting of mappings shown as tables; deeper goes as JSON text
MAX_TREE_DEPTH: Final = 32  # a name with more dots keeps the rest in its last part
SPARK_BINS: Final = 48  # exponents on a sparkline's axis (each side of zero)
SPARK_HEIGHT: Final = 18


def text(value: object) -> str:
    """Escaped for HTML content and for quoted attribute values."""
    return html.escape(str(value), quote=True)


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


def count(value: int) -> str:
    return f"{value:,}"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{size:,} B" if unit == "B" else f"{value:.1f} {unit} ({size:,} B)"
        value /= 1000
    return f"{size:,} B"


def human_count(value: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def clipped(value: str, limit: int = MAX_TEXT) -> str:
    if len(value) <= limit:
        return text(value)
    return (
        f"{text(value[:limit])}<span class=more>... {len(value) - limit:,} more characters</span>"
    )


def json_text(value: Any, limit: int = 100_000) -> str:
    """A value as indented JSON, escaped, in a ``<pre>``."""
    dumped = json.dumps(value, indent=2, default=repr, ensure_ascii=False)
    return f"<pre>{clipped(dumped, limit)}</pre>"


def value_html(value: Any, depth: int = 0) -> str:
    """Any JSON-like value: mappings as key/value tables, lists of records as tables,
    lists of scalars as one line, long or deep values as JSON text."""
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return json_text(value, MAX_TEXT)
        return kv_table(((str(k), value_html(v, depth + 1)) for k, v in value.items()), len(value))
    if isinstance(value, (list, tuple)):
        return _sequence_html(list(value), depth)
    if isinstance(value, str):
        return f"<pre>{clipped(value)}</pre>" if "\n" in value else clipped(value)
    return clipped(json.dumps(value, default=repr))


def _sequence_html(items: list[Any], depth: int) -> str:
    if not items:
        return "<span class=dim>(empty)</span>"
    if all(not isinstance(i, (dict, list, tuple)) for i in items):
        joined = ", ".join(i if isinstance(i, str) else json.dumps(i, default=repr) for i in items)
        return f"{clipped(joined, 400)} <span class=dim>({len(items):,} items)</span>"
    if depth < MAX_DEPTH and all(isinstance(i, dict) for i in items):
        columns = list(dict.fromkeys(k for i in items[:MAX_ITEMS] for k in i))[:12]
        head = "".join(f"<th>{text(c)}</th>" for c in columns)
        rows = "".join(
            "<tr>"
            + "".join(f"<td>{value_html(i.get(c, ''), depth + 1)}</td>" for c in columns)
            + "</tr>"
            for i in items[:MAX_ITEMS]
        )
        return f"<table class=grid><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>" + (
            more(len(items) - MAX_ITEMS)
        )
    return json_text(items, MAX_TEXT * 5)


def kv_table(rows: Iterable[tuple[str, str]], total: int | None = None) -> str:
    """Rows of (key, already-rendered HTML); keys are escaped here."""
    body = []
    for shown, (key, cell) in enumerate(rows):
        if shown >= MAX_ITEMS:
            break
        body.append(f"<tr><th>{text(key)}</th><td>{cell}</td></tr>")
    extra = more((total or 0) - MAX_ITEMS)
    return f"<table class=kv><tbody>{''.join(body)}</tbody></table>{extra}"


def more(hidden: int) -> str:
    return f"<p class=dim>... and {hidden:,} more</p>" if hidden > 0 else ""


def script_json(value: Any) -> str:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>`` and ``&`` escaped,
    so no text inside can close the block or open another."""
    dumped = json.dumps(value, ensure_ascii=True, default=repr, allow_nan=False)
    return dumped.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass(frozen=True)
class Column:
    """A table column: its title, the field of the page data's records it sorts by (none:
    not sortable) and whether that sorts as a number."""

    title: str
    field: str = ""
    numeric: bool = False

    def header(self) -> str:
        if not self.field:
            return f"<th>{text(self.title)}</th>"
        kind = "num" if self.numeric else "text"
        return (
            f'<th data-field="{text(self.field)}" data-type={kind}>'
            f"<button type=button>{text(self.title)}</button></th>"
        )


def big_table(
    name: str, records: str, columns: Sequence[Column], rows: Sequence[str], flagged: bool
) -> str:
    """A sortable, filterable table of any length that opens fast: the first rows are in the
    HTML, every row's HTML is in a JSON block, and the script sorts and filters the page
    data's records (``records``: their path in it, e.g. ``files.0.stats.tensors``, one per
    row) and renders only the rows asked for. Parsing 10,000 rows of cells would take the
    browser seconds; parsing their text as one JSON string takes milliseconds."""
    head = "".join(c.header() for c in columns)
    checkbox = (
        f"<label><input type=checkbox id=flagged-{name}> flagged only</label>" if flagged else ""
    )
    shown = min(len(rows), INITIAL_ROWS)
    return (
        "<div class=controls>"
        f'<input type=search class=filter placeholder="filter: words in name, dtype or flags" '
        f'aria-label="filter the table" data-table="table-{name}">{checkbox}'
        f"<span id=count-{name} class=dim>{shown:,} of {len(rows):,} shown</span></div>"
        f'<div class=scroll><table class=sortable id=table-{name} data-records="{text(records)}" '
        f'data-rows="rows-{name}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows[:shown])}</tbody></table></div>"
        f'<div class=controls><button type=button class=more data-table="table-{name}" '
        f"data-step=1000>show 1,000 more</button>"
        f'<button type=button class=more data-table="table-{name}" data-step=0>show all</button>'
        f"<noscript>without JavaScript only the first {shown:,} rows show; every value is in "
        "the JSON block at the end of the page</noscript></div>"
        f'<script type="application/json" id=rows-{name}>{script_json(list(rows))}</script>'
    )


# --- the module tree -----------------------------------------------------------------------


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    leaves: list[tuple[str, TensorSummary]] = field(default_factory=list)
    elements: int = 0
    tensors: int = 0


def _natural(key: str) -> tuple[tuple[int, int, str], ...]:
    """``layers.2`` before ``layers.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key))


def module_tree(tensors: Sequence[TensorSummary]) -> str:
    """The dotted names as a tree of ``<details>`` (collapsible without script), each
    module with the elements and tensors under it."""
    root = _Node()
    for summary in tensors:
        parts = summary.name.split(".")
        if len(parts) > MAX_TREE_DEPTH:
            parts = [*parts[: MAX_TREE_DEPTH - 1], ".".join(parts[MAX_TREE_DEPTH - 1 :])]
        elements = math.prod(summary.shape)
        node = root
        node.elements += elements
        node.tensors += 1
        for part in parts[:-1]:
            node = node.children.setdefault(part, _Node())
            node.elements += elements
            node.tensors += 1
        node.leaves.append((parts[-1], summary))
    return f"<ul class=tree>{_node_items(root, True)}</ul>"


def _node_items(node: _Node, open_: bool) -> str:
    """A node's modules, then its tensors; a module holding one tensor and nothing else is
    one line (``q_proj.weight``): it reads better and keeps big trees quick to open."""
    items = []
    leaves = list(node.leaves)
    only_child = len(node.children) == 1 and not node.leaves
    for name in sorted(node.children, key=_natural):
        child = node.children[name]
        if not child.children and len(child.leaves) == 1:
            leaves.append((f"{name}.{child.leaves[0][0]}", child.leaves[0][1]))
            continue
        mark = " open" if open_ and only_child else ""
        label = (
            f"<summary><span class=mod>{text(name)}</span> <span class=dim>"
            f"{human_count(child.elements)} elements, {count(child.tensors)} tensors</span>"
            "</summary>"
        )
        inner = _node_items(child, open_ and only_child)
        items.append(f"<li><details{mark}>{label}<ul>{inner}</ul></details></li>")
    for leaf, tensor in sorted(leaves, key=lambda pair: _natural(pair[0])):
        items.append(
            f"<li class=leaf><code>{text(leaf)}</code> {text(tensor.dtype)} "
            f"{text(list(tensor.shape))}</li>"
        )
    return "".join(items)


def class_tree(node: dict[str, Any], name: str = "", depth: int = 0) -> str:
    """A pickled module's class tree (``ModelFile.module_tree``) as nested lists."""
    if not isinstance(node, dict) or depth > MAX_TREE_DEPTH:
        return ""
    label = f"<code>{text(name)}</code> " if name else ""
    children = node.get("children")
    inner = ""
    if isinstance(children, dict) and children:
        inner = "<ul>" + "".join(class_tree(v, str(k), depth + 1) for k, v in children.items())
        inner += "</ul>"
    return f"<li>{label}<span class=dim>{text(node.get('class', ''))}</span>{inner}</li>"


# --- sparklines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SparkAxis:
    """The exponents every sparkline of a table shares, so rows can be compared by eye."""

    low: int
    high: int

    @classmethod
    def over(cls, histograms: Iterable[Histogram | None]) -> SparkAxis:
        found = [h for h in histograms if h is not None]
        if not found:
            return cls(0, 0)
        high = max(h.high for h in found)
        low = max(min(h.low for h in found), high - SPARK_BINS + 1)
        return cls(low, high)

    @property
    def bins(self) -> int:
        return self.high - self.low + 1


def sparkline(histogram: Histogram | None, zeros: int, axis: SparkAxis) -> str:
    """Negative values on the left (largest magnitude outermost), zeros in the middle,
    positive values on the right; bar heights on a log scale, so a lone outlier shows."""
    if histogram is None and not zeros:
        return ""
    step = 2
    width = step * (2 * axis.bins + 1)
    bars: dict[str, list[tuple[int, int]]] = {"n": [], "z": [], "p": []}
    if histogram is not None:
        for offset, amount in enumerate(histogram.negative):
            slot = axis.high - max(axis.low, histogram.low + offset)
            bars["n"].append((slot, amount))
        for offset, amount in enumerate(histogram.positive):
            slot = axis.bins + 1 + max(axis.low, histogram.low + offset) - axis.low
            bars["p"].append((slot, amount))
    if zeros:
        bars["z"].append((axis.bins, zeros))
    tallest = max(amount for group in bars.values() for _, amount in group)
    scale = (SPARK_HEIGHT - 1) / math.log1p(tallest)
    paths = []
    for kind, group in bars.items():
        heights: dict[int, int] = {}
        for slot, amount in group:  # bins folded into the axis' lowest add up
            heights[slot] = heights.get(slot, 0) + amount
        d = "".join(
            f"M{slot * step} {SPARK_HEIGHT}v-{max(1, round(math.log1p(n) * scale))}h{step - 0.5}"
            f"V{SPARK_HEIGHT}z"
            for slot, n in sorted(heights.items())
            if n > 0
        )
        if d:
            paths.append(f'<path class={kind} d="{d}"/>')
    return (
        f'<svg class=spark width="{width}" height="{SPARK_HEIGHT}" '
        f'viewBox="0 0 {width} {SPARK_HEIGHT}" aria-hidden="true">{"".join(paths)}</svg>'
    )
