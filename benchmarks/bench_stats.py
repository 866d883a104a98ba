"""modelport.stats against numpy over the same bytes, time and peak memory, in one run.

A float32 safetensors file of about ``--size`` GB is written (LLM-shaped: one 256 MB
embedding, then layers of 2048x2048 and 5632x2048 matrices and norm vectors), a block at a
time from a seeded generator. Then, alternating, each case runs in a process of its own:

- ``modelport``: ``modelport.stats(path)``: per tensor min, max, mean, std, NaN/Inf/zero/
  subnormal counts, float16/bfloat16 overflow, a power-of-two histogram and the flags;
- ``numpy``: one ``np.memmap`` over the same bytes (every tensor is float32 and they lie
  back to back) and four reductions: ``min``, ``max``, ``mean``, ``std``.

Time is the work alone (measured inside the process, after imports); peak RSS is the
process's ``VmHWM`` (since exec: a forked child's ``wait4`` figure would include this
script's own memory; mapped file pages count, as in ``/usr/bin/time``), with a process that
only imports ``modelport.measuring.stats`` for the floor. The file is read once before timing so
both read from the page cache. The whole-file mean and std modelport's per-tensor numbers
imply are checked against numpy's.

Usage: python benchmarks/bench_stats.py [--size 2] [--repeat 3] [--threads N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "bench-output" / "stats"
HIDDEN, MLP, VOCAB = 2048, 5632, 32000

PEAK = """
def peak():  # VmHWM: this process's peak RSS since exec, mapped file pages included
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

MODELPORT = (
    PEAK
    + """
import json, sys, time, modelport
stats = modelport.stats  # imports the statistics' modules: not part of the timing
started = time.perf_counter()
report = stats(sys.argv[1], threads=int(sys.argv[2]) or None)
seconds = time.perf_counter() - started
tensors = [
    {"n": t.elements, "mean": t.mean, "std": t.std, "min": t.min, "max": t.max}
    for t in report.tensors
]
print(json.dumps({"seconds": seconds, "threads": report.threads, "tensors": tensors,
                  "peak": peak()}))
"""
)

NUMPY = (
    PEAK
    + """
import json, sys, time, numpy as np
started = time.perf_counter()
values = np.memmap(sys.argv[1], dtype=np.float32, mode="r", offset=int(sys.argv[2]))
found = [float(values.min()), float(values.max()), float(values.mean()), float(values.std())]
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "min": found[0], "max": found[1], "mean": found[2],
                  "std": found[3], "peak": peak()}))
"""
)

FLOOR = (
    PEAK
    + """
import json, modelport.measuring.stats
print(json.dumps({"peak": peak()}))
"""
)


def layout(size_gb: float) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    per_layer = 4 * (4 * HIDDEN * HIDDEN + 3 * MLP * HIDDEN + 2 * HIDDEN)
    layers = max(1, round((size_gb * 1e9 - 4 * VOCAB * HIDDEN) / per_layer))
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        for name, shape in (("gate_proj", (MLP, HIDDEN)), ("up_proj", (MLP, HIDDEN))):
            shapes[f"{p}mlp.{name}.weight"] = shape
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, MLP)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    return shapes


def build(path: Path, size_gb: float) -> int:
    """Write the file a block at a time; return where the tensor data starts."""
    shapes = layout(size_gb)
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, shape in shapes.items():
            count = int(np.prod(shape))
            for start in range(0, count, 1 << 24):
                block = rng.standard_normal(min(1 << 24, count - start), dtype=np.float32)
                if name.endswith("layernorm.weight"):
                    block = 1 + block * 0.05
                else:
                    block *= 0.02
                handle.write(block.tobytes())
    return 8 + len(encoded)


def run(code: str, *args: str) -> tuple[dict[str, Any], float]:
    """One case in a fresh process: its JSON line and its peak RSS in MB."""
    done = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, check=True)
    found: dict[str, Any] = json.loads(done.stdout)
    return found, float(found["peak"])


def whole_file(tensors: list[dict[str, float]]) -> tuple[float, float, float, float]:
    """min, max, mean, std of every value, from the per-tensor statistics."""
    total = sum(t["n"] for t in tensors)
    mean = sum(t["n"] * t["mean"] for t in tensors) / total
    square = sum(t["n"] * (t["std"] ** 2 + t["mean"] ** 2) for t in tensors) / total
    low, high = min(t["min"] for t in tensors), max(t["max"] for t in tensors)
    return low, high, mean, (square - mean * mean) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=2.0, help="file size in GB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: modelport's default")
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"model-{args.size:g}GB.safetensors"
    try:
        data_start = build(path, args.size)
        size = path.stat().st_size
        with open(path, "rb") as handle:  # into the page cache, for both cases alike
            while handle.read(1 << 24):
                pass
        _, floor = run(FLOOR)
        results: dict[str, list[tuple[float, float]]] = {"modelport": [], "numpy": []}
        for _ in range(args.repeat):
            ours, rss = run(MODELPORT, str(path), str(args.threads))
            results["modelport"].append((float(ours["seconds"]), rss))
            theirs, rss = run(NUMPY, str(path), str(data_start))
            results["numpy"].append((float(theirs["seconds"]), rss))
        derived = whole_file(ours["tensors"])
        expected = [theirs[k] for k in ("min", "max", "mean", "std")]
        print(
            f"file: {size / 1e9:.2f} GB float32, {len(ours['tensors'])} tensors; "
            f"{os.cpu_count()} CPUs; modelport threads: {ours['threads']}"
        )
        print(f"import floor: {floor:.0f} MB peak RSS")
        print(f"{'case':<10} {'time (s)':>9} {'GB/s':>6} {'peak RSS (MB)':>14}", end="")
        print(f"   (median of {args.repeat})")
        medians = {}
        for case, runs in results.items():
            seconds = statistics.median(s for s, _ in runs)
            rss = max(r for _, r in runs)
            medians[case] = seconds
            print(f"{case:<10} {seconds:>9.2f} {size / 1e9 / seconds:>6.2f} {rss:>14.0f}")
        print(f"modelport / numpy speed: {medians['numpy'] / medians['modelport']:.2f}x")
        print("whole-file min, max, mean, std from modelport's per-tensor statistics vs numpy:")
        print("  modelport", " ".join(f"{v:.7g}" for v in derived))
        print("  numpy    ", " ".join(f"{float(v):.7g}" for v in expected))
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
