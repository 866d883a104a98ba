"""Start-up: modelport vs picklescan vs ``python -c pass``, as whole processes, one run.

What a user waits for when a command does almost nothing: ``--version`` (modelport) against
``--help`` (picklescan), and a scan of one small safetensors file and of one small torch
state_dict. Bytecode is compiled first and PYTHONDONTWRITEBYTECODE is removed from the
children's environment, as on a user's machine. Each figure is the median of ``--repeat``
runs (10 by default) of the same command.

The peers are installed into bench-output/peers-venv on first use (see bench_scan.py).

Usage: python benchmarks/bench_startup.py [--repeat N]
"""

from __future__ import annotations

import argparse
import compileall
import os
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


def median_seconds(command: list[str], repeat: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    modelport_cli = [sys.executable, "-m", "modelport"]
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
    for ours, theirs in [
        ("modelport --version", "picklescan --help"),
        ("modelport scan small.safetensors", "picklescan -p small.safetensors"),
        ("modelport scan small.pt", "picklescan -p small.pt"),
    ]:
        print(f"{ours} / {theirs}: {results[ours] / results[theirs]:.2f}x")
    print(f"\nafter: {_load()}")
    return 0


def _load() -> str:
    """The machine's load, so that a table taken on a busy machine says so."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    raise SystemExit(main())
