"""Inspect and load, against the reference loaders, on the same files in the same run.

Builds an LLM-shaped fp32 state dict at two sizes (about 40 MB and about 4 GB by default)
as a torch zip checkpoint and as safetensors, then times whole processes (start-up and
imports included, as a user sees them):

- ``modelport.inspect`` on the small and the large file: should cost the same;
- ``modelport.inspect`` vs ``torch.load(mmap=True)`` (which reads no tensor data either);
- load + touch every byte: ``modelport.load`` vs ``torch.load(mmap=True)`` and
  ``safetensors.torch.load_file``, printed as ratios.

Usage: python benchmarks/bench_inspect_load.py [--large-gb 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "bench-output"

TOUCH = (
    "total = 0\n"
    "for t in tensors.values():\n"
    "    total += int(t.reshape(-1).view(torch.uint8)[::4096].sum())\n"
)
MODELPORT_LOAD = "import modelport, sys, torch\ntensors = modelport.load(sys.argv[1])\n" + TOUCH
TORCH_LOAD = "import torch, sys\ntensors = torch.load(sys.argv[1], mmap=True)\n" + TOUCH
ST_LOAD = (
    "import torch, sys\nfrom safetensors.torch import load_file\n"
    "tensors = load_file(sys.argv[1])\n" + TOUCH
)
CASES = {
    "modelport.inspect": "import modelport, sys; modelport.inspect(sys.argv[1])",
    "torch.load(mmap=True)": "import torch, sys; torch.load(sys.argv[1], mmap=True)",
    "modelport.load + touch": MODELPORT_LOAD,
    "safetensors: modelport.load + touch": MODELPORT_LOAD,
    "torch.load(mmap) + touch": TORCH_LOAD,
    "safetensors: load_file + touch": ST_LOAD,
}


def build(path_pt: Path, path_st: Path, layers: int, vocab: int) -> None:
    """A Llama-shaped state dict (hidden 1536, MLP 4096) with ``layers`` layers."""
    code = f"""
import torch
from safetensors.torch import save_file
hidden, mlp, vocab = 1536, 4096, {vocab}
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
torch.save(sd, {str(path_pt)!r})
save_file(sd, {str(path_st)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def timed(code: str, path: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process running ``code``."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(path)])
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"case failed ({status}): {code[:60]}")
    return wall, usage.ru_maxrss / 1024


def median_case(code: str, path: Path, repeat: int) -> tuple[float, float]:
    timed(code, path)  # warm the page cache and imports
    runs = [timed(code, path) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large-gb", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    per_layer_gb = 4 * (2 * 1536 * 1536 + 2 * 512 * 1536 + 3 * 4096 * 1536) / 1e9
    embed_gb = 2 * 4 * 32000 * 1536 / 1e9
    large_layers = max(1, round((args.large_gb - embed_gb) / per_layer_gb))
    sizes = {"small": (0, 3000), "large": (large_layers, 32000)}  # ~37 MB and ~large-gb
    files: dict[str, tuple[Path, Path]] = {}
    for label, (layers, vocab) in sizes.items():
        pt, st = OUT / f"{label}.pt", OUT / f"{label}.safetensors"
        if not pt.exists() or not st.exists():
            print(f"building {label} files ({layers} layers)...", flush=True)
            build(pt, st, layers, vocab)
        files[label] = (pt, st)
    assert resource  # peak RSS comes from wait4 above

    print(f"\n{'case':32} {'file':18} {'size':>9} {'median s':>9} {'peak RSS MB':>12}")
    results: dict[tuple[str, str], float] = {}
    for label, (pt, st) in files.items():
        for case, code in CASES.items():
            path = st if case.startswith("safetensors:") else pt
            wall, rss = median_case(code, path, args.repeat)
            results[case, label] = wall
            size = f"{path.stat().st_size / 1e9:.2f} GB"
            print(f"{case:32} {path.name:18} {size:>9} {wall:9.3f} {rss:12.0f}", flush=True)
        wall, rss = median_case(CASES["modelport.inspect"], st, args.repeat)
        size = f"{st.stat().st_size / 1e9:.2f} GB"
        print(f"{'modelport.inspect':32} {st.name:18} {size:>9} {wall:9.3f} {rss:12.0f}")

    def ratio(case: str, peer: str) -> float:
        return results[case, "large"] / results[peer, "large"]

    size_ratio = results["modelport.inspect", "large"] / results["modelport.inspect", "small"]
    print("\nratios (large file):")
    print(f"  inspect, large / small file: {size_ratio:.2f}x (1.0 = size-independent)")
    inspect_ratio = ratio("modelport.inspect", "torch.load(mmap=True)")
    print(f"  inspect / torch.load(mmap=True): {inspect_ratio:.2f}x (target < 0.33)")
    load_ratio = ratio("modelport.load + touch", "torch.load(mmap) + touch")
    print(f"  modelport.load / torch.load(mmap), all pages touched: {load_ratio:.2f}x")
    st_ratio = ratio("safetensors: modelport.load + touch", "safetensors: load_file + touch")
    print(f"  modelport.load / safetensors load_file, same file: {st_ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
