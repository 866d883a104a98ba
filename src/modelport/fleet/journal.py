"""The JSON Lines file a run writes (``--jsonl OUT``): one record per line, appended as each
file finishes, so a crash loses at most the records not yet synced and never a whole run.

- Each record is written with one ``write`` on a descriptor opened ``O_APPEND``, then
  ``fsync``ed in batches (every ``SYNC_RECORDS`` records or ``SYNC_SECONDS`` seconds, and at
  the end): a record is on disk at most a batch after it was written, and the run does not
  wait on the disk for each file.
- A run holds an exclusive ``flock`` on the file, so two runs never interleave their
  records; the second is refused with a message.
- A process killed in the middle of a write leaves a last line without its newline. Opening
  the file cuts that line off (its file is then processed again); a complete line that is not
  a record is skipped and counted, never trusted.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from modelport.errors import UsageError
from modelport.fleet.records import SCHEMA_VERSION, Record

SYNC_RECORDS: Final = 64
SYNC_SECONDS: Final = 2.0


@dataclass(frozen=True)
class Reading:
    """What an existing JSONL file holds: its records in file order, the complete lines that
    were no record of this schema, and the bytes of a cut last line."""

    records: tuple[Record, ...]
    skipped: int
    cut_bytes: int


def read(path: str | Path) -> Reading:
    """The records of a JSONL file; a last line without its newline is left out."""
    with open(path, "rb") as handle:
        return _parse(handle)


def _parse(lines: BinaryIO) -> Reading:
    records: list[Record] = []
    skipped = cut = 0
    for line in lines:
        if not line.endswith(b"\n"):
            cut = len(line)  # only the last line can lack its newline
            break
        record = _record(line)
        if record is not None:
            records.append(record)
        elif line.strip():
            skipped += 1
    return Reading(tuple(records), skipped, cut)


def _record(line: bytes) -> Record | None:
    try:
        data = json.loads(line.decode("utf-8", "surrogateescape"))
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
            return None
        return Record.from_json(data)
    except (ValueError, KeyError, TypeError):
        return None


class Journal:
    """An open JSONL output: locked, repaired, appended to. Use as a context manager; the
    records already in the file are ``existing``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = -1
        self._unsynced = 0
        self._synced_at = time.monotonic()
        self.existing = Reading((), 0, 0)

    def __enter__(self) -> Journal:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"another modelport run is writing {self.path}; wait for it, or give this "
                "run another --jsonl file"
            ) from None
        self._fd = fd
        with os.fdopen(os.dup(fd), "rb") as lines:
            self.existing = _parse(lines)
        if self.existing.cut_bytes:  # killed mid-write: drop the partial line, redo its file
            os.ftruncate(fd, os.fstat(fd).st_size - self.existing.cut_bytes)
            os.fsync(fd)
        return self

    def write(self, record: Record) -> None:
        """Append one record; sync when the batch is full or old enough."""
        line = record.line()
        written = os.write(self._fd, line)
        while written < len(line):  # a short write (a signal, a full disk): finish the line
            written += os.write(self._fd, line[written:])
        self._unsynced += 1
        now = time.monotonic()
        if self._unsynced >= SYNC_RECORDS or now - self._synced_at >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._fd)
        self._unsynced = 0
        self._synced_at = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        if self._fd < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self._fd)  # closing releases the lock
            self._fd = -1


def latest(records: tuple[Record, ...] | list[Record]) -> Iterator[Record]:
    """The last record of each input (a rerun supersedes what it redid), in file order of
    those last records; an input is its path, and for convert its path and target."""
    last: dict[tuple[str, str | None], Record] = {}
    for record in records:
        last.pop(record.key, None)
        last[record.key] = record
    return iter(last.values())
