"""Where a command's lines for people go: through rich on a terminal (colour, wrapping to its
width), as plain text anywhere else. rich costs a start-up about as long as a small scan
takes, so output that is piped or redirected never imports it.

A line is a sequence of segments, each its text and a rich style ("" for none); the text is
printed as it is, never read as rich markup or emoji codes (a path may hold ``[b]``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

Segment = tuple[str, str]


def wants_rich() -> bool:
    """Whether standard output is a terminal, or the environment says how to treat it
    (``FORCE_COLOR``, ``TTY_COMPATIBLE``, which rich reads: then rich decides)."""
    if os.environ.get("FORCE_COLOR") is not None or os.environ.get("TTY_COMPATIBLE"):
        return True
    isatty = getattr(sys.stdout, "isatty", None)
    try:
        return isatty is not None and bool(isatty())
    except ValueError:  # closed
        return False


def write(lines: Iterable[Sequence[Segment]]) -> None:
    """Lines to standard output, each flushed, so that a long run shows each as it comes."""
    if not wants_rich():
        for line in lines:
            print("".join(text for text, _ in line), flush=True)
        return
    from rich.console import Console
    from rich.text import Text

    console = Console()
    for line in lines:
        console.print(Text.assemble(*line), highlight=False)
