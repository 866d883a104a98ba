"""Formatting shared by the commands: sizes for people, a JSON fallback for machines."""

from __future__ import annotations

from typing import Any


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
