"""Which files a folder scan judges. A Hugging Face cache snapshot is a folder of symbolic
links into ``../../blobs/``: every link to a file is followed, since the loader reads its
target, and each file is judged once, under the first path that reaches it. Links that
leave the scanned folder are reported as such; links that lead nowhere are errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from modelport import limits


@dataclass(frozen=True)
class Walk:
    files: tuple[Path, ...]
    outside: dict[Path, Path]  # link among ``files`` -> its target outside the folder
    dangling: tuple[Path, ...]
    truncated: bool


def walk(root: Path) -> Walk:
    base = root.resolve()
    files: list[Path] = []
    outside: dict[Path, Path] = {}
    dangling: list[Path] = []
    seen: set[Path] = set()
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        here = Path(folder)
        for name in [*sorted(names), *(d for d in dirs if (here / d).is_symlink())]:
            path = here / name
            real = _resolved(path)
            if real is None:
                dangling.append(path)
                continue
            if real in seen or not real.is_file():
                continue  # a second path to one file, or a link to a folder
            seen.add(real)
            files.append(path)
            if path.is_symlink() and not real.is_relative_to(base):
                outside[path] = real
    files.sort()
    truncated = len(files) > limits.MAX_SCANNED_FILES
    return Walk(tuple(files[: limits.MAX_SCANNED_FILES]), outside, tuple(dangling), truncated)


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
