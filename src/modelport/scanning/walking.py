"""Which files a folder scan judges. A Hugging Face cache snapshot is a folder of symbolic
links into ``blobs/``: links that stay inside the scanned tree are followed to the files
they name (each judged once, under the link's path); links that leave it, or lead
nowhere, are reported, never followed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from modelport import limits


@dataclass(frozen=True)
class Walk:
    files: tuple[Path, ...]
    escaping_links: tuple[tuple[Path, Path | None], ...]  # (link, its target or None)
    truncated: bool


def walk(root: Path) -> Walk:
    base = root.resolve()
    files: list[Path] = []
    escaping: list[tuple[Path, Path | None]] = []
    seen: set[Path] = set()
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        here = Path(folder)
        for name in [*sorted(names), *(d for d in dirs if (here / d).is_symlink())]:
            path = here / name
            target = _inside(path, base)
            if path.is_symlink() and target is None:
                escaping.append((path, _resolved(path)))
                continue
            real = target if target is not None else path.resolve()
            if real in seen or not real.is_file():
                continue  # a second link to one file, or a link to a folder (walked as such)
            seen.add(real)
            files.append(path)
    files.sort()
    truncated = len(files) > limits.MAX_SCANNED_FILES
    return Walk(tuple(files[: limits.MAX_SCANNED_FILES]), tuple(escaping), truncated)


def _inside(path: Path, base: Path) -> Path | None:
    """A link's final target when it stays under ``base``; None for a link leaving it."""
    if not path.is_symlink():
        return path.resolve()
    resolved = _resolved(path)
    if resolved is None or not resolved.is_relative_to(base):
        return None
    return resolved


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
