"""``--scheduler``: a fleet run on a real Dask distributed cluster (a scheduler and two worker
processes on loopback, started as ``dask scheduler`` and ``dask worker`` are), compared with
the same run on this machine's workers; one Dask worker is killed (SIGKILL) in the middle of
a run, and every input still gets exactly one record."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from modelport.fleet.dask_runner import batch_size
from tests.conftest import Cli

MODELPORT = [sys.executable, "-m", "modelport"]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def verdicts(path: Path) -> dict[str, tuple[str, str, str]]:
    """Each record's path: its status, format and scan verdict; each path once."""
    written = records(path)
    assert Counter(r["path"] for r in written).most_common(1)[0][1] == 1
    return {r["path"]: (r["status"], r["format"], r["result"]["verdict"]) for r in written}


def corpus(root: Path, attacks: dict[str, bytes], count: int) -> list[Path]:
    """``count`` small files written by torch, safetensors, numpy and pickle, with one
    damaged pickle and one attack among them."""
    root.mkdir()
    writers = [
        lambda p, i: torch.save({"w": torch.full((3,), float(i))}, p.with_suffix(".pt")),
        lambda p, i: save_file({"x": np.full(4, i, np.float32)}, str(p.with_suffix(".st"))),
        lambda p, i: np.save(p.with_suffix(".npy"), np.arange(i + 1)),
        lambda p, i: p.with_suffix(".pkl").write_bytes(pickle.dumps({"w": np.ones(i + 1)})),
    ]
    for i in range(count - 2):
        writers[i % len(writers)](root / f"file{i:03d}", i)
    (root / "broken.pkl").write_bytes(b"\x80\x04\x95\xff\xff")
    (root / "evil.bin").write_bytes(attacks["global-reduce"])
    return sorted(root.iterdir())


def dask(command: str) -> list[str]:
    """``dask scheduler`` / ``dask worker``, from this interpreter."""
    return [sys.executable, "-m", f"distributed.cli.dask_{command}"]


