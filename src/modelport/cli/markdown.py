"""Readable Markdown reports of ``export`` and ``rebuild`` (``--report FILE``).

A report says what was exported (model, format, exporter), what was written (files with
sizes), on what (the example inputs and their dynamic axes), how every output compared with
eager PyTorch on every input set (max abs / max rel error against the tolerance), the
verdict, the runtime that checked it, the recipe that makes it again and the warnings. The
facts are ``reporting.verification``'s, the same the HTML page (``--report FILE.html``)
shows; this module only writes them as Markdown.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from modelport.reporting.verification import (
    Block,
    Bullets,
    Code,
    Inline,
    Paragraph,
    Span,
    Table,
    Verification,
    export_facts,
    rebuild_facts,
)

if TYPE_CHECKING:
    from modelport.torch_models.export_report import ExportReport
    from modelport.torch_models.rebuilding import RebuildReport


def export_markdown(
    report: ExportReport, source: str | None = None, recipe: str | None = None
) -> str:
    """The export report as Markdown; ``source`` says how the model was named."""
    return markdown(export_facts(report, source, recipe))


def rebuild_markdown(report: RebuildReport, recipe: str | None = None) -> str:
    """The rebuild report as Markdown."""
    return markdown(rebuild_facts(report, recipe))


def markdown(facts: Verification) -> str:
    """The facts as Markdown: a title, the summary table, then each part under its heading."""
    summary = Table(("", ""), tuple(((Span(label),), value) for label, value in facts.summary))
    lines = [f"# {facts.title}", "", *_table(summary)]
    for part in facts.parts:
        lines += ["", f"## {part.title}"]
        for block in part.blocks:
            lines += ["", *_block(block)]
    return "\n".join(lines) + "\n"


def _block(block: Block) -> list[str]:
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Paragraph):
        return [_inline(block.spans)]
    if isinstance(block, Bullets):
        return [f"- {_inline(item)}" for item in block.items]
    if isinstance(block, Code):
        ticks = max((len(run) for run in re.findall("`+", block.text)), default=0)
        fence = "`" * max(3, ticks + 1)  # longer than any run of backticks in the code
        return [f"{fence}{block.language}", *block.text.rstrip("\n").split("\n"), fence]
    raise TypeError(f"no Markdown for {block!r}")


def _table(table: Table) -> list[str]:
    return [
        "| " + " | ".join(table.header) + " |",
        "|" + "|".join("---" for _ in table.header) + "|",
        *("| " + " | ".join(_inline(cell, True) for cell in row) + " |" for row in table.rows),
    ]


def _inline(spans: Inline, cell: bool = False) -> str:
    """Spans as Markdown; in a table ``cell`` on one line, pipes escaped."""
    words = []
    for span in spans:
        said = _cell(span.text) if cell else span.text
        words.append(f"`{said}`" if span.style == "code" else f"**{said}**" if span.style else said)
    return "".join(words).strip() if cell else "".join(words)


def _cell(text: str) -> str:
    """Text safe inside a table cell: no pipes, no line breaks."""
    return re.sub(r"\s+", " ", text.replace("|", "\\|"))
