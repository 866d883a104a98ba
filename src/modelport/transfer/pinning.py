"""An input's identity, pinned for a whole run: the scan, the copy and the verification
must all speak for the same bytes. A path is reopened in each phase (readers map files,
verification reads them again), so instead of trusting the path the identity of every
file behind it (device, inode, size, modification and change times) is taken at the start
and checked at the end of each phase; a file rewritten in place or replaced by a rename
changes at least one of them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from modelport import limits
from modelport.errors import SourceChangedError

Identity = tuple[int, int, int, int, int]


def _identity(path: Path) -> Identity:
    info = path.stat()
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass(frozen=True)
class SourcePin:
    """The files of one input (a file, or every file of a folder) as they were pinned."""

    root: Path
    files: tuple[tuple[Path, Identity], ...]

    @classmethod
    def of(cls, path: Path) -> SourcePin:
        if not path.is_dir():
            return cls(path, ((path, _identity(path)),))
        found = []
        for folder, _, names in os.walk(path):
            for name in sorted(names):
                file = Path(folder) / name
                if file.is_file():
                    found.append((file, _identity(file)))
                if len(found) > limits.MAX_SCANNED_FILES:
                    break
        return cls(path, tuple(found))

    def check(self, phase: str) -> None:
        """Raise when any pinned file is gone or no longer the one pinned."""
        for file, pinned in self.files:
            try:
                now = _identity(file)
            except OSError:
                now = None
            if now != pinned:
                what = "is gone" if now is None else _difference(pinned, now)
                raise SourceChangedError(
                    f"{file.name} changed while it was being {phase} ({what}); nothing was "
                    "written: run again once the file is no longer being written",
                    path=self.root,
                )


def _difference(pinned: Identity, now: Identity) -> str:
    if pinned[:2] != now[:2]:
        return "another file was put in its place"
    if pinned[2] != now[2]:
        return f"its size went from {pinned[2]:,} to {now[2]:,} bytes"
    return "it was written to"
