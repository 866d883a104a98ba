"""Workers that fail for real: a file over its time budget, a file that needs more memory
than the worker may map, a worker killed while it reads a file, and the parent killed in the
middle of a run. Each time the file in question gets its one record and every other file
gets exactly one; nothing here is simulated inside modelport."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Cli

MODELPORT = [sys.executable, "-m", "modelport"]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def small_files(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"f{i:04d}.npy")
        np.save(paths[-1], np.arange(i % 7 + 1))
    return paths


def slow_pickle(path: Path, appends: int) -> Path:
    """A plain protocol-0 list of ints: harmless, and slow to scan (one opcode each)."""
    path.write_bytes(b"(l" + b"I1\na" * appends + b".")
    return path


def inflating_pickle(path: Path, inflated: int) -> Path:
    """A gzip-compressed pickle of one bytes object of ``inflated`` zeros: a few MB on
    disk, which scanning must inflate to read the pickle behind it."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [packer.compress(b"\x80\x04\x8e" + struct.pack("<Q", inflated))]
    block = bytes(1 << 24)
    parts.extend(packer.compress(block) for _ in range(inflated >> 24))
    parts += [packer.compress(b"."), packer.flush()]
    path.write_bytes(b"".join(parts))
    return path


def exactly_once(written: list[dict[str, Any]], expected: list[Path]) -> None:
    counts = Counter(r["path"] for r in written)
    assert sorted(counts) == sorted(str(p) for p in expected)
    assert set(counts.values()) == {1}, [p for p, n in counts.items() if n > 1]


def test_a_file_over_its_time_budget_is_a_timeout_record(tmp_path: Path, cli: Cli) -> None:
    others = small_files(tmp_path / "data", 6)
    # Several times the budget to scan (about ten on a slow core), while a small file takes
    # milliseconds of it (workers preload); the retry below reads it whole: both kept small.
    slow = slow_pickle(tmp_path / "data" / "slow.pkl", 340_000)
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    result = cli("scan", tmp_path / "data", "--timeout", "0.5", "--jobs", "2", "--jsonl", out)
    assert time.monotonic() - started < 30
    assert result.code == 2  # a file not analysed: an error verdict
    written = records(out)
    exactly_once(written, [*others, slow])
    (late,) = [r for r in written if r["path"] == str(slow)]
    assert late["status"] == "timeout" and late["error"]["type"] == "Timeout"
    assert late["size"] == slow.stat().st_size and late["result"] is None
    assert {r["status"] for r in written if r is not late} == {"ok"}
    assert "ERROR" in result.out and "--timeout" in result.out
    # the same budget again: the timeout stands; a larger one retries the file
    again = cli("scan", tmp_path / "data", "--timeout", "0.5", "--jsonl", out)
    assert "0 processed now" in again.err
    retried = cli("scan", tmp_path / "data", "--timeout", "120", "--jsonl", out, "--json")
    assert "1 processed now" in retried.err and retried.code == 0
    assert records(out)[-1]["status"] == "ok" and records(out)[-1]["path"] == str(slow)


def test_a_file_over_the_memory_budget_is_an_error_record(tmp_path: Path, cli: Cli) -> None:
    others = small_files(tmp_path / "data", 6)
    heavy = inflating_pickle(tmp_path / "data" / "inflates.pkl.gz", 384 << 20)  # > 350M
    out = tmp_path / "out.jsonl"
    result = cli("scan", tmp_path / "data", "--max-memory", "350M", "--jsonl", out, "--jobs", "2")
    assert result.code == 2
    written = records(out)
    exactly_once(written, [*others, heavy])
    (spent,) = [r for r in written if r["path"] == str(heavy)]
    assert spent["status"] == "error" and spent["error"]["type"] == "MemoryError"
    assert "367,001,600 bytes" in spent["error"]["message"]
    assert spent["budget"] == {"timeout_s": 300.0, "max_memory": 350 << 20}
    assert {r["status"] for r in written if r is not spent} == {"ok"}
    unlimited = cli("scan", heavy, "--jsonl", out)  # no limit: retried, and read whole
    assert "1 processed now" in unlimited.err and unlimited.code == 0


