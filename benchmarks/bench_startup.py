"""Start-up: modelport vs picklescan vs ``python -c pass``, as whole processes, one run.

What a user waits for when a command does almost nothing: ``--version`` (modelport) against
``--help`` (picklescan), and a scan of one small safetensors file and of one small torch
state_dict. Bytecode is compiled first and PYTHONDONTWRITEBYTECODE is removed from the
children's environment, as on a user's machine. Each figure is the median of ``--repeat``
runs (10 by default) of the same command.

Where valgrind is installed, a second table counts the instructions each command executes
(callgrind, one run each, bytecode compiled by a run before it): the machine's load moves
wall-clock seconds but not these counts, so two runs on a busy machine can be compared.

The peers are installed into bench-output/peers-venv on first use (see bench_scan.py).

Usage: python benchmarks/bench_startup.py [--repeat N]
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_scan import OUT, peers_ready
from safetensors.numpy import save_file

import modelport

# modelport against picklescan, command by command
PAIRS = [
    ("modelport --version", "picklescan --help"),
    ("modelport scan small.safetensors", "picklescan -p small.safetensors"),
    ("modelport scan small.pt", "picklescan -p small.pt"),
]


def median_seconds(command: list[str], repeat: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def instructions(command: list[str], env: dict[str, str]) -> int:
    """Instructions one whole process executes, as callgrind counts them (its output file
    discarded); the command runs once before, so that its bytecode is compiled."""
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counted = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found = re.search(r"Collected : (\d+)", counted.stderr)
    if found is None:
        raise RuntimeError(f"callgrind counted nothing for {command}: {counted.stderr[-500:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    folder = OUT / "startup"
    folder.mkdir(parents=True, exist_ok=True)
    small_st = folder / "small.safetensors"
    save_file({"w": np.ones((4, 4), np.float32)}, small_st)
    small_pt = folder / "small.pt"
    torch.save({"w": torch.ones(4, 4)}, small_pt)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    compileall.compile_dir(str(Path(modelport.__file__).parent), quiet=1)
    peers = peers_ready()
    picklescan = peers["picklescan"][0]
    console_script = Path(sys.executable).parent / "modelport"  # as a user runs it, like picklescan
    modelport_cli = (
        [str(console_script)] if console_script.exists() else [sys.executable, "-m", "modelport"]
    )
    cases = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("modelport --version", [*modelport_cli, "--version"]),
        ("picklescan --help", [picklescan, "--help"]),
        ("modelport scan small.safetensors", [*modelport_cli, "scan", str(small_st)]),
        ("picklescan -p small.safetensors", [picklescan, "-p", str(small_st)]),
        ("modelport scan small.pt", [*modelport_cli, "scan", str(small_pt)]),
        ("picklescan -p small.pt", [picklescan, "-p", str(small_pt)]),
    ]
    print(f"median of {args.repeat} whole processes each; {_load()}\n")
    print(f"{'command':36} {'seconds':>8}")
    results = {}
    for name, command in cases:
        results[name] = median_seconds(command, args.repeat, env)
        print(f"{name:36} {results[name]:8.3f}")
    print()
    for ours, theirs in PAIRS:
        print(f"{ours} / {theirs}: {results[ours] / results[theirs]:.2f}x")
    print(f"\nafter: {_load()}")
    if shutil.which("valgrind"):
        _instruction_table(cases, env)
    return 0


def _instruction_table(cases: list[tuple[str, list[str]]], env: dict[str, str]) -> None:
    print(f"\ninstructions executed (callgrind, one run each)\n{'command':36} {'millions':>9}")
    counts = {}
    for name, command in cases:
        counts[name] = instructions(command, env)
        print(f"{name:36} {counts[name] / 1e6:9.1f}")
    print()
    for ours, theirs in PAIRS:
        print(f"{ours} / {theirs}: {counts[ours] / counts[theirs]:.2f}x")


def _load() -> str:
    """The machine's load, so that a table taken on a busy machine says so."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    raise SystemExit(main())
