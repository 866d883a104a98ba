"""A pool sends quick files to its workers in batches and lets their answers gather: every
file is still answered exactly once when a file behind a batch overruns its time budget or
a worker dies holding a batch, and the queue really does run deeper than one file ahead, but
never past the room in the worker's pipe."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from modelport.fleet import pool
from modelport.fleet.pool import Pool, Task
from modelport.fleet.records import TIMED_OUT, WORKER_DIED, Budget


def quick_tasks(folder: Path, count: int, first: int = 0) -> list[Task]:
    tasks = []
    for i in range(first, first + count):
        path = folder / f"f{i:03d}.npy"
        np.save(path, np.arange(i % 5 + 1))
        tasks.append(Task(i, "scan", str(path), {}))
    return tasks


def deepest_queue(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The longest queue any worker held, as the pool sends tasks."""
    seen = [0]
    send = Pool._send

    def counting(self: Pool, worker: pool._Worker, task: Task) -> None:
        send(self, worker, task)
        seen[0] = max(seen[0], len(worker.queue))

    monkeypatch.setattr(Pool, "_send", counting)
    return seen


def test_a_timeout_behind_a_batch_of_quick_files_is_one_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deepest = deepest_queue(monkeypatch)
    slow = tmp_path / "slow.pkl"
    slow.write_bytes(b"(l" + b"I1\na" * 1_000_000 + b".")  # a second or more to scan
    tasks = [
        *quick_tasks(tmp_path, 30),
        Task(30, "scan", str(slow), {}),
        *quick_tasks(tmp_path, 12, first=31),
    ]
    answered = list(Pool(1, Budget(0.5)).results(tasks))
    assert sorted(task.key for task, _, _ in answered) == list(range(43))
    by_key = {task.key: outcome for task, outcome, _ in answered}
    assert by_key[30].error is not None and by_key[30].error.type == TIMED_OUT
    assert all(by_key[k].error is None for k in by_key if k != 30)
    assert deepest[0] > pool.QUEUE_DEPTH  # the quick files went in batches


def test_a_worker_killed_holding_a_batch_answers_each_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deepest = deepest_queue(monkeypatch)
    tasks = quick_tasks(tmp_path, 60)
    answered = []
    killed = 0
    for task, outcome, pid in Pool(1, Budget(60.0)).results(tasks):
        answered.append((task, outcome))
        if len(answered) == 25:
            killed = pid
            os.kill(pid, signal.SIGKILL)
    keys = Counter(task.key for task, _ in answered)
    assert sorted(keys) == list(range(60)) and set(keys.values()) == {1}
    died = [outcome for _, outcome in answered if outcome.error is not None]
    assert all(outcome.error.type == WORKER_DIED for outcome in died if outcome.error)
    assert len(died) <= 1 and killed
    assert deepest[0] > pool.QUEUE_DEPTH


def test_a_worker_is_never_sent_more_task_bytes_than_its_pipe_has_room_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quick files with long task lines: the queue stops at ``PIPE_ROOM`` bytes, well short
    of ``FAST_DEPTH`` files, so a write to a worker never waits for it to read."""
    queued = [0]
    send = Pool._send

    def counting(self: Pool, worker: pool._Worker, task: Task) -> None:
        send(self, worker, task)
        lines = [
            json.dumps({"command": t.command, "path": t.path, "options": t.options})
            for t in list(worker.queue)[1:]
        ]
        queued[0] = max(queued[0], sum(len(line) + 1 for line in lines))

    monkeypatch.setattr(Pool, "_send", counting)
    padding = {"note": "x" * 4000}  # an option scan does not read: each line about 4 KB
    tasks = [Task(t.key, t.command, t.path, padding) for t in quick_tasks(tmp_path, 40)]
    answered = list(Pool(1, Budget(60.0)).results(tasks))
    assert sorted(task.key for task, _, _ in answered) == list(range(40))
    assert all(outcome.error is None for _, outcome, _ in answered)
    assert 0 < queued[0] <= pool.PIPE_ROOM
