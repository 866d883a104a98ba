"""One place that turns exceptions into the one-line messages the CLI prints."""

from __future__ import annotations

from modelport.errors import describe

__all__ = ["describe"]
