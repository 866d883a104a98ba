"""One place that turns exceptions into the one-line messages the CLI prints."""

from __future__ import annotations

from modelport.errors import ModelportError


def describe(exc: BaseException) -> str | None:
    """A one-line message for errors users can act on; None for bugs (they re-raise)."""
    if isinstance(exc, ModelportError):
        return str(exc)
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}"
    if isinstance(exc, IsADirectoryError):
        return f"expected a file, got a directory: {exc.filename}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    if isinstance(exc, (RecursionError, MemoryError)):
        return f"the file is too complex to read safely ({type(exc).__name__})"
    return None
