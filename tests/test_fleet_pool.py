"""What keeps a fleet run's start-up and hand-overs off its critical path: a worker near its
last file hands over to a successor started ahead of time, a pool takes the workers started
early for it, and listing a folder imports no checkpoint reader it does not need."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from modelport.fleet import inputs, pool
from modelport.fleet.pool import Pool, Task
from modelport.fleet.records import Budget
from modelport.formats import dcp


def npy_tasks(folder: Path, count: int) -> list[Task]:
    tasks = []
    for i in range(count):
        path = folder / f"f{i:03d}.npy"
        np.save(path, np.arange(i % 5 + 1))
        tasks.append(Task(i, "scan", str(path), {}))
    return tasks


def test_a_worker_near_its_last_file_hands_over_to_a_successor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one job, the successor starts while its predecessor reads its last files and
    begins only when that one is done: every file is answered once, by one worker at a time."""
    monkeypatch.setattr(pool, "TASKS_PER_WORKER", 4)
    monkeypatch.setattr(pool, "SUCCESSOR_LEAD", 2)
    answered = list(Pool(1, Budget(60.0)).results(npy_tasks(tmp_path, 6)))
    assert sorted(task.key for task, _, _ in answered) == list(range(6))
    assert all(outcome.error is None for _, outcome, _ in answered)
    assert sorted(Counter(pid for _, _, pid in answered).values()) == [2, 4]
    runs = [pid for pid, _ in itertools.groupby(pid for _, _, pid in answered)]
    assert len(runs) == 2  # the successor began after its predecessor's last answer


def test_a_pool_takes_the_workers_started_early_for_it(tmp_path: Path) -> None:
    budget = Budget(60.0)
    pool.prestart(2, budget, "scan")
    early = {process.pid for _, _, process in pool._EARLY}
    answered = list(Pool(1, budget).results(npy_tasks(tmp_path, 3)))
    assert {pid for _, _, pid in answered} < early  # one of them, the other let go
    assert pool._EARLY == []


def test_the_walk_knows_a_distributed_checkpoint_by_its_readers_name() -> None:
    """``inputs`` imports the checkpoint reader only for a folder holding this file."""
    assert inputs.DCP_METADATA == dcp.METADATA_NAME
