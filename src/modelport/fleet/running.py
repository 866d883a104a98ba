"""One fleet run: the inputs' records, from an earlier run's output where it still stands for
the file, else from a worker, written to the JSONL output as each finishes and handed to the
caller in the inputs' order (the order a summary prints).

Resuming is matching: an input whose latest record in the output has the same path, command,
options and identity (size, mtime, device, inode), from this modelport and these rules, is
not read again (``Record.answers``; a timeout or an out-of-memory death is retried under a
larger budget). Everything else runs, and its new record supersedes the old one. An input
of ``convert`` is a source with its target (``Record.key``): one source may have several.

The files run on this machine's worker processes (``pool``) or, with a scheduler, on a Dask
cluster (``dask_runner``); with ``dedupe``, a file with the bytes and name of one before it
in the run is not run, and its record copies that one's (``dedupe``). Those two modules (and
the hashing and threads they bring) are imported only by the runs that use them: the parent's
imports come before its workers start, on every run's critical path.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from modelport.fleet.inputs import Input
from modelport.fleet.journal import Journal
from modelport.fleet.pool import Pool, Task
from modelport.fleet.records import (
    TIMED_OUT,
    Budget,
    Identity,
    Outcome,
    Record,
    Status,
    is_plain,
    plain,
)
from modelport.transfer import remote

if TYPE_CHECKING:
    from modelport.fleet.dedupe import Groups


@dataclass(frozen=True)
class Plan:
    """What a run does: ``command`` with ``options`` on ``inputs`` (this shard's), on
    ``jobs`` workers (or the Dask cluster at ``scheduler``) within ``budget``, recording to
    ``jsonl`` when given; ``dedupe`` judges the same bytes under the same name once."""

    command: str
    inputs: tuple[Input, ...]
    budget: Budget
    options: dict[str, Any] = field(default_factory=dict)
    jobs: int = 1
    jsonl: Path | None = None
    scheduler: str | None = None
    dedupe: bool = False


class Executor(Protocol):
    """Where files run: ``Pool`` (this machine) or ``DaskRunner`` (a cluster)."""

    def results(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Outcome, int]]: ...


@dataclass
class Tally:
    """What a run did, for its closing line: records taken over from the output, files
    processed now (of them, copied from a file with the same bytes), and what opening the
    output repaired."""

    reused: int = 0
    processed: int = 0
    deduplicated: int = 0
    cut_bytes: int = 0
    skipped_lines: int = 0


def run(plan: Plan, tally: Tally | None = None) -> Iterator[Record]:
    """Every input's record, in the order of ``plan.inputs``."""
    tally = tally if tally is not None else Tally()
    executor: Executor | None = None
    if plan.scheduler is not None:  # a missing extra or a bad address: before any output
        dask_runner = importlib.import_module("modelport.fleet.dask_runner")
        executor = dask_runner.DaskRunner(plan.scheduler, plan.budget)
    with contextlib.ExitStack() as stack:
        journal = stack.enter_context(Journal(plan.jsonl)) if plan.jsonl else None
        earlier: dict[tuple[str, str | None], Record] = {}
        if journal is not None:
            earlier = {r.key: r for r in journal.existing.records}  # the last one stands
            tally.cut_bytes = journal.existing.cut_bytes
            tally.skipped_lines = journal.existing.skipped
        order = _InOrder()
        tasks: list[Task] = []
        common = plain(plan.options)
        for position, item in enumerate(plan.inputs):
            if is_plain(item.context):
                options = {**common, **item.context}
            else:
                options = plain({**plan.options, **item.context})
            record = earlier.get((item.path, _target(options)))
            if record is not None and record.answers(
                plan.command, Identity.of(item.path), options, plan.budget
            ):
                tally.reused += 1
                yield from order.put(position, record)
            elif item.decided is not None:
                outcome = Outcome(_identity(item.path), item.decided["format"], item.decided)
                decided = _record(plan, item, options, outcome, os.getpid())
                yield from order.put(position, _written(journal, decided, tally))
            else:
                tasks.append(Task(position, plan.command, item.path, options))
        groups: Groups | None = _dedupe().Groups.of(tasks, plan.jobs) if plan.dedupe else None
        leaders = tuple(tasks) if groups is None else groups.leaders
        if executor is None:
            executor = Pool(min(plan.jobs, len(leaders)), plan.budget)
        for task, outcome, pid in executor.results(leaders):
            if outcome.identity is None:  # the worker never answered: what the run sees
                outcome = replace(outcome, identity=_identity(task.path))
            item, digest = plan.inputs[task.key], groups.sha256(task.key) if groups else None
            record = _record(plan, item, task.options, outcome, pid, sha256=digest)
            yield from order.put(task.key, _written(journal, record, tally))
            if groups is None:
                continue
            for follower in groups.followers.get(task.key, ()):
                content = groups.contents[follower.key]
                twin = _dedupe().copied(
                    record, plan.inputs[follower.key], content, groups.contents[task.key]
                )
                tally.deduplicated += 1
                yield from order.put(follower.key, _written(journal, twin, tally))


def _dedupe() -> ModuleType:
    return importlib.import_module("modelport.fleet.dedupe")


def _identity(path: str) -> Identity | None:
    """What ``path`` is now, for a record the run makes itself (a worker takes the identity
    of each file it reads): a file decided without a worker, or one whose worker never
    answered. An object behind a URL would cost a request to its store: it has none."""
    return None if remote.is_url(path) else Identity.of(path)


def _written(journal: Journal | None, record: Record, tally: Tally) -> Record:
    if journal is not None:
        journal.write(record)
    tally.processed += 1
    return record


def _record(
    plan: Plan,
    item: Input,
    options: dict[str, Any],
    outcome: Outcome,
    worker: int,
    *,
    sha256: str | None = None,
) -> Record:
    return Record(
        command=plan.command,
        path=item.path,
        index=item.index,
        identity=outcome.identity,
        status="ok" if outcome.error is None else _failed_status(outcome),
        format=outcome.format,
        error=outcome.error,
        result=outcome.result,
        warnings=outcome.warnings,
        options=options,
        budget=plan.budget,
        duration_s=outcome.duration_s,
        worker=worker,
        finished=round(time.time(), 3),
        target=_target(options),
        sha256=sha256,
    )


def _target(options: dict[str, Any]) -> str | None:
    """The output an input is written to (convert's entries name one)."""
    target = options.get("target")
    return target if isinstance(target, str) else None


def _failed_status(outcome: Outcome) -> Status:
    return "timeout" if outcome.error is not None and outcome.error.type == TIMED_OUT else "error"


class _InOrder:
    """Holds records that finish early until those listed before them are out."""

    def __init__(self) -> None:
        self._next = 0
        self._waiting: dict[int, Record] = {}

    def put(self, position: int, record: Record) -> Iterator[Record]:
        self._waiting[position] = record
        while self._next in self._waiting:
            yield self._waiting.pop(self._next)
            self._next += 1
