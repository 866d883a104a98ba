"""Formatting shared by the commands: sizes for people, a JSON fallback for machines."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO, cast

if TYPE_CHECKING:
    from rich.console import Console

# Piped or redirected, rich would fit tables to 80 columns and cut or fold long tensor names;
# this wide, every line is as long as its content and each name stays whole for grep.
PIPED_WIDTH = 100_000


def people_console(*, wide: bool = False) -> Console:
    """rich's console for a command's tables: fitted to a terminal (``wide``: every name whole
    there too), else ``PIPED_WIDTH`` wide with the spaces rich pads a table's last column
    with trimmed, so piped lines end where their text does."""
    from rich.console import Console

    width = PIPED_WIDTH if wide or not _is_terminal() else None
    trimmed = cast("TextIO", _TrimmedLines(sys.stdout))  # rich only writes and flushes it
    return Console(width=width, file=trimmed if width else None)


def _is_terminal() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)
    try:
        return isatty is not None and bool(isatty())
    except ValueError:  # closed
        return False


class _TrimmedLines:
    """A text stream that writes each whole line to ``out`` without its trailing spaces."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._pending = ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._out.write(line.rstrip(" ") + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._out.write(self._pending.rstrip(" "))
            self._pending = ""
        self._out.flush()

    def isatty(self) -> bool:
        return False


WIDE_HELP = "print every name whole on a terminal too (piped output always does)"


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


def json_default(value: Any) -> Any:
    """JSON for the odd values a report may carry (sets, bytes, records)."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": len(value)}
    return repr(value)
