"""The report as one HTML page: ``render(report)``.

One file, self-contained: inline CSS, inline script, inline SVG, no link, image, font or
script fetched from anywhere, so it opens from ``file://``, can be mailed or attached to a
CI run, and shows the same thing offline in ten years. A Content-Security-Policy that admits
only the page's own style and script (by hash) makes that a promise the browser keeps.

A page that ``export`` or ``rebuild`` writes (``--report FILE.html``) opens with how the
file was made and verified (``html_verification``), the facts their Markdown report shows.
Sections per file: identity (format, sizes, sha256 of each file, weights digest, modelport
version), safety (the verdict and every finding with member, offset, opcode and fix), flags,
with ``--model`` whether the weights fit that model (``html_model``), structure (module
tree, pickled class tree, aliases, checkpoint extras, a Hugging Face folder's
``config.json``, metadata such as GGUF key/values, format details such as ONNX inputs and
outputs) and values (the sortable,
filterable tensor table with a sparkline per row). With two files the identities and
verdicts stand side by side, then the diff (``html_diff``). The data it shows is also in a
``<script type="application/json" id="modelport-data">`` block, for tools.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

from modelport.measuring.stats_records import TensorStats
from modelport.reporting import html_diff, html_model, html_verification
from modelport.reporting.html_parts import (
    Column,
    SparkAxis,
    big_table,
    class_tree,
    count,
    human_bytes,
    json_text,
    kv_table,
    module_tree,
    number,
    script_json,
    sparkline,
    text,
    value_html,
)
from modelport.reporting.model_report import FileSection, Report
from modelport.reporting.page_assets import CSS, JS

MAX_FLAG_NAMES: Final = 12  # names listed under one flag before "... and N more"
COLUMNS: Final = (  # each sorts by the field of TensorStats.to_json() it names
    Column("name", "name"),
    Column("dtype", "dtype"),
    Column("shape", "shape", numeric=True),
    Column("histogram"),
    Column("min", "min", numeric=True),
    Column("max", "max", numeric=True),
    Column("mean", "mean", numeric=True),
    Column("std", "std", numeric=True),
    Column("rms", "rms", numeric=True),
    Column("NaN", "nan", numeric=True),
    Column("Inf", "inf", numeric=True),
    Column("zeros", "zeros", numeric=True),
    Column("subnormal", "subnormal", numeric=True),
    Column(">fp16", "over_float16", numeric=True),
    Column(">bf16", "over_bfloat16", numeric=True),
    Column("flags", "flags"),
)


def render(report: Report) -> str:
    """The whole page as text."""
    pair = len(report.sections) == 2
    labels = ("A", "B") if pair else ("",)
    body = [_header(report, labels)]
    if report.verification is not None:
        body.append(html_verification.section(report.verification))
    body.append(_side_by_side([_identity(s, report) for s in report.sections], labels, "identity"))
    body.append(_side_by_side([_safety(s, pair) for s in report.sections], labels, "safety"))
    if report.diff is not None:
        body.append(html_diff.section(report.diff))
    for index, (label, section) in enumerate(zip(labels, report.sections, strict=True)):
        body.append(_file_body(section, label, index, report.model))
    data = script_json(report.to_json())
    title = " vs ".join(_name(s) for s in report.sections)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{_policy()}">'
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        '<meta name=referrer content="no-referrer">'
        f"<title>modelport report: {text(title)}</title><style>{CSS}</style></head><body>"
        + "".join(body)
        + f'<script type="application/json" id="modelport-data">{data}</script>'
        + f"<script>{JS}</script></body></html>\n"
    )


def _policy() -> str:
    def digest(source: str) -> str:
        hashed = base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode()
        return f"'sha256-{hashed}'"

    return (
        f"default-src 'none'; style-src {digest(CSS)}; script-src {digest(JS)}; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )


def _name(section: FileSection) -> str:
    return section.path.rstrip("/").rsplit("/", 1)[-1]


def _header(report: Report, labels: tuple[str, ...]) -> str:
    names = " <span class=dim>vs</span> ".join(text(_name(s)) for s in report.sections)
    links = ["identity", "safety", *(["diff"] if report.diff is not None else [])]
    if report.verification is not None:
        links.insert(0, html_verification.SECTION_ID)
    for index, label in enumerate(labels):
        suffix = f" {label}" if label else ""
        links += [f"flags-{index}|flags{suffix}", f"structure-{index}|structure{suffix}"]
        if report.model is not None:
            links.append(f"fit-{index}|fit{suffix}")
        links.append(f"values-{index}|values{suffix}")
    nav = "".join(
        f'<a href="#{link.partition("|")[0]}">{text(link.partition("|")[2] or link)}</a>'
        for link in links
    )
    return (
        f"<header><h1>{names}</h1><div class=dim>modelport {text(report.version)} report, "
        f"{text(report.created)}</div><nav>{nav}</nav></header>"
    )


def _side_by_side(parts: list[str], labels: tuple[str, ...], anchor: str) -> str:
    if len(parts) == 1:
        return f"<section id={anchor}>{parts[0]}</section>"
    cells = "".join(
        f"<div><h3>{label}</h3>{part}</div>" for label, part in zip(labels, parts, strict=True)
    )
    heading = f"<h2>{anchor.capitalize()}</h2>"
    return f"<section id={anchor}>{heading}<div class=cols>{cells}</div></section>"


def _identity(section: FileSection, report: Report) -> str:
    summary = section.inspect
    rows = [
        ("path", text(section.path)),
        ("format", text(summary.format)),
        ("size", human_bytes(summary.size_bytes)),
    ]
    if section.files is not None and len(section.files) == 1:
        rows.append(("sha256", f"<code>{text(section.files[0].sha256)}</code>"))
    if section.weights is not None:
        weights = section.weights
        source = f", from {text(weights.weights_source)}" if weights.weights_source else ""
        rows.append(
            (
                "weights digest",
                f"<code>{text(weights.digest)}</code> <span class=dim>{text(weights.scheme)}, "
                f"{count(weights.tensor_count)} tensors{source}</span>",
            )
        )
    rows += [
        ("tensors", count(len(summary.tensors))),
        ("parameters", count(summary.parameters)),
        (
            "bytes by dtype",
            ", ".join(f"{text(k)} {human_bytes(v)}" for k, v in summary.bytes_by_dtype.items())
            or "-",
        ),
        ("modelport", text(report.version)),
        ("statistics", f"{section.stats.seconds:.2f} s on {section.stats.threads} threads"),
    ]
    shards = ""
    if section.files is not None and len(section.files) > 1:
        shards = "<h3>Files</h3>" + value_html([f.to_json() for f in section.files])
    heading = "" if len(report.sections) == 2 else "<h2>Identity</h2>"
    return heading + kv_table(rows) + shards


def _safety(section: FileSection, pair: bool) -> str:
    verdict = section.scan.verdict
    parts = [f"<p>Verdict: <span class='verdict {text(verdict)}'>{text(verdict)}</span></p>"]
    records = [
        {"file": file.path, **finding.to_json()}
        for file in section.scan.files
        for finding in file.findings
    ]
    if records:
        if len(section.scan.files) == 1:
            records = [{k: v for k, v in r.items() if k != "file"} for r in records]
        parts.append(value_html(records))
    else:
        parts.append("<p class=dim>no findings</p>")
    return ("" if pair else "<h2>Safety</h2>") + "".join(parts)


def _file_body(section: FileSection, label: str, index: int, model: str | None) -> str:
    suffix = f" ({label}: {text(_name(section))})" if label else ""
    fit = ""
    if section.fit is not None and model is not None:
        fit = html_model.fit_section(section.fit, model, index, suffix)
    return (
        f"<section id=flags-{index}><h2>Flags{suffix}</h2>{_flags(section)}</section>{fit}"
        f"<section id=structure-{index}><h2>Structure{suffix}</h2>"
        f"{_structure(section, index)}</section>"
        f"<section id=values-{index}><h2>Values{suffix}</h2>{_values(section, index)}</section>"
    )


def _flags(section: FileSection) -> str:
    raised = section.stats.flags
    if not raised:
        return "<p class=dim>nothing flagged</p>"
    items = []
    for flag in raised:
        names = ", ".join(f"<code>{text(n)}</code>" for n in flag.names[:MAX_FLAG_NAMES])
        hidden = len(flag.names) - MAX_FLAG_NAMES
        names += f" <span class=dim>and {hidden:,} more</span>" if hidden > 0 else ""
        items.append(
            f"<li><span class=flag>{text(flag.kind)}</span> {text(flag.message)}: {names}</li>"
        )
    return f"<ul>{''.join(items)}</ul>"


def _structure(section: FileSection, index: int) -> str:
    summary = section.inspect
    tree_id = f"tree-{index}"
    parts = [
        "<h3>Module tree</h3><div class=controls>"
        f'<button type=button data-tree="{tree_id}" data-open=1>expand all</button>'
        f'<button type=button data-tree="{tree_id}" data-open=0>collapse all</button></div>'
        f"<div id={tree_id}>{module_tree(summary.tensors)}</div>"
    ]
    if summary.modules:
        parts.append("<h3>Pickled module classes</h3><ul class=tree>")
        parts.append(class_tree(summary.modules) if "class" in summary.modules else "")
        if "class" not in summary.modules:
            parts.extend(class_tree(v, str(k)) for k, v in summary.modules.items())
        parts.append("</ul>")
    if summary.aliases:
        groups = [" = ".join(group) for group in summary.aliases]
        parts.append("<h3>Tied and aliased tensors</h3>" + value_html(groups))
    if summary.weights_source or summary.weights_note:
        parts.append(
            f"<h3>Model weights</h3><p>{text(summary.weights_source or 'the whole file')} "
            f"<span class=dim>{text(summary.weights_note)}</span></p>"
        )
    if summary.extras not in (None, {}, []):
        parts.append("<h3>Checkpoint extras</h3>" + json_text(summary.extras))
    if section.config is not None:
        parts.append(html_model.config_part(section.config))
    for title, value in (("Metadata", summary.metadata), ("Format details", summary.details)):
        if value:
            parts.append(f"<h3>{title}</h3>" + value_html(value))
    if summary.warnings:
        parts.append("<h3>Warnings</h3>" + value_html(list(summary.warnings)))
    if summary.code_files:
        parts.append("<h3>Code files</h3>" + value_html(list(summary.code_files)))
    return "".join(parts)


def _values(section: FileSection, index: int) -> str:
    tensors = section.stats.tensors
    axis = SparkAxis.over(t.histogram for t in tensors)
    legend = (
        f"Histograms: one bar per power of two from 2^{axis.low} to 2^{axis.high} "
        "(smaller magnitudes join the innermost bar), negative values left, zeros grey in the "
        "middle, positive right; heights on a log scale. Statistics describe the finite values."
    )
    rows = [_row(t, axis) for t in tensors]
    return f"<p class=dim>{legend}</p>" + big_table(
        str(index), f"files.{index}.stats.tensors", COLUMNS, rows, flagged=True
    )


def _row(item: TensorStats, axis: SparkAxis) -> str:
    cells = [
        f"<td class=name>{text(item.name)}</td>",
        f"<td>{text(item.dtype)}</td>",
        f"<td class=num>{text(list(item.shape))}</td>",
        f"<td>{sparkline(item.histogram, item.zeros, axis)}</td>",
    ]
    for column in COLUMNS[4:15]:  # every row has every cell, computed or not
        value = getattr(item, column.field) if item.computed else None
        shown = number(value) if isinstance(value, float) or value is None else count(value)
        cells.append(f"<td class=num>{shown}</td>")
    badges = "".join(f"<span class=flag>{text(kind)}</span>" for kind in item.flags)
    if item.note:
        badges += f" <span class=dim>{text(item.note)}</span>"
    cells.append(f"<td>{badges}</td>")
    return f"<tr>{''.join(cells)}</tr>"
