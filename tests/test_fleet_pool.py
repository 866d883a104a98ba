"""What keeps a fleet run's start-up and hand-overs off its critical path: a worker near its
last file hands over to a successor started ahead of time, a pool takes the workers started
early for it, listing a folder imports no checkpoint reader it does not need, a scan worker
maps no numpy unless a memory limit is to be set, and neither side imports the machinery of
options it was not given."""

from __future__ import annotations

import itertools
import subprocess
import sys
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


def ready_worker_maps(budget: Budget) -> str:
    """What a scan worker started for ``budget`` has mapped once it says it is ready."""
    process = pool._start(budget, "scan")
    try:
        assert process.stdout is not None
        assert b"ready" in process.stdout.readline()
        return Path(f"/proc/{process.pid}/maps").read_text()
    finally:
        process.kill()
        process.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_a_scan_worker_maps_numpy_only_when_a_memory_limit_is_set() -> None:
    """numpy is most of a worker's start-up and no scan of pickles, torch zips, safetensors
    or npz needs it; under ``--max-memory`` it is mapped before the limit is set, so that the
    limit is checked against it."""
    assert "_multiarray_umath" not in ready_worker_maps(Budget(60.0))
    assert "_multiarray_umath" in ready_worker_maps(Budget(60.0, 4 << 30))


def test_workers_and_the_parent_import_no_machinery_they_do_not_use() -> None:
    """A worker needs no summary, journal or URL dates; a run without ``--dedupe`` or
    ``--scheduler`` imports neither (nor the hashing and threads they bring)."""
    code = (
        "import sys\n"
        "import modelport.fleet.worker\n"
        "print([m for m in ('modelport.fleet.summary', 'modelport.fleet.journal',"
        " 'email.utils') if m in sys.modules])\n"
        "import modelport.cli._fleet\n"
        "print([m for m in ('modelport.fleet.dedupe', 'modelport.fleet.dask_runner',"
        " 'modelport.transfer.hashing') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["[]", "[]"]