def test_a_worker_killed_mid_file_is_that_files_record(tmp_path: Path) -> None:
    slow = slow_pickle(tmp_path / "a-slow.pkl", 3_000_000)
    others = small_files(tmp_path / "rest", 5)
    out = tmp_path / "out.jsonl"
    argv = [*MODELPORT, "scan", str(slow), str(tmp_path / "rest"), "--jobs", "1"]
    parent = subprocess.Popen(
        [*argv, "--jsonl", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        worker = wait_for_worker_reading(parent.pid, slow)
        os.kill(worker, signal.SIGKILL)
        _, err = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 2, err
    written = records(out)
    exactly_once(written, [slow, *others])
    (died,) = [r for r in written if r["path"] == str(slow)]
    assert died["status"] == "error" and died["error"]["type"] == "WorkerDied"
    assert "killed by SIGKILL" in died["error"]["message"]
    assert {r["worker"] for r in written if r is not died} - {worker}  # a new worker went on


def wait_for_worker_reading(parent: int, path: Path, limit: float = 30) -> int:
    """The pid of the child of ``parent`` that has ``path`` open or mapped."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        children = Path(f"/proc/{parent}/task/{parent}/children")
        for pid in children.read_text().split() if children.exists() else []:
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
                fds = [str(f.readlink()) for f in Path(f"/proc/{pid}/fd").iterdir()]
            except OSError:
                continue
            if str(path) in maps or str(path) in fds:
                return int(pid)
        time.sleep(0.02)
    raise AssertionError(f"no worker of {parent} opened {path}")


def kill_when_recorded(argv: list[str], out: Path, lines: int) -> int:
    """Run ``argv``, SIGKILL it once ``out`` holds ``lines`` records; the records then."""
    parent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while parent.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < lines):
            time.sleep(0.005)
        workers = children(parent.pid)  # forked or started fresh, as the parent chose
        parent.send_signal(signal.SIGKILL)  # no cleanup at all: its workers die with it
        parent.wait()
    finally:
        if parent.poll() is None:
            parent.kill()
    assert workers, "no worker was running"
    assert no_worker_outlives(parent.pid, workers)
    return out.read_bytes().count(b"\n")


def children(parent: int) -> set[int]:
    found: set[int] = set()
    for thread in Path(f"/proc/{parent}/task").iterdir():
        with contextlib.suppress(OSError):
            found.update(int(pid) for pid in (thread / "children").read_text().split())
    return found


def no_worker_outlives(parent: int, workers: set[int], limit: float = 10) -> bool:
    """Whether every one of ``workers``, and every fresh worker naming ``parent``, ended
    (a zombie has ended: only its exit status is left to collect)."""
    deadline = time.monotonic() + limit
    mark = f"--parent\x00{parent}\x00".encode()
    while time.monotonic() < deadline:
        alive = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (
                    int(entry.name) in workers or mark in (entry / "cmdline").read_bytes()
                ):
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        alive.append(entry.name)
            except OSError:
                continue
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_resume_after_the_parent_is_killed_mid_run(tmp_path: Path) -> None:
    files = small_files(tmp_path / "data", 200)
    out = tmp_path / "out.jsonl"
    argv = [*MODELPORT, "scan", str(tmp_path / "data"), "--jsonl", str(out), "--jobs", "2"]
    done_before = kill_when_recorded(argv, out, 20)
    assert 20 <= done_before < 200, "the run ended before it could be killed"
    rerun = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"already recorded in {out}" in rerun.stderr
    processed = int(rerun.stderr.split(" processed now")[0].rsplit(" ", 1)[-1])
    assert processed == 200 - done_before
    exactly_once(records(out), files)


@pytest.mark.heavy
def test_killed_three_times_a_mixed_folder_still_sums_up_as_one_scan(
    tmp_path: Path, attacks: dict[str, bytes]
) -> None:
    import modelport
    from modelport.fleet import summarize

    data = tmp_path / "data"
    files = small_files(data / "arrays", 1500)
    for i in range(60):
        (data / f"attack{i}.pkl").write_bytes(attacks["global-reduce"])
        files.append(data / f"attack{i}.pkl")
    files.append(slow_pickle(data / "slow.pkl", 200_000))
    out = tmp_path / "out.jsonl"
    argv = [*MODELPORT, "scan", str(data), "--jsonl", str(out), "--jobs", "2"]
    for lines in (300, 700, 1200):
        assert kill_when_recorded(argv, out, lines) < len(files)
    rerun = subprocess.run([*argv, "--json"], capture_output=True, text=True, check=False)
    assert rerun.returncode == 1, rerun.stderr
    exactly_once(records(out), files)
    direct = modelport.scan(data)
    assert json.loads(rerun.stdout) == direct.to_json()
    assert summarize(out).scan_report() == direct


def test_a_memory_budget_no_worker_can_start_in_is_a_usage_error(tmp_path: Path, cli: Cli) -> None:
    small_files(tmp_path / "data", 2)
    result = cli("scan", tmp_path / "data", "--max-memory", "50M")
    assert result.code == 2
    assert "no worker could start within --max-memory 52,428,800 bytes" in result.err
    assert "maps" in result.err and result.out == ""
