"""From what a user names (paths, folders, lists of paths) to the ordered inputs of a run.

Each input is one path, listed once, in the order named; a folder's files follow in its
walk's order. What a folder means depends on the command:

- ``scan`` judges files, so a folder gives every file under it, exactly as ``scan DIR``
  walks it (``scanning.walking``: links to files followed, each file once, a
  ``torch.distributed.checkpoint``'s byte ranges found), and the folder-level verdicts that
  walk produces (a link leading nowhere, a folder with no file, a walk cut at
  ``limits.MAX_SCANNED_FILES``) become inputs decided without a worker;
- ``hash`` and ``inspect`` read models, and a model may be a folder (a Hugging Face model
  directory, a distributed checkpoint): such a folder is one input; any other folder is
  walked, and each model folder or file found in it is one input.

``--shard i/n`` keeps the inputs whose path hashes to ``i``: every machine lists the same
inputs and keeps its own part, with no coordinator.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from modelport import limits
from modelport.errors import UsageError
from modelport.formats.registry import is_model_folder
from modelport.pickles.symbols import Severity
from modelport.scanning import walking
from modelport.scanning.findings import FileReport, Finding
from modelport.transfer import remote

# The file that marks a torch.distributed.checkpoint (``formats.dcp.METADATA_NAME``): the
# checkpoint reader, whose imports cost a run's start-up more than the walk itself, is
# imported for a folder that holds one.
DCP_METADATA: Final = ".metadata"


@dataclass(frozen=True)
class Input:
    """One path to process. ``context`` is what the command needs besides the path (a
    folder scan's byte ranges and link target); ``decided`` is a scan result known without
    reading the file (a folder-level verdict), written as it is."""

    path: str
    index: int
    context: dict[str, Any] = field(default_factory=dict)
    decided: dict[str, Any] | None = None


@dataclass(frozen=True)
class Shard:
    """Part ``number`` (1 to ``count``) of a run split over ``count`` machines."""

    number: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``i/n`` as ``--shard`` takes it."""
        number, _, count = text.partition("/")
        try:
            shard = cls(int(number), int(count))
        except ValueError:
            raise UsageError(f"--shard takes i/n (e.g. 1/4), not {text!r}") from None
        if not 1 <= shard.number <= shard.count:
            raise UsageError(f"--shard {text}: i must be between 1 and n")
        return shard

    def holds(self, path: str) -> bool:
        """Whether ``path`` falls in this shard: by the sha256 of its UTF-8 bytes, so every
        machine agrees without talking and without knowing the other paths."""
        digest = hashlib.sha256(os.fsencode(path)).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.number - 1


def read_list(source: str) -> list[str]:
    """The paths of a list file, one per line (``-``: standard input); blank lines are
    skipped, nothing else is trimmed, since a path may begin or end with spaces."""
    if source == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with open(source, encoding="utf-8", errors="surrogateescape") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read --from-file {source}: {exc.strerror or exc}") from exc
    return [line for line in lines if line]


def expand(command: str, named: Iterable[str], shard: Shard | None = None) -> list[Input]:
    """The inputs ``named`` gives ``command``, each path once, in order; then this shard's."""
    inputs: list[Input] = []
    seen: set[str] = set()
    for position, (path, context, decided) in enumerate(_expanded(command, named)):
        if path in seen:
            continue
        seen.add(path)
        inputs.append(Input(path, position, context, decided))
    if shard is None:
        return inputs
    return [item for item in inputs if shard.holds(item.path)]


Expanded = tuple[str, dict[str, Any], "dict[str, Any] | None"]


def _expanded(command: str, named: Iterable[str]) -> Iterator[Expanded]:
    for path in named:
        if remote.is_url(path) or not Path(path).is_dir():  # a URL names one object
            yield path, {}, None
        elif command == "scan":
            yield from _scan_folder(Path(path))
        else:
            yield from _model_folders(Path(path))


def _scan_folder(root: Path) -> Iterator[Expanded]:
    """A folder's inputs as ``scan DIR`` judges it (``scanning.scanner.scan``)."""
    walk = walking.find(root)
    segments = {}
    if any(file.rsplit("/", 1)[-1] == DCP_METADATA for file in walk.files):
        dcp = importlib.import_module("modelport.formats.dcp")
        segments = dcp.segments_of([Path(file) for file in walk.files])
    for file in walk.files:
        context: dict[str, Any] = {"in_folder": True}
        ranges = segments.get(Path(file).resolve()) if segments else None  # costs lstats
        if ranges is not None:
            context["segments"] = [list(r) for r in ranges]
        if file in walk.outside:
            context["outside"] = [walk.outside[file], str(root)]
        if file in walk.aliases:
            context["aliases"] = list(walk.aliases[file])
        yield file, context, None
    for link in walk.dangling:
        message = "a symbolic link that leads nowhere"
        yield link, {}, _not_analysed(Path(link), "link", message)
    if walk.truncated:
        message = f"more than {limits.MAX_SCANNED_FILES} files; the rest were not scanned"
        yield str(root), {}, _not_analysed(root, "dir", message)
    if not walk.files and not walk.dangling:
        message = "the folder holds no file: nothing to judge"
        yield str(root), {}, _not_analysed(root, "dir", message)


def _not_analysed(path: Path, kind: str, message: str) -> dict[str, Any]:
    """The report ``scan`` gives a path it cannot judge (``scanning.folders.error_report``)."""
    finding = Finding(Severity.HIGH, "not-analysed", "", message)
    return FileReport(str(path), kind, "error", (finding,)).to_json()


def _model_folders(root: Path) -> Iterator[Expanded]:
    """``root`` as one input if it is a model folder, else each model folder and file under
    it, top down in name order; links to folders are not followed (they may loop)."""
    if _is_model_folder(root):
        yield str(root), {}, None
        return
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        models = [d for d in sorted(dirs) if _is_model_folder(here / d)]
        dirs[:] = sorted(d for d in dirs if d not in models)
        entries = sorted([*names, *models])
        yield from ((str(here / name), {}, None) for name in entries)


def _is_model_folder(path: Path) -> bool:
    try:
        return is_model_folder(path)
    except (OSError, ValueError):
        return False
