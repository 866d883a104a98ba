"""One JSON Lines record per input file: what a fleet run writes, resumes from and summarises.

The record format is versioned by ``SCHEMA_VERSION`` (the ``schema`` key of every record) and
described field by field in ``docs/fleet-record.schema.json``; a change to a field's meaning
or a removed field is a new version, a new optional field is not. Readers skip records of a
version they do not know instead of guessing.

A record says which file it is about twice over: by ``path`` (as the run listed it) and by
``Identity`` (size, mtime, device, inode: the identity the never-lose-a-byte pinning uses), so
a rerun can tell a file it has judged from one renamed over it or written in place since.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from modelport._version import __version__
from modelport.errors import ModelportError
from modelport.transfer import remote

SCHEMA_VERSION: Final = 1
# The scanner's rules change only with modelport's code for now, so its version stands for
# them; records carry both so that rules versioned apart later need no new schema.
RULES_VERSION: Final = __version__
COMMANDS: Final = ("scan", "hash", "inspect", "convert")
Status = Literal["ok", "error", "timeout"]
# Error types the parent gives a file whose worker did not answer for it.
WORKER_DIED: Final = "WorkerDied"
TIMED_OUT: Final = "Timeout"
# Options of ``convert`` that change how an output is written, never what it holds: a rerun
# that adds ``--overwrite`` leaves alone the outputs that stand.
NO_EFFECT_ON_OUTPUT: Final = ("overwrite", "fsync")


@dataclass(frozen=True)
class Identity:
    """Which bytes a record speaks for. A folder (a Hugging Face model directory) counts its
    files: the sum of their sizes and the latest of their mtimes, under the folder's own
    device and inode, so a shard rewritten in place changes it. An object behind a URL has
    no device or inode (both 0): its store's ``version`` (an ETag, a generation) and its
    modification time stand for them."""

    size: int
    mtime_ns: int
    device: int
    inode: int
    version: str = ""

    @classmethod
    def of(cls, path: str | Path) -> Identity | None:
        """The identity of what ``path`` names now (links followed, as readers follow
        them); None when it cannot be read, which no record ever matches. For a URL this
        asks the store (one metadata request); an object whose store gives neither a
        version nor a modification time has none, and is read again by every run."""
        if remote.is_url(path):
            return cls._of_object(str(path))
        try:
            info = Path(path).stat()
            if not stat.S_ISDIR(info.st_mode):
                return cls(info.st_size, info.st_mtime_ns, info.st_dev, info.st_ino)
            size, latest = 0, info.st_mtime_ns
            for folder, _, names in os.walk(path):
                for name in names:
                    inner = (Path(folder) / name).stat()
                    size += inner.st_size
                    latest = max(latest, inner.st_mtime_ns)
            return cls(size, latest, info.st_dev, info.st_ino)
        except OSError:
            return None

    @classmethod
    def _of_object(cls, url: str) -> Identity | None:
        try:
            return cls.of_object(remote.RemoteObject.open(url))
        except (ModelportError, OSError):
            return None

    @classmethod
    def of_object(cls, found: remote.RemoteObject) -> Identity | None:
        """The identity of an object looked up already."""
        if not (found.version or found.modified_ns):
            return None
        return cls(found.size, found.modified_ns, 0, 0, found.version)


@dataclass(frozen=True)
class Failure:
    """Why a file has no result: the exception's type name (or ``WorkerDied`` /
    ``Timeout`` when its worker never answered) and a one-line message for people."""

    type: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """One file's answer from a worker (what crosses the pipe); the parent makes it a
    ``Record`` with what it knows (the index, the options, the budget)."""

    identity: Identity | None
    format: str = ""
    result: Any = None
    error: Failure | None = None
    warnings: tuple[str, ...] = ()
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        identity = self.identity
        return {
            "identity": [
                identity.size,
                identity.mtime_ns,
                identity.device,
                identity.inode,
                identity.version,
            ]
            if identity
            else None,
            "format": self.format,
            "result": self.result,
            "error": [self.error.type, self.error.message] if self.error else None,
            "warnings": list(self.warnings),
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        identity, error = data["identity"], data["error"]
        return cls(
            identity=Identity(*identity) if identity else None,
            format=data["format"],
            result=data["result"],
            error=Failure(*error) if error else None,
            warnings=tuple(data["warnings"]),
            duration_s=data["duration_s"],
        )


@dataclass(frozen=True)
class Budget:
    """What one file may cost its worker: wall seconds, and address space in bytes
    (``RLIMIT_AS``; None for no limit). Kept in each record, so that a rerun with a larger
    budget retries the files that ran out of this one."""

    timeout_s: float
    max_memory: int | None = None

    def covers(self, other: Budget) -> bool:
        """Whether this budget is at least ``other`` in time and in memory."""
        memory_ok = self.max_memory is None or (
            other.max_memory is not None and self.max_memory >= other.max_memory
        )
        return self.timeout_s >= other.timeout_s and memory_ok


@dataclass(frozen=True)
class Record:
    """One input's outcome. ``status`` is ``ok`` when the command ran to its end on the file
    (a scan that judges a file ``error`` or ``unsafe`` is still ``ok``), ``error`` when it
    raised or its worker died, ``timeout`` when the file overran its time budget. ``result``
    is the command's own JSON for the file: ``FileReport.to_json()`` for scan,
    ``HashReport.to_json()`` for hash, ``InspectReport.to_json()`` for inspect. ``options``
    holds what changes the result besides the file (``--allow-unsafe``, a folder scan's
    context); ``index`` is the input's place in the run's list, which orders the summary.
    ``sha256`` is the file's content digest where the run computed one (``--dedupe``), and
    ``deduplicated_from`` the path whose result this record copies (the same bytes under the
    same name, judged once). ``target`` is the output a command that writes one (convert)
    wrote for this input: its ``result`` holds the output's identity as written."""

    command: str
    path: str
    index: int
    identity: Identity | None
    status: Status
    format: str = ""
    error: Failure | None = None
    result: Any = None
    warnings: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    budget: Budget = Budget(0.0)
    duration_s: float = 0.0
    worker: int = 0
    finished: float = 0.0
    modelport_version: str = __version__
    rules_version: str = RULES_VERSION
    schema: int = SCHEMA_VERSION
    sha256: str | None = None
    deduplicated_from: str | None = None
    target: str | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        """What an output holds one standing record for: the input, and the output it was
        written to (one source may be converted to several targets)."""
        return self.path, self.target

    def to_json(self) -> dict[str, Any]:
        identity = self.identity
        optional = {
            "version": identity.version if identity and identity.version else None,
            "sha256": self.sha256,
            "deduplicated_from": self.deduplicated_from,
            "target": self.target,
        }
        return {
            "schema": self.schema,
            "command": self.command,
            "path": self.path,
            "index": self.index,
            "size": identity.size if identity else None,
            "mtime_ns": identity.mtime_ns if identity else None,
            "device": identity.device if identity else None,
            "inode": identity.inode if identity else None,
            "format": self.format,
            "status": self.status,
            "error": {"type": self.error.type, "message": self.error.message}
            if self.error
            else None,
            "duration_s": round(self.duration_s, 6),
            "worker": self.worker,
            "finished": self.finished,
            "modelport_version": self.modelport_version,
            "rules_version": self.rules_version,
            "options": self.options,
            "budget": {"timeout_s": self.budget.timeout_s, "max_memory": self.budget.max_memory},
            "warnings": list(self.warnings),
            "result": self.result,
            **{key: value for key, value in optional.items() if value is not None},
        }

    def line(self) -> bytes:
        """The record as one line of JSON Lines, newline included."""
        text = json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8", "surrogateescape") + b"\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        """A record read back; raises KeyError, TypeError or ValueError on a malformed one."""
        sizes = (data["size"], data["mtime_ns"], data["device"], data["inode"])
        error = data["error"]
        budget = data["budget"]
        return cls(
            command=str(data["command"]),
            path=str(data["path"]),
            index=int(data["index"]),
            identity=_identity(sizes, data.get("version", "")),
            status=_status(data["status"]),
            format=str(data["format"]),
            error=Failure(str(error["type"]), str(error["message"])) if error else None,
            result=data["result"],
            warnings=tuple(str(w) for w in data["warnings"]),
            options=dict(data["options"]),
            budget=Budget(float(budget["timeout_s"]), budget["max_memory"]),
            duration_s=float(data["duration_s"]),
            worker=int(data["worker"]),
            finished=float(data["finished"]),
            modelport_version=str(data["modelport_version"]),
            rules_version=str(data["rules_version"]),
            schema=int(data["schema"]),
            sha256=_optional_text(data.get("sha256")),
            deduplicated_from=_optional_text(data.get("deduplicated_from")),
            target=_optional_text(data.get("target")),
        )

    def answers(
        self, command: str, identity: Identity | None, options: dict[str, Any], budget: Budget
    ) -> bool:
        """Whether this record still stands for the file a run is about to process: the same
        command, options and bytes, judged by this modelport and these rules; a file that ran
        out of time or memory is retried under a larger budget. A conversion stands only
        while it succeeded and its output is still the one it wrote; a failed one is retried."""
        if (
            identity is None
            or self.identity != identity
            or self.schema != SCHEMA_VERSION
            or self.command != command
            or _compared(self.options) != _compared(options)
            or self.modelport_version != __version__
            or self.rules_version != RULES_VERSION
        ):
            return False
        if self.target is not None:
            return self.status == "ok" and self._output_stands(self.target)
        ran_out = self.status == "timeout" or (
            self.error is not None and self.error.type in (WORKER_DIED, "MemoryError")
        )
        return not ran_out or self.budget.covers(budget)

    def _output_stands(self, target: str) -> bool:
        """Whether ``target`` is what this record's conversion wrote (a dry run wrote
        nothing: it stands while nothing is there)."""
        result = self.result if isinstance(self.result, dict) else {}
        written = result.get("target_identity")
        now = Identity.of(target)
        if not isinstance(written, dict) or now is None:
            return written is None and now is None
        try:
            return Identity(**written) == now
        except TypeError:  # not a record this code wrote: redo rather than trust it
            return False


def _compared(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in NO_EFFECT_ON_OUTPUT}


def plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists, keys as strings), so that options
    compare equal to the ones read from an earlier run's records."""
    return json.loads(json.dumps(value))


def is_plain(value: Any) -> bool:
    """Whether ``value`` is what ``plain`` would give back already: checking costs a run a
    fraction of what a round trip through JSON for each of its files does."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(is_plain(item) for item in value)
    if kind is dict:
        return all(type(key) is str and is_plain(item) for key, item in value.items())
    return False


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _identity(sizes: tuple[Any, ...], version: Any) -> Identity | None:
    if None in sizes:
        return None
    size, mtime_ns, device, inode = map(int, sizes)
    return Identity(size, mtime_ns, device, inode, str(version))


def _status(value: Any) -> Status:
    if value == "ok":
        return "ok"
    if value == "error":
        return "error"
    if value == "timeout":
        return "timeout"
    raise ValueError(f"unknown status {value!r}")
