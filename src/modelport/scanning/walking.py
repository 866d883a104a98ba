"""Which files a folder scan judges. A Hugging Face cache snapshot is a folder of symbolic
links into ``../../blobs/``: every link to a file is followed, since the loader reads its
target, and each file is read once, under the first path that reaches it; the other paths
that reach it go with it (``aliases``), since a loader may read it under any of them and
some rules depend on the name (``model_index.json``, ``.py``, ``.jinja``). A link to a
folder is entered too (a pipeline's ``unet/`` may be one, and its loader reads what is
under it), each real folder once, so links that loop end. Files whose real path leaves the
scanned folder are reported as such; links that lead nowhere are errors. A walk stops once
it holds more than ``limits.MAX_SCANNED_FILES`` paths to files."""

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
    aliases: dict[Path, tuple[Path, ...]]  # one of ``files`` -> the other paths to it


@dataclass(frozen=True)
class Found:
    """A ``Walk`` spelled in strings, each as ``str`` gives its ``Path``: a walk of thousands
    of files (a fleet run's inputs) then costs no path object per file."""

    files: tuple[str, ...]
    outside: dict[str, str]  # link among ``files`` -> its target outside the folder
    dangling: tuple[str, ...]
    truncated: bool
    aliases: dict[str, tuple[str, ...]]  # one of ``files`` -> the other paths to it


def walk(root: Path) -> Walk:
    """The folder's files, in name order, as ``os.walk`` finds them top down (links to
    folders entered, each real folder once)."""
    found = find(root)
    return Walk(
        tuple(map(Path, found.files)),
        {Path(link): Path(target) for link, target in found.outside.items()},
        tuple(map(Path, found.dangling)),
        found.truncated,
        {Path(file): tuple(map(Path, paths)) for file, paths in found.aliases.items()},
    )


def find(root: Path) -> Found:
    """``walk``, in strings. A plain file's real path is its folder's plus its name, so only
    the links are resolved: a folder of plain files costs one listing each, no call per
    file."""
    top = str(root)
    base = os.path.realpath(top)
    files: list[str] = []
    outside: dict[str, str] = {}
    dangling: list[str] = []
    first: dict[str, str] = {}  # real path -> the path of ``files`` that reached it first
    aliases: dict[str, list[str]] = {}
    paths = 0  # to files: each is judged under its name, so each counts
    folders = [(top, base)]  # to list: each as reached, and resolved
    entered = {base}  # resolved folders, each listed once (links may loop)
    while folders and paths <= limits.MAX_SCANNED_FILES:  # a link to / ends, cut short
        here, real_here = folders.pop()
        listing = _listing(here)
        if listing is None:
            continue  # unreadable, as os.walk skips it
        names, dirs = listing
        for entry in [*names, *(d for d in dirs if d.is_symlink())]:
            path = _child(here, entry.name)
            plain = _plain_file(entry)
            real = _child(real_here, entry.name) if plain else _resolved(path)
            if real is None:
                dangling.append(path)
                continue
            if real in first:  # a second path to one file: read once, judged under both names
                aliases.setdefault(first[real], []).append(path)
                paths += 1
                continue
            if not (plain or _target_is_file(entry)):
                continue  # a link to a folder
            first[real] = path
            files.append(path)
            paths += 1
            if not _within(real, base):  # a link, or a file in a linked folder
                outside[path] = real
        # a link to a folder is entered too: a loader reads "unet/model.bin" through it
        inner: list[tuple[str, str]] = []
        for d in dirs:
            real_dir = _folder_real(real_here, d)
            if real_dir is not None and real_dir not in entered:
                entered.add(real_dir)
                inner.append((_child(here, d.name), real_dir))
        folders.extend(reversed(inner))
    files.sort(key=_parts)
    truncated = paths > limits.MAX_SCANNED_FILES
    kept = files[: limits.MAX_SCANNED_FILES]
    named = {file: tuple(aliases[file]) for file in kept if file in aliases} if aliases else {}
    return Found(tuple(kept), outside, tuple(dangling), truncated, named)


def _child(folder: str, name: str) -> str:
    """``str(Path(folder) / name)`` for a folder spelled as ``str`` spells a ``Path``."""
    if folder == ".":
        return name
    return folder + name if folder.endswith("/") else f"{folder}/{name}"


def _parts(path: str) -> list[str]:
    """The order of ``Path`` objects (part by part), which string order is not: ``a/b``
    comes before ``a-c``. Every path of a walk starts with its root, so the parts of the
    root spelled one way or another never meet a different spelling."""
    return path.split("/")


def _within(real: str, base: str) -> bool:
    """Whether the resolved ``real`` lies under the resolved ``base`` (or is it)."""
    return real == base or real.startswith(base if base.endswith("/") else base + "/")


def _listing(folder: str) -> tuple[list[os.DirEntry[str]], list[os.DirEntry[str]]] | None:
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


def _target_is_file(entry: os.DirEntry[str]) -> bool:
    """A link that leads to a regular file (not to a folder)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _folder_real(real_here: str, entry: os.DirEntry[str]) -> str | None:
    return _resolved(entry.path) if entry.is_symlink() else _child(real_here, entry.name)


def _resolved(path: str) -> str | None:
    try:
        return os.path.realpath(path, strict=True)
    except (OSError, RuntimeError):
        return None
