"""Formatting shared by the commands: sizes for people, a JSON fallback for machines."""

from __future__ import annotations

import sys
from typing import Any

# Piped or redirected, rich would fit tables to 80 columns and cut or fold long tensor names;
# this wide, every line is as long as its content and each name stays whole for grep.
PIPED_WIDTH = 100_000


def console_width(*, wide: bool = False) -> int | None:
    """The width to give rich: None on a terminal (rich fits its width) unless ``wide``
    (``--wide``: every name whole there too), else ``PIPED_WIDTH``."""
    if wide:
        return PIPED_WIDTH
    isatty = getattr(sys.stdout, "isatty", None)
    try:
        return None if isatty is not None and isatty() else PIPED_WIDTH
    except ValueError:  # a closed stream
        return PIPED_WIDTH


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
