"""The verification part of the page ``export --report FILE.html`` and ``rebuild --report
FILE.html`` write: the facts of ``reporting.verification`` (the ones their Markdown report
shows) as HTML. A number's cell keeps its exact value in ``data-value``, beside the rounded
text, so a tool reading the page needs no second parse of the JSON block."""

from __future__ import annotations

from modelport.reporting.html_parts import kv_table, text
from modelport.reporting.verification import (
    Block,
    Bullets,
    Code,
    Inline,
    Paragraph,
    Table,
    Verification,
)

SECTION_ID = "verification"


def section(facts: Verification) -> str:
    parts = [
        f"<section id={SECTION_ID}><h2>{text(facts.title)}</h2>",
        kv_table((label, _inline(value)) for label, value in facts.summary),
    ]
    for part in facts.parts:
        parts.append(f"<h3>{text(part.title)}</h3>")
        parts.extend(_block(block) for block in part.blocks)
    parts.append("</section>")
    return "".join(parts)


def _block(block: Block) -> str:
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Paragraph):
        return f"<p>{_inline(block.spans)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Code):
        return f"<pre><code class=language-{text(block.language)}>{text(block.text)}</code></pre>"
    raise TypeError(f"no HTML for {block!r}")


def _table(table: Table) -> str:
    name = f" id={SECTION_ID}-{text(table.name)}" if table.name else ""
    head = "".join(f"<th>{text(title)}</th>" for title in table.header)
    rows = "".join("<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in table.rows)
    return f"<table class=grid{name}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _cell(cell: Inline) -> str:
    values = [span.value for span in cell if span.value is not None]
    if len(values) == 1:
        return f'<td class=num data-value="{text(repr(values[0]))}">{_inline(cell)}</td>'
    return f"<td>{_inline(cell)}</td>"


def _inline(spans: Inline) -> str:
    said = []
    for span in spans:
        shown = text(span.text)
        if span.style == "code":
            shown = f"<code>{shown}</code>"
        elif span.style == "strong":
            shown = f"<strong>{shown}</strong>"
        said.append(shown)
    return "".join(said)
