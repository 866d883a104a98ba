"""The parts of the page about the model a file's weights belong to: the folder's
``config.json`` (in the structure section, collapsed, as the file writes it) and, with
``report --model``, whether the weights fit that model, as ``check`` answers it.

Names and text from the files go through ``text`` like everything else on the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from modelport.reporting.html_parts import MAX_ITEMS, count, human_bytes, more, text
from modelport.reporting.model_report import MAX_CONFIG_TEXT, ConfigFile
from modelport.torch_models.checking import CheckReport

MAX_NAMES: Final = MAX_ITEMS  # names listed per group before "... and N more"


def config_part(config: ConfigFile) -> str:
    """``config.json`` in a ``<details>``: closed, as it is long and the tree comes first."""
    note = ""
    if config.truncated:
        note = (
            f"<p class=dim>the first {count(MAX_CONFIG_TEXT)} bytes of {count(config.size)} "
            f"shown; the whole file is {text(config.path)}</p>"
        )
    return (
        "<h3>config.json</h3><details class=config><summary><code>"
        f"{text(config.path)}</code> <span class=dim>{human_bytes(config.size)}</span>"
        f"</summary>{note}<pre>{text(config.text)}</pre></details>"
    )


def fit_section(fit: CheckReport, model: str, index: int, suffix: str) -> str:
    """Whether the weights load into ``model`` with ``load_state_dict(strict=True)``: the
    verdict, the keys on one side only, the shapes that differ, the likely causes."""
    mark = "fits" if fit.ok else "misfit"
    parts = [
        f"<section id=fit-{index}><h2>Fit{suffix}</h2>",
        f"<p>Model <code>{text(model)}</code>: <span class='verdict {mark}'>"
        f"{'fits' if fit.ok else 'does not fit'}</span> "
        f"{text(fit.lines()[0].partition(': ')[2])}</p>",
        _names("Missing (in the model, not in the file)", fit.missing),
        _names("Unexpected (in the file, not in the model)", fit.unexpected),
    ]
    if fit.mismatched:
        rows = "".join(
            f"<tr><td><code>{text(name)}</code></td><td class=num>{text(list(expected))}</td>"
            f"<td class=num>{text(list(got))}</td></tr>"
            for name, expected, got in fit.mismatched[:MAX_NAMES]
        )
        parts.append(
            "<h3>Shapes that differ</h3><table class=grid id=fit-mismatched-"
            f"{index}><thead><tr><th>name</th><th>the model expects</th><th>the file has</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>{more(len(fit.mismatched) - MAX_NAMES)}"
        )
    if fit.suggestions:
        items = "".join(
            f"<li>{text(s.cause)}"
            + (f"<br>fix: <code>{text(s.command)}</code>" if s.command else "")
            + "</li>"
            for s in fit.suggestions
        )
        parts.append(f"<h3>Likely causes</h3><ul>{items}</ul>")
    if fit.notes:
        parts.append("<ul>" + "".join(f"<li>{text(n)}</li>" for n in fit.notes) + "</ul>")
    parts.append("</section>")
    return "".join(parts)


def _names(title: str, names: Sequence[str]) -> str:
    if not names:
        return ""
    items = "".join(f"<li><code>{text(n)}</code></li>" for n in names[:MAX_NAMES])
    return f"<h3>{text(title)}: {count(len(names))}</h3><ul>{items}</ul>" + more(
        len(names) - MAX_NAMES
    )
