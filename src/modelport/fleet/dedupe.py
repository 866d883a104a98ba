"""``--dedupe``: the same bytes under the same name judged once.

A run with ``--dedupe`` reads every file it is about to process once more, to take its
sha256 (streamed, 1 MiB at a time, on ``--jobs`` threads), and keys it by that digest, its
file name and the run's options for it. An object behind a URL is not read for this: it is
keyed by the digest its store keeps of its bytes (S3's ETag, GCS's MD5, a Hugging Face
file's sha256; ``transfer.remote``), one metadata request, and runs as itself where the
store keeps none. The first file of each key runs; each other one gets
a record copied from the first's: its own path, index, size, mtime, device and inode, the
first's result with the first's path replaced by its own, and ``deduplicated_from`` naming
the first. Every record of the run carries the ``sha256`` when one was taken or the store
gave one.

The name is part of the key because a few readers take something from it (a ``.npy``'s
tensor is named after the file; a ``.py`` or ``.jinja`` file is judged as code), so the same
bytes under another name may give another result. On a model hub the same blob mostly sits
under the same name in many repositories (``pytorch_model.bin``, ``model.safetensors``),
which is the case this is for. A file's neighbours (an ONNX file's external data, the
shards beside a TensorFlow index) are not part of the key: a copy is judged as its first was.

Only regular files are keyed; a model folder, a file that cannot be read, or one that
changes while it is hashed runs as itself.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelport.errors import ModelportError
from modelport.fleet.inputs import Input
from modelport.fleet.pool import Task
from modelport.fleet.records import Failure, Identity, Record
from modelport.transfer import remote
from modelport.transfer.hashing import sha256_of


@dataclass(frozen=True)
class Content:
    """What a file's bytes are known by: ``key`` groups equal bytes (``sha256=`` and the
    digest taken here, or a store's own digest), ``identity`` is what the file was both
    before and after hashing, ``sha256`` the digest where one is known."""

    key: str
    identity: Identity
    sha256: str | None


@dataclass(frozen=True)
class Groups:
    """The tasks of a run, keyed: ``leaders`` run; ``followers[key]`` are the tasks whose
    records copy the record of the leader ``key``; ``contents`` holds every digest taken."""

    leaders: tuple[Task, ...]
    followers: dict[int, tuple[Task, ...]] = field(default_factory=dict)
    contents: dict[int, Content] = field(default_factory=dict)

    @classmethod
    def of(cls, tasks: Iterable[Task], threads: int) -> Groups:
        """``tasks`` grouped by content, name and options, each group led by its first."""
        tasks = list(tasks)
        with ThreadPoolExecutor(max(1, threads)) as hashing:  # hashlib drops the GIL
            found = list(hashing.map(lambda task: content_of(task.path), tasks))
        leaders: list[Task] = []
        leader_of: dict[tuple[str, str, str], int] = {}
        followers: dict[int, list[Task]] = {}
        contents: dict[int, Content] = {}
        for task, content in zip(tasks, found, strict=True):
            if content is None:
                leaders.append(task)
                continue
            contents[task.key] = content
            key = (content.key, Path(task.path).name, _canonical(task.options))
            first = leader_of.setdefault(key, task.key)
            if first == task.key:
                leaders.append(task)
            else:
                followers.setdefault(first, []).append(task)
        return cls(tuple(leaders), {k: tuple(v) for k, v in followers.items()}, contents)

    @classmethod
    def none(cls, tasks: Iterable[Task]) -> Groups:
        """Every task its own leader: a run without ``--dedupe``."""
        return cls(tuple(tasks))

    def sha256(self, key: int) -> str | None:
        content = self.contents.get(key)
        return content.sha256 if content else None


def content_of(path: str) -> Content | None:
    """The sha256 of a regular file that stayed the same while it was read, or the digest a
    store keeps of an object; else None."""
    if remote.is_url(path):
        return _stored_content(path)
    before = Identity.of(path)
    try:
        if before is None or not stat.S_ISREG(Path(path).stat().st_mode):
            return None
        digest = sha256_of(path)
    except OSError:
        return None
    return Content(f"sha256={digest}", before, digest) if Identity.of(path) == before else None


def _stored_content(url: str) -> Content | None:
    try:
        found = remote.RemoteObject.open(url)
    except (ModelportError, OSError):
        return None
    identity = Identity.of_object(found)
    if identity is None or not found.digest:
        return None
    kind, _, value = found.digest.partition("=")
    return Content(found.digest, identity, value if kind == "sha256" else None)


def copied(first: Record, item: Input, content: Content, expected: Content | None) -> Record:
    """``item``'s record from ``first``'s, the record of the same bytes under the same name.
    ``expected`` is what hashing saw of the first file: if the first was no longer those
    bytes when it was read, its result says nothing about ``item``, which then gets an error
    record (and is read by the next run)."""
    own = replace(
        first,
        path=item.path,
        index=item.index,
        identity=content.identity,
        sha256=content.sha256,
        finished=round(time.time(), 3),
    )
    if expected is None or first.identity != expected.identity:
        message = (
            f"{item.path}: {first.path}, which held the same bytes, changed before it was "
            "read; this file will be read by the next run"
        )
        failure = Failure("SourceChangedError", message)
        return replace(own, status="error", format="", error=failure, result=None)
    swap = _Renaming(first.path, item.path)
    error = first.error
    return replace(
        own,
        error=Failure(error.type, swap(error.message)) if error else None,
        result=swap(first.result),
        warnings=tuple(swap(w) for w in first.warnings),
        duration_s=0.0,
        deduplicated_from=first.path,
    )


class _Renaming:
    """Replaces one path by another in every string of a JSON value: a result names its
    file (``path``, and messages that begin with it)."""

    def __init__(self, old: str, new: str) -> None:
        self._pairs = [(old, new)]
        if str(Path(old)) != old:  # messages name the file as Path(...) prints it
            self._pairs.append((str(Path(old)), str(Path(new))))

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            for old, new in self._pairs:
                value = value.replace(old, new)
            return value
        if isinstance(value, dict):
            return {key: self(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self(item) for item in value]
        return value


def _canonical(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True)
