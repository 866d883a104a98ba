"""modelport convert vs cp vs the usual torch.load + save_file script, same files, one run.

LLM-shaped fp32 state dicts (hidden 1536, MLP 4096, GQA, vocab 32000) of about 1, 2 and 4 GB
are written as torch zip checkpoints. Each case is a whole process; wall time and peak RSS
come from ``wait4`` (RSS counts mapped file pages, as ``/usr/bin/time`` does). Cases:

- ``cp`` of the source (the physical floor: every byte read once and written once);
- the usual script: ``torch.load`` + ``safetensors.torch.save_file`` + reload and compare;
- ``modelport convert`` to every target it writes, verified and ``--no-verify``, and with
  ``--dtype bfloat16``; then the reverse, safetensors -> torch zip.

Write speed on this kind of VM drifts by 2x from one minute to the next, so every case is
paired with a ``cp`` of its own source run just before it, and ``x cp`` is the median of
those ratios. ``cpu x cp`` is the same for the CPU time (user + system, from ``wait4``),
which moves less when other work shares the cores. ``usual/x`` is how many times faster
than the usual script a case is. Run it with bytecode writing on (no
``PYTHONDONTWRITEBYTECODE``), or every start compiles what changed since the last one.

Usage: python benchmarks/bench_convert.py [--sizes 1,2,4] [--repeat 3] [--only TEXT]
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


def run_once(command: list[str], output: Path | None) -> tuple[float, float, float]:
    if output is not None:
        output.unlink(missing_ok=True)
    os.sync()
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def paired(
    command: list[str],
    output: Path,
    source: Path,
    repeat: int,
    reference: tuple[list[str], Path] | None = None,
) -> tuple[float, float, float, float]:
    """Median wall of ``command``, the median of its ratio to ``reference`` (by default
    ``cp`` of ``source``) run just before it each time (write speed here drifts by 2x
    between minutes), and peak RSS. Each output is deleted as soon as it is timed, so that
    neither run starts with the other's 4 GB still in the page cache (left there, ``cp``
    after a conversion took 3x as long as after the usual script). Last, the median ratio
    of their CPU times."""
    copy = OUT / "copy.bin"
    before, before_output = reference or (["cp", str(source), str(copy)], copy)
    run_once(command, output)
    output.unlink(missing_ok=True)
    walls, ratios, peaks, cpu_ratios = [], [], [], []
    for _ in range(repeat):
        reference_wall, _, reference_cpu = run_once(before, before_output)
        before_output.unlink(missing_ok=True)
        wall, rss, cpu = run_once(command, output)
        output.unlink(missing_ok=True)
        walls.append(wall)
        ratios.append(wall / reference_wall)
        cpu_ratios.append(cpu / max(reference_cpu, 1e-3))
        peaks.append(rss)
    output.unlink(missing_ok=True)
    return (
        statistics.median(walls),
        statistics.median(ratios),
        max(peaks),
        statistics.median(cpu_ratios),
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,2,4", help="approximate sizes in GB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="run the cases whose label contains this")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    convert = [sys.executable, "-m", "modelport", "convert"]
    header = f"{'size':>6} {'case':44} {'wall s':>8} {'x cp':>6} {'cpu x cp':>8} {'usual/x':>8}"
    print(f"{header} {'peak RSS MB':>12}")
    for size in (float(s) for s in args.sizes.split(",")):
        layers = max(1, round((size * 1e9 - EMBED) / PER_LAYER))
        source = OUT / f"llm-{size:g}gb.pt"
        if not source.exists():
            build(source, layers)
        gb = source.stat().st_size / 1e9
        usual_out = OUT / "usual.safetensors"
        usual = [sys.executable, "-c", USUAL_SCRIPT, str(source), str(usual_out)]
        usual_wall, usual_ratio, usual_rss, usual_cpu = paired(
            usual, usual_out, source, args.repeat
        )
        rows = [
            (
                "torch.load + save_file + reload/compare",
                usual_wall,
                usual_ratio,
                usual_rss,
                usual_cpu,
            )
        ]
        safetensors_file = OUT / "reverse-source.safetensors"
        subprocess.run([*convert, str(source), str(safetensors_file)], check=True)
        cases = [
            ("modelport -> safetensors", source, "out.safetensors", []),
            ("modelport -> safetensors --no-verify", source, "out.safetensors", ["--no-verify"]),
            (
                "modelport -> safetensors --dtype bfloat16",
                source,
                "bf16.safetensors",
                ["--dtype", "bfloat16"],
            ),
            ("modelport -> torch zip", source, "out.pt", []),
            ("modelport -> npz", source, "out.npz", []),
            ("modelport -> gguf", source, "out.gguf", []),
            ("modelport safetensors -> torch zip", safetensors_file, "reverse.pt", []),
            (
                "modelport safetensors -> torch zip --no-verify",
                safetensors_file,
                "reverse.pt",
                ["--no-verify"],
            ),
        ]
        for label, src, name, extra in cases:
            if args.only not in label:
                continue
            target = OUT / name
            try:
                wall, ratio, rss, cpu_ratio = paired(
                    [*convert, str(src), str(target), *extra], target, src, args.repeat
                )
            except SystemExit as exc:
                print(f"{gb:6.2f} {label:44} skipped: {exc}")
                continue
            rows.append((label, wall, ratio, rss, cpu_ratio))
        for label, wall, ratio, rss, cpu_ratio in rows:
            faster = usual_wall / wall
            print(
                f"{gb:6.2f} {label:44} {wall:8.2f} {ratio:6.2f} {cpu_ratio:8.2f} {faster:8.1f} "
                f"{rss:12.0f}"
            )
        if not args.only:  # the headline, paired with the usual script itself
            target = OUT / "out.safetensors"
            wall, ratio, _, _ = paired(
                [*convert, str(source), str(target)],
                target,
                source,
                args.repeat,
                reference=(usual, usual_out),
            )
            print(
                f"{gb:6.2f} modelport -> safetensors, each run after the usual script: "
                f"{wall:.2f} s, {1 / ratio:.1f}x faster (median of pairs)"
            )
        for path in OUT.iterdir():  # outputs go; the generated sources stay for the next run
            if not path.name.startswith("llm-"):
                path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
