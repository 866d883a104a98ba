"""modelport convert vs cp vs the usual torch.load + save_file script, same files, one run.

LLM-shaped fp32 state dicts (hidden 1536, MLP 4096, GQA, vocab 32000) of about 1, 2 and 4 GB
are written as torch zip checkpoints. Each case is a whole process; wall time and peak RSS
come from ``wait4`` (RSS counts mapped file pages, as ``/usr/bin/time`` does). Cases:

- ``cp`` of the source (the physical floor: every byte read once and written once);
- the usual script: ``torch.load`` + ``safetensors.torch.save_file`` + reload and compare;
- ``modelport convert`` to every target it writes, verified and ``--no-verify``, and with
  ``--dtype bfloat16``; then the reverse, safetensors -> torch zip.

Usage: python benchmarks/bench_convert.py [--sizes 1,2,4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "bench-output" / "convert"
PER_LAYER = 4 * (2 * 1536 * 1536 + 2 * 512 * 1536 + 3 * 4096 * 1536)
EMBED = 2 * 4 * 32000 * 1536

USUAL_SCRIPT = """
import sys, torch
from safetensors.torch import save_file, load_file
state = torch.load(sys.argv[1], map_location="cpu")
save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[2])
again = load_file(sys.argv[2])
assert all(torch.equal(state[k], again[k]) for k in state)
"""


def build(path: Path, layers: int) -> None:
    code = f"""
import torch
hidden, mlp, vocab = 1536, 4096, 32000
sd = {{"model.embed_tokens.weight": torch.empty(vocab, hidden).uniform_()}}
for i in range({layers}):
    p = f"model.layers.{{i}}."
    for name, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (512, hidden)),
                        ("self_attn.v_proj", (512, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                        ("mlp.gate_proj", (mlp, hidden)), ("mlp.up_proj", (mlp, hidden)),
                        ("mlp.down_proj", (hidden, mlp))]:
        sd[p + name + ".weight"] = torch.empty(shape).uniform_()
    sd[p + "input_layernorm.weight"] = torch.ones(hidden)
sd["lm_head.weight"] = torch.empty(vocab, hidden).uniform_()
torch.save(sd, {str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def run_once(command: list[str], output: Path | None) -> tuple[float, float]:
    if output is not None:
        output.unlink(missing_ok=True)
    os.sync()
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024


def measure(command: list[str], output: Path | None, repeat: int) -> tuple[float, float]:
    run_once(command, output)  # warm: page cache and imports
    runs = [run_once(command, output) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,2,4", help="approximate sizes in GB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    convert = [sys.executable, "-m", "modelport", "convert"]
    print(f"{'size':>6} {'case':44} {'wall s':>8} {'x cp':>6} {'peak RSS MB':>12}")
    for size in (float(s) for s in args.sizes.split(",")):
        layers = max(1, round((size * 1e9 - EMBED) / PER_LAYER))
        source = OUT / f"llm-{size:g}gb.pt"
        if not source.exists():
            build(source, layers)
        gb = source.stat().st_size / 1e9
        copy = OUT / "copy.bin"
        cp_wall, cp_rss = measure(["cp", str(source), str(copy)], copy, args.repeat)
        copy.unlink(missing_ok=True)
        rows = [("cp", cp_wall, cp_rss)]
        usual_out = OUT / "usual.safetensors"
        wall, rss = measure(
            [sys.executable, "-c", USUAL_SCRIPT, str(source), str(usual_out)],
            usual_out,
            args.repeat,
        )
        rows.append(("torch.load + save_file + reload/compare", wall, rss))
        cases = [
            ("modelport -> safetensors", "out.safetensors", []),
            ("modelport -> safetensors --no-verify", "out.safetensors", ["--no-verify"]),
            (
                "modelport -> safetensors --dtype bfloat16",
                "bf16.safetensors",
                ["--dtype", "bfloat16"],
            ),
            ("modelport -> torch zip", "out.pt", []),
            ("modelport -> npz", "out.npz", []),
            ("modelport -> gguf", "out.gguf", []),
        ]
        for label, name, extra in cases:
            target = OUT / name
            try:
                wall, rss = measure(
                    [*convert, str(source), str(target), *extra], target, args.repeat
                )
            except SystemExit as exc:
                print(f"{gb:6.2f} {label:44} skipped: {exc}")
                continue
            rows.append((label, wall, rss))
        safetensors_file = OUT / "out.safetensors"
        if not safetensors_file.exists():
            subprocess.run([*convert, str(source), str(safetensors_file)], check=True)
        reverse = OUT / "reverse.pt"
        try:
            wall, rss = measure(
                [*convert, str(safetensors_file), str(reverse)], reverse, args.repeat
            )
            rows.append(("modelport safetensors -> torch zip", wall, rss))
        except SystemExit as exc:
            print(f"{gb:6.2f} reverse skipped: {exc}")
        for label, wall, rss in rows:
            print(f"{gb:6.2f} {label:44} {wall:8.2f} {wall / cp_wall:6.2f} {rss:12.0f}", flush=True)
        for path in OUT.iterdir():  # outputs go; the generated sources stay for the next run
            if not path.name.startswith("llm-"):
                path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
