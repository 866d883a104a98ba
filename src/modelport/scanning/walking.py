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
    """The folder's files, in name order, as ``os.walk`` finds them top down (links to
    folders not entered). A plain file's real path is its folder's plus its name, so only
    the links are resolved: a folder of plain files costs one listing each, no call per file."""
    base = root.resolve()
    files: list[Path] = []
    outside: dict[Path, Path] = {}
    dangling: list[Path] = []
    seen: set[Path] = set()
    folders = [(root, base)]  # to list: each as reached, and resolved
    while folders:
        here, real_here = folders.pop()
        listing = _listing(here)
        if listing is None:
            continue  # unreadable, as os.walk skips it
        names, dirs = listing
        for entry in [*names, *(d for d in dirs if d.is_symlink())]:
            path = here / entry.name
            plain = _plain_file(entry)
            real = real_here / entry.name if plain else _resolved(path)
            if real is None:
                dangling.append(path)
                continue
            if real in seen or not (plain or real.is_file()):
                continue  # a second path to one file, or a link to a folder
            seen.add(real)
            files.append(path)
            if entry.is_symlink() and not real.is_relative_to(base):
                outside[path] = real
        inner = [(here / d.name, real_here / d.name) for d in dirs if not d.is_symlink()]
        folders.extend(reversed(inner))
    files.sort()
    truncated = len(files) > limits.MAX_SCANNED_FILES
    return Walk(tuple(files[: limits.MAX_SCANNED_FILES]), outside, tuple(dangling), truncated)


def _listing(folder: Path) -> tuple[list[os.DirEntry[str]], list[os.DirEntry[str]]] | None:
    """A folder's entries that are not folders and those that are (links followed, as
    ``os.walk`` sorts them), each in name order; None when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            listed = sorted(entries, key=lambda entry: entry.name)
    except OSError:
        return None
    names: list[os.DirEntry[str]] = []
    dirs: list[os.DirEntry[str]] = []
    for entry in listed:
        (dirs if _is_dir(entry) else names).append(entry)
    return names, dirs


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _plain_file(entry: os.DirEntry[str]) -> bool:
    """A regular file that is no link: its real path needs no resolving."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