@dataclass(frozen=True)
class Cluster:
    address: str
    client: Any  # a distributed.Client of the test's own, to watch the cluster
    pids: dict[str, int]  # each worker's process, by its address
    allowed_failures: int


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A scheduler and two single-threaded worker processes (no nanny: a killed worker
    stays dead) on 127.0.0.1. ``request.param`` is the scheduler's allowed-failures: with 0
    it gives up on a task the first time a worker dies under it, and the client's own
    retries take over; with Dask's default, 3, it runs the task elsewhere itself."""
    distributed = pytest.importorskip("distributed")
    info = tmp_path / "scheduler.json"
    allowed = str(request.param)
    environment = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": allowed}
    started = [
        subprocess.Popen(
            [
                *dask("scheduler"),
                "--host=127.0.0.1",
                "--port=0",
                "--no-dashboard",
                "--scheduler-file",
                str(info),
            ],
            env=environment,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 30
        while not info.exists() or not info.read_text().strip():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.05)
        address = json.loads(info.read_text())["address"]
        for _ in range(2):
            started.append(
                subprocess.Popen(
                    [
                        *dask("worker"),
                        address,
                        "--nthreads=1",
                        "--no-nanny",
                        "--host=127.0.0.1",
                        "--no-dashboard",
                    ],
                    env=environment,
                    stderr=subprocess.DEVNULL,
                )
            )
        with distributed.Client(address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=30)
            yield Cluster(address, client, client.run(os.getpid), int(allowed))
    finally:
        for process in started:
            process.kill()
            process.wait()


def kill_a_busy_worker(cluster: Cluster, run: subprocess.Popen[str]) -> int:
    """SIGKILL the first Dask worker seen running one of the run's batches; its pid."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and run.poll() is None:
        busy = [worker for worker, keys in cluster.client.processing().items() if keys]
        if busy:
            pid = cluster.pids[busy[0]]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.01)
    raise AssertionError(f"no worker was seen busy; the run said: {run.communicate()}")


@pytest.mark.heavy
@pytest.mark.parametrize("cluster", [0, 3], indirect=True, ids=["client-retries", "dask-retries"])
def test_a_cluster_run_gives_the_local_records_though_a_worker_dies(
    tmp_path: Path, attacks: dict[str, bytes], cli: Cli, cluster: Cluster
) -> None:
    files = corpus(tmp_path / "models", attacks, 40)
    local, remote = tmp_path / "local.jsonl", tmp_path / "dask.jsonl"
    assert cli("scan", tmp_path / "models", "--jobs", "1", "--jsonl", local).code == 1
    argv = [*MODELPORT, "scan", str(tmp_path / "models"), "--jsonl", str(remote)]
    run = subprocess.Popen(
        [*argv, "--scheduler", cluster.address], stderr=subprocess.PIPE, text=True
    )
    kill_a_busy_worker(cluster, run)
    recorded_at_kill = len(records(remote)) if remote.exists() else 0
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1, err  # the attack: unsafe
    assert recorded_at_kill < len(files)  # the kill came in the middle of the run
    client_retried = "a Dask worker was lost" in err and "submitted again" in err
    assert client_retried == (cluster.allowed_failures == 0), err
    assert verdicts(remote) == verdicts(local)
    assert sorted(verdicts(remote)) == [str(f) for f in files]
    assert verdicts(remote)[str(tmp_path / "models" / "evil.bin")][2] == "unsafe"
    assert verdicts(remote)[str(tmp_path / "models" / "broken.pkl")][2] == "error"
    volatile = {"duration_s", "worker", "finished"}
    by_path = {r["path"]: r for r in records(local)}
    for record in records(remote):
        assert {k: v for k, v in record.items() if k not in volatile} == {
            k: v for k, v in by_path[record["path"]].items() if k not in volatile
        }
    again = subprocess.run(
        [*argv, "--scheduler", cluster.address], capture_output=True, text=True, check=False
    )
    assert f"0 processed now, {len(files)} already recorded" in again.stderr  # resumed


@pytest.mark.heavy
def test_a_local_cluster_with_dedupe(tmp_path: Path, attacks: dict[str, bytes]) -> None:
    corpus(tmp_path / "models", attacks, 6)
    for copy in ("a", "b"):
        (tmp_path / "models" / copy).mkdir()
        (tmp_path / "models" / copy / "evil.bin").write_bytes(attacks["global-reduce"])
    out = tmp_path / "out.jsonl"
    argv = [str(tmp_path / "models"), "--scheduler", "local:2", "--dedupe", "--jsonl", str(out)]
    done = subprocess.run([*MODELPORT, "scan", *argv], capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr
    written = verdicts(out)
    assert len(written) == 8 and "2 copied from files with the same bytes" in done.stderr
    evil = [p for p, v in written.items() if p.endswith("evil.bin")]
    assert len(evil) == 3 and {written[p] for p in evil} == {("ok", "pickle", "unsafe")}


def test_a_missing_dask_names_the_extra(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.save(tmp_path / "a.npy", np.ones(2))
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed: ImportError
    result = cli("scan", tmp_path / "a.npy", "--scheduler", "tcp://127.0.0.1:8786")
    assert result.code == 2
    assert "pip install 'modelport[dask]'" in result.err


@pytest.mark.parametrize("address", ["nowhere", "local:0", "local:x"])
def test_a_scheduler_address_that_cannot_work_is_a_usage_error(
    tmp_path: Path, cli: Cli, address: str
) -> None:
    np.save(tmp_path / "a.npy", np.ones(2))
    result = cli("scan", tmp_path / "a.npy", "--scheduler", address)
    assert result.code == 2 and "--scheduler takes" in result.err


def test_batches_spread_the_files_over_the_cluster_threads() -> None:
    assert batch_size(40, 2) == 5  # four batches a thread
    assert batch_size(3, 8) == 1
    assert batch_size(10**6, 64) == 32  # at most MAX_BATCH files to a task
    assert batch_size(5, 0) == 2  # no worker yet: as if one thread
