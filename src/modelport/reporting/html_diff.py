"""The diff part of a two-file report: names only in one file, dtype and shape changes, a
per-layer heat map of the largest absolute difference (cosine in each cell's tooltip) and a
sortable table of every common tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from modelport.comparing.diffing import DiffReport, TensorDiff
from modelport.measuring.flags import layer_role
from modelport.reporting.html_parts import Column, big_table, count, kv_table, more, number, text

MAX_LISTED: Final = 2000  # names listed as only in one file
MAX_ROLES: Final = 60  # heat map columns
MAX_LAYERS: Final = 400  # heat map rows
CELL: Final = 12  # heat map cell size in pixels


def section(report: DiffReport) -> str:
    counts = report.to_json()["counts"]
    verdict = "same" if report.same else "different"
    how = "bit-identical" if report.exact else f"atol {report.atol:g}, rtol {report.rtol:g}"
    summary = kv_table(
        [
            ("A", f"{text(report.a)} <span class=dim>{text(report.format_a)}</span>"),
            ("B", f"{text(report.b)} <span class=dim>{text(report.format_b)}</span>"),
            (
                "verdict",
                f"<span class='verdict {'safe' if report.same else 'suspicious'}'>"
                f"{verdict}</span> <span class=dim>({how})</span>",
            ),
            *((key.replace("_", " "), count(value)) for key, value in counts.items()),
        ]
    )
    parts = ["<section id=diff><h2>Diff</h2>", summary]
    parts += [f"<p class=dim>note: {text(note)}</p>" for note in report.notes]
    parts.append(_names("Only in A", report.only_in_a))
    parts.append(_names("Only in B", report.only_in_b))
    if report.changed:
        rows = "".join(
            f"<tr><td class=name>{text(c.name)}</td><td>{text(c.dtype_a)} "
            f"{text(list(c.shape_a))}</td><td>{text(c.dtype_b)} {text(list(c.shape_b))}</td></tr>"
            for c in report.changed
        )
        parts.append(
            "<h3>Dtype or shape changed</h3><table class=grid><thead><tr><th>name</th><th>A</th>"
            f"<th>B</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    parts.append(heat_map(report.tensors))
    parts.append(_table(report.tensors))
    parts.append("</section>")
    return "".join(parts)


def _names(title: str, names: tuple[str, ...]) -> str:
    if not names:
        return ""
    items = "".join(f"<li><code>{text(n)}</code></li>" for n in names[:MAX_LISTED])
    return (
        f"<details><summary>{text(title)}: {count(len(names))}</summary><ul>{items}</ul>"
        f"{more(len(names) - MAX_LISTED)}</details>"
    )


def heat_map(tensors: Sequence[TensorDiff]) -> str:
    """Layers down, roles across (``layers.#.mlp.up.weight``); colour by log10 of the largest
    absolute difference, white for bit-equal, grey where it could not be computed."""
    cells: dict[tuple[int, str], TensorDiff] = {}
    for item in tensors:
        found = layer_role(item.name)
        if found is not None:
            cells[(found[1], found[0])] = item
    if not cells:
        return ""
    roles = sorted({role for _, role in cells})[:MAX_ROLES]
    layers = sorted({layer for layer, _ in cells})[:MAX_LAYERS]
    finite = [
        math.log10(c.max_abs) for c in cells.values() if c.max_abs and math.isfinite(c.max_abs)
    ]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    left, top = 48, 8
    rects = []
    for row, layer in enumerate(layers):
        y = top + row * CELL
        rects.append(f'<text x="{left - 4}" y="{y + CELL - 2}" text-anchor="end">{layer}</text>')
        for column, role in enumerate(roles):
            cell = cells.get((layer, role))
            if cell is None:
                continue
            tip = (
                f"{cell.name}: max abs {number(cell.max_abs)}, cosine "
                f"{number(cell.cosine)}{', bit-equal' if cell.bit_equal else ''}"
            )
            rects.append(
                f'<rect x="{left + column * CELL}" y="{y}" width="{CELL - 1}" '
                f'height="{CELL - 1}" fill="{_colour(cell, low, high)}"><title>{text(tip)}</title>'
                "</rect>"
            )
    width = left + len(roles) * CELL + 8
    height = top + len(layers) * CELL + 4
    legend = "".join(
        f"<li><b>{column + 1}</b> <code>{text(role)}</code></li>"
        for column, role in enumerate(roles)
    )
    return (
        "<h3>Per-layer heat map (max abs difference)</h3>"
        f"<p class=dim>colour from 1e{low:.1f} (yellow) to 1e{high:.1f} (dark red); white: "
        "bit-equal; hover a cell for its name and cosine. Columns:</p>"
        f"<ol class=mono>{legend}</ol>"
        f'<svg class=heat width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="heat map of differences per layer">{"".join(rects)}</svg>'
    )


def _colour(item: TensorDiff, low: float, high: float) -> str:
    if item.bit_equal or item.max_abs == 0:
        return "#ffffff"
    if item.max_abs is None or not math.isfinite(item.max_abs):
        return "#8a8f96" if item.max_abs is None else "#000000"
    share = 0.5 if high == low else (math.log10(item.max_abs) - low) / (high - low)
    return f"hsl({round(55 - 55 * share)}, 90%, {round(78 - 48 * share)}%)"


DIFF_COLUMNS: Final = (  # each sorts by the field of TensorDiff.to_json() it names
    Column("name", "name"),
    Column("dtype", "dtype_a"),
    Column("shape", "shape", numeric=True),
    Column("bit-equal", "bit_equal"),
    Column("max abs", "max_abs", numeric=True),
    Column("max rel", "max_rel", numeric=True),
    Column("cosine", "cosine", numeric=True),
    Column("mismatched", "mismatched", numeric=True),
)


def _table(tensors: Sequence[TensorDiff]) -> str:
    if not tensors:
        return ""
    rows = []
    for item in tensors:
        dtype = item.dtype_a if item.dtype_a == item.dtype_b else f"{item.dtype_a}/{item.dtype_b}"
        numbers = "".join(
            f"<td class=num>{number(v)}</td>" for v in (item.max_abs, item.max_rel, item.cosine)
        )
        rows.append(
            f"<tr><td class=name>{text(item.name)}</td><td>{text(dtype)}</td>"
            f"<td class=num>{text(list(item.shape))}</td>"
            f"<td>{'yes' if item.bit_equal else 'no'}</td>{numbers}"
            f"<td class=num>{count(item.mismatched)}</td></tr>"
        )
    return "<h3>Common tensors</h3>" + big_table(
        "diff", "diff.tensors", DIFF_COLUMNS, rows, flagged=False
    )
