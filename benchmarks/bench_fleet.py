"""Many files at once: ``modelport scan DIR`` with --jobs 1 and --jobs 2 against picklescan's
and modelscan's directory modes on one folder of small mixed model files (modelaudit on a
sample of 100: it scans about a file a second), the time a run takes to resume after it was
killed halfway, and the bytes a remote ``inspect`` fetches (``remote_reads``: a 1 GB
safetensors over HTTP and moto's S3 server on loopback).

The corpus (bench-output/fleet-corpus, rebuilt when --files changes) mixes what a model hub
holds, written by the libraries themselves: torch state_dicts, training checkpoints with
Adam state, whole pickled modules, safetensors, npz and joblib files. Each tool runs as a
whole process, as users run it; files/s divides the corpus by the wall time, and peak RSS
is the largest sum of the resident sets of the process and its children (modelport's
workers), sampled every 10 ms. The peers come from bench-output/peers-venv (installed
from PyPI on first use, as bench_scan.py does). With ``modelport[dask]`` installed, a run on a
Dask LocalCluster of 2 worker processes (``--scheduler local:2``) is measured too, its
cluster's start included.

The tools take turns, round after round, and each reports its median: on a shared machine a
busy minute then slows every tool alike.

Usage: python benchmarks/bench_fleet.py [--files 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import joblib
import numpy as np
import torch
from remote_reads import remote_header_reads  # this folder's: run as a script
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "bench-output"
CORPUS = OUT / "fleet-corpus"
PEERS = OUT / "peers-venv"
RUNS = OUT / "fleet-runs"
MODELPORT = [sys.executable, "-m", "modelport", "scan"]


def build_corpus(count: int) -> None:
    """``count`` small files, six kinds in turn, 200 to a subfolder."""
    stamp = OUT / "fleet-corpus.count"  # beside the corpus: not a file to scan
    if stamp.exists() and stamp.read_text() == f"{count} v2":
        return
    shutil.rmtree(CORPUS, ignore_errors=True)
    CORPUS.mkdir(parents=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # a small vision net: 22 tensors, BatchNorm buffers included
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 2 * 2, 10),
    )
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    state = model.state_dict()
    arrays = {k: v.numpy() for k, v in state.items()}
    writers = [
        lambda p: torch.save(state, p.with_suffix(".pt")),
        lambda p: torch.save(
            {"epoch": 3, "model": state, "optimizer": optimizer.state_dict()},
            p.with_suffix(".ckpt"),
        ),
        lambda p: torch.save(model, p.with_suffix(".bin")),
        lambda p: save_file(arrays, str(p.with_suffix(".safetensors"))),
        lambda p: np.savez(p.with_suffix(".npz"), **arrays),
        lambda p: joblib.dump({"coef": arrays["9.weight"], "n": 3}, p.with_suffix(".joblib")),
    ]
    for i in range(count):
        folder = CORPUS / f"part{i // 200:03d}"
        folder.mkdir(exist_ok=True)
        writers[i % len(writers)](folder / f"file{i:06d}")
    stamp.write_text(f"{count} v2")


def peer(tool: str, *arguments: str) -> list[str] | None:
    """A peer scanner from PyPI, installed into its own venv on first use."""
    if not (PEERS / "bin" / tool).exists():
        try:
            if not (PEERS / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
            pip = [str(PEERS / "bin" / "python"), "-m", "pip", "install", "-q", tool]
            subprocess.run(pip, check=True)
        except subprocess.CalledProcessError:
            return None
    return [str(PEERS / "bin" / tool), *arguments]


def modelaudit_sample(count: int) -> None:
    """modelaudit scans about one small file a second, so it gets a sample of the corpus
    (its first ``count`` files, copied to a folder of their own) and modelport the same."""
    audit = peer("modelaudit", "scan", "--no-cache", "--format", "json")
    if audit is None:
        return
    sample = RUNS / "sample"
    shutil.rmtree(sample, ignore_errors=True)
    sample.mkdir(parents=True)
    for path in sorted(p for p in CORPUS.iterdir() if p.is_file())[:count]:
        shutil.copy(path, sample / path.name)
    print(f"\na sample of {count} files, one run each:")
    for name, command in (
        ("modelport --jobs 1", [*MODELPORT, "--jobs", "1", "--json"]),
        ("modelaudit", audit),
    ):
        wall, peak, _ = timed([*command, str(sample)])
        print(f"{name:22} {wall:8.2f} {count / wall:9.1f} files/s {peak / 1e6:8.0f} MB")


class TreeMemory:
    """The peak of the summed RSS of a process and its descendants, sampled, and the CPU
    seconds the process itself had used at its last sample (its workers' are apart)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.own_cpu = pid, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, sum(_rss(p) for p in _tree(self.pid)))
            self.own_cpu = max(self.own_cpu, _own_cpu(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for thread in Path(f"/proc/{current}/task").glob("*"):  # children of every thread
            try:
                todo.extend(int(c) for c in (thread / "children").read_text().split())
            except OSError:
                continue
    return found


def _own_cpu(pid: int) -> float:
    """User and system seconds of ``pid`` alone (``/proc/PID/stat`` fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak tree RSS and exit status of one run."""
    wall, peak, status, _, _ = timed_with_cpu(command)
    return wall, peak, status


def timed_with_cpu(command: list[str]) -> tuple[float, int, int, float, float]:
    """Wall seconds, peak tree RSS, exit status, CPU seconds (user and system, of the
    process and every child it waited for: its workers) of one run, and of those the
    process's own, as last sampled (up to 10 ms short: the parent's share of a fleet run)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    memory = TreeMemory(process.pid)
    _, raw_status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(raw_status)
    wall = time.perf_counter() - start
    peak = memory.stop()
    return wall, peak, process.returncode, usage.ru_utime + usage.ru_stime, memory.own_cpu


# Run in a fresh interpreter holding what the CLI holds when it starts its workers (one
# thread, so the pool may fork): the CPU seconds a worker spends before it says it is ready,
# started fresh and forked, in turns; the median of each, in ms.
_START_UP = """
import os, resource, statistics, sys
import modelport.cli._fleet, modelport.cli.cmd_scan
from modelport.fleet import pool
from modelport.fleet.records import Budget
spent = {"fresh": [], "forked": []}
for _ in range(int(sys.argv[1])):
    for kind, start in (("fresh", pool._start), ("forked", pool._launch)):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        worker = start(Budget(300.0), "scan")
        worker.stdout.readline()
        worker.stdin.close()
        worker.wait()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent[kind].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
print(" ".join(f"{statistics.median(v) * 1000:.0f}" for v in spent.values()))
"""


def worker_start_up(rounds: int) -> tuple[float, float]:
    """A scan worker's start-up CPU in ms, started fresh and forked from the CLI's parent."""
    done = subprocess.run(
        [sys.executable, "-c", _START_UP, str(rounds)], capture_output=True, text=True, check=True
    )
    fresh, forked = map(float, done.stdout.split())
    return fresh, forked


def resume_after_kill(count: int) -> tuple[float, float, int]:
    """Kill a --jobs 2 run once half the files are recorded; the rerun's wall time, the
    time of a second rerun with everything recorded, and the records the kill left."""
    out = RUNS / "resume.jsonl"
    out.unlink(missing_ok=True)
    command = [*MODELPORT, str(CORPUS), "--jobs", "2", "--jsonl", str(out), "--json"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and (
        not out.exists() or out.read_bytes().count(b"\n") < count // 2
    ):
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    left = out.read_bytes().count(b"\n")
    rerun, _, _ = timed(command)
    noop, _, _ = timed(command)
    return rerun, noop, left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    build_corpus(args.files)
    print(
        f"corpus: {args.files} files in {CORPUS} (built in {time.perf_counter() - started:.1f} s)"
    )
    RUNS.mkdir(parents=True, exist_ok=True)
    tools: dict[str, list[str]] = {}
    for jobs in (1, 2):
        out = RUNS / f"jobs{jobs}.jsonl"
        tools[f"modelport --jobs {jobs}"] = [
            *MODELPORT,
            str(CORPUS),
            "--jobs",
            str(jobs),
            "--jsonl",
            str(out),
            "--json",
        ]
    if importlib.util.find_spec("distributed") is not None:  # pip install 'modelport[dask]'
        tools["modelport dask local:2"] = [
            *MODELPORT,
            str(CORPUS),
            "--scheduler",
            "local:2",  # a LocalCluster of 2 worker processes, started by the run
            "--jsonl",
            str(RUNS / "jobs-dask.jsonl"),
            "--json",
        ]
    tools["modelport, one process"] = [  # the Python API in one process: no workers
        sys.executable,
        "-c",
        f"import modelport; modelport.scan({str(CORPUS)!r})",
    ]
    for name, command in (
        ("picklescan -p", peer("picklescan", "-p")),
        ("modelscan -p", peer("modelscan", "-p")),
    ):
        if command is not None:
            tools[name] = [*command, str(CORPUS)]
    timed(tools["modelport --jobs 1"])  # page cache warm for everyone
    walls: dict[str, list[float]] = {name: [] for name in tools}
    cpus: dict[str, list[float]] = {name: [] for name in tools}
    parents: dict[str, list[float]] = {name: [] for name in tools}
    peaks: dict[str, list[int]] = {name: [] for name in tools}
    for _ in range(args.repeat):  # round by round, so that a busy minute costs every tool
        for name, command in tools.items():
            for stale in RUNS.glob("jobs*.jsonl"):
                stale.unlink()  # a fresh run each time, never a resume
            wall, peak, _, cpu, parent = timed_with_cpu(command)
            walls[name].append(wall)
            cpus[name].append(cpu)
            parents[name].append(parent)
            peaks[name].append(peak)
    print(
        f"\n{'tool':22} {'wall s':>8} {'files/s':>9} {'CPU s':>7} {'files/CPU s':>12} "
        f"{'peak RSS':>10}   (median of {args.repeat})"
    )
    for name in tools:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        print(
            f"{name:22} {wall:8.2f} {args.files / wall:9.0f} {cpu:7.2f} {args.files / cpu:12.0f} "
            f"{max(peaks[name]) / 1e6:8.0f} MB"
        )
    one, two = (statistics.median(walls[f"modelport --jobs {j}"]) for j in (1, 2))
    one_each, two_each = walls["modelport --jobs 1"], walls["modelport --jobs 2"]
    turns = [a / b for a, b in zip(one_each, two_each, strict=True)]
    print(
        f"--jobs 2 / --jobs 1: {one / two:.2f}x (round by round: median "
        f"{statistics.median(turns):.2f}x, {min(turns):.2f}x to {max(turns):.2f}x)"
    )
    for jobs in (1, 2):  # the parent's share competes with the workers for the cores
        name = f"modelport --jobs {jobs}"
        own = statistics.median(parents[name])
        workers = statistics.median(c - p for c, p in zip(cpus[name], parents[name], strict=True))
        print(f"{name}: parent {own:.2f} CPU s, workers {workers:.2f} CPU s")
    fresh, forked = worker_start_up(max(args.repeat, 5))
    print(
        f"a scan worker's start-up, to ready with every file reader imported (median CPU): "
        f"{fresh:.0f} ms started fresh, {forked:.0f} ms forked from the parent"
    )
    if "picklescan -p" in walls:
        peer_wall, peer_cpu = (statistics.median(m["picklescan -p"]) for m in (walls, cpus))
        one_cpu = statistics.median(cpus["modelport --jobs 1"])
        print(
            f"--jobs 1 / picklescan: {peer_wall / one:.2f}x the files per second, "
            f"{peer_cpu / one_cpu:.2f}x the files per CPU second (parent and worker together)"
        )
    resumes = [resume_after_kill(args.files) for _ in range(args.repeat)]
    rerun, noop, left = (statistics.median(r[i] for r in resumes) for i in range(3))
    print(
        f"\nkilled (SIGKILL) at {left:.0f} of {args.files} records (medians of {args.repeat}): "
        f"the rerun finished the other {args.files - left:.0f} in {rerun:.2f} s; a rerun with "
        f"every file recorded: {noop:.2f} s"
    )
    modelaudit_sample(100)
    if importlib.util.find_spec("moto") is not None:  # pip install 'modelport[remote]' moto[server]
        remote_header_reads()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
