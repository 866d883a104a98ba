"""Markdown for text that came from a model file: tensor names, metadata, scanner messages.

A card is read on the hub and in editors, so nothing from a file may start a heading, close a
table cell or a code block, or become HTML: file text goes into code spans sized to its
backticks, or is escaped character by character; tables and lists are one line per entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

_SPECIAL: Final = re.compile(r"([\\`*_{}\[\]<>|~&#!])")
_BACKTICKS: Final = re.compile(r"`+")
_LINE_BREAKS: Final = re.compile(r"[\r\n\u2028\u2029\x00-\x1f]+")
# a pipe not yet escaped: after an even run of backslashes (none, or escaped backslashes)
_BARE_PIPE: Final = re.compile(r"(?<!\\)((?:\\\\)*)\|")


def clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: str, limit: int = 200) -> str:
    return clipped(_LINE_BREAKS.sub(" ", text), limit)


def escaped(text: str, limit: int = 400) -> str:
    """Plain text with every character Markdown gives a meaning escaped."""
    return _SPECIAL.sub(r"\\\1", one_line(text, limit))


def code(text: str, limit: int = 200) -> str:
    """A code span holding ``text`` as it is (on one line, clipped)."""
    text = one_line(text, limit)
    fence = "`" * (max((len(m) for m in _BACKTICKS.findall(text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cell(markdown: str) -> str:
    """Markdown made fit for a table cell: a pipe, even in a code span, must be escaped
    (once: ``escaped`` text has its pipes escaped already)."""
    return _BARE_PIPE.sub(r"\1\\|", markdown)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of Markdown cells (each already escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def fenced(source: str, language: str = "python") -> str:
    """A fenced code block whose fence no line of ``source`` can close."""
    longest = max((len(m) for m in _BACKTICKS.findall(source)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{source.rstrip()}\n{fence}\n"


def value_text(value: Any, limit: int = 100) -> str:
    """A short rendering of a value read from a file, as a code span."""
    text = value if isinstance(value, str) else json.dumps(value, default=_fallback)
    return code(text, limit)


def _fallback(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return repr(value)


def count(value: int) -> str:
    return f"{value:,}"
