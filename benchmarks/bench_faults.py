"""Fault campaign, part one: thousands of damaged files per format through open, scan and
convert, counted by outcome.

Each seed is written by its format's own library (torch, safetensors, numpy, gguf-py, onnx,
h5py, joblib) in a small config; each mutant is the seed with one seeded damage: bytes
flipped, a field overwritten with an extreme value, a cut, an insertion, a span deleted or
repeated. For every mutant, in this process (so a crash is seen as a crash):

* open + read every tensor: a typed error (``ModelportError``) or the file whole; anything
  else is an untyped error, and a mutant that runs past the time limit a hang;
* scan: its verdict, and untyped errors;
* convert to safetensors: written and verified, or a typed error; files left beside the
  target after a failed convert are counted; the input's bytes are checked unchanged.

Run: ``python benchmarks/bench_faults.py [--mutants 300] [--seed 0] [--formats a,b]``.
Part two (signals, a full disk, read-only targets, concurrent runs, sources changed during a
run) is ``benchmarks/bench_process_faults.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import numpy as np

import modelport
from modelport.conversion.options import ConvertOptions
from modelport.errors import ModelportError

TIME_LIMIT_S = 10


class Hang(Exception):
    """A mutant ran past ``TIME_LIMIT_S``."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "embed.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "block.0.attn.weight": rng.standard_normal((8, 8)).astype(np.float16),
        "block.0.attn.bias": rng.standard_normal(8).astype(np.float32),
        "block.0.norm.weight": np.ones(8, np.float32),
        "head.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "steps": np.arange(5, dtype=np.int64),
    }


def _seed_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(path), metadata={"format": "pt"})


def _seed_torch_zip(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import torch

    checkpoint = {
        "epoch": 3,
        "model_state_dict": {k: torch.from_numpy(v) for k, v in arrays.items()},
        "loss": 0.25,
    }
    torch.save(checkpoint, path)


def _seed_torch_legacy(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import torch

    state = {k: torch.from_numpy(v) for k, v in arrays.items()}
    torch.save(state, path, _use_new_zipfile_serialization=False)


def _seed_npy(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.save(handle, arrays["embed.weight"])


def _seed_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _seed_npz_compressed(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def _seed_joblib(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import joblib

    joblib.dump(arrays, path)


def _seed_gguf(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 1)
    for name, array in arrays.items():
        if array.dtype != np.int64:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _seed_onnx(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = arrays["head.weight"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(arrays["steps"], "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def _seed_hdf5(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import h5py

    with h5py.File(path, "w") as handle:
        for name, array in arrays.items():
            handle.create_dataset(name.replace(".", "/"), data=array)


SEEDS: dict[str, tuple[str, Callable[[Path, dict[str, np.ndarray]], None]]] = {
    "safetensors": ("model.safetensors", _seed_safetensors),
    "torch-zip": ("checkpoint.pt", _seed_torch_zip),
    "torch-legacy": ("legacy.pt", _seed_torch_legacy),
    "npy": ("array.npy", _seed_npy),
    "npz": ("arrays.npz", _seed_npz),
    "npz-compressed": ("compressed.npz", _seed_npz_compressed),
    "joblib": ("weights.joblib", _seed_joblib),
    "gguf": ("model.gguf", _seed_gguf),
    "onnx": ("model.onnx", _seed_onnx),
    "hdf5": ("weights.h5", _seed_hdf5),
}

_EXTREMES = (
    b"\x00" * 8,
    b"\xff" * 8,
    struct.pack("<q", 2**62),
    struct.pack("<q", -1),
    struct.pack("<I", 2**31),
    b"\x7f\xff\xff\xff",
)


def mutate(seed: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One damage, chosen and placed by ``rng``: the kind's name and the damaged bytes."""
    data = bytearray(seed)
    kind = rng.choice(("flip", "extreme", "cut", "insert", "delete", "repeat"))
    at = rng.randrange(len(data))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "extreme":
        value = rng.choice(_EXTREMES)
        data[at : at + len(value)] = value
    elif kind == "cut":
        del data[at:]
    elif kind == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "delete":
        del data[at : at + rng.randint(1, 64)]
    else:
        span = bytes(data[at : at + rng.randint(1, 256)])
        data[at:at] = span
    return kind, bytes(data)


class Tally:
    """Outcome counts of one format's mutants."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.untyped: list[str] = []

    def note(self, key: str) -> None:
        self.counts[key] += 1

    def untyped_error(self, step: str, exc: BaseException, kind: str) -> None:
        self.counts[f"{step}:untyped"] += 1
        if len(self.untyped) < 5:
            self.untyped.append(f"{step} ({kind}): {type(exc).__name__}: {exc}"[:200])


def _open_and_read(path: Path, tally: Tally, kind: str) -> None:
    try:
        with time_limit(TIME_LIMIT_S), modelport.open(path) as model:
            for ref in dict(model.tensors).values():
                ref.numpy()
        tally.note("open:whole")
    except Hang:
        tally.note("open:hang")
    except ModelportError:
        tally.note("open:typed")
    except Exception as exc:
        tally.untyped_error("open", exc, kind)


def _scan(path: Path, tally: Tally, kind: str) -> None:
    try:
        with time_limit(TIME_LIMIT_S):
            verdict = modelport.scan(path).verdict
        tally.note(f"scan:{verdict}")
    except Hang:
        tally.note("scan:hang")
    except Exception as exc:
        tally.untyped_error("scan", exc, kind)


def _convert(path: Path, out_dir: Path, tally: Tally, kind: str) -> None:
    target = out_dir / "out.safetensors"
    options = ConvertOptions(
        take_all=True, drop_unrepresentable=True, allow_unsafe=True, overwrite=True
    )
    try:
        with time_limit(TIME_LIMIT_S):
            modelport.convert(path, target, options)
        tally.note("convert:verified")
    except Hang:
        tally.note("convert:hang")
    except ModelportError:
        tally.note("convert:typed")
        if target.exists():
            tally.note("convert:partial-output")
    except Exception as exc:
        tally.untyped_error("convert", exc, kind)
    left = [p.name for p in out_dir.iterdir() if p.name != "out.safetensors"]
    if left:
        tally.note("convert:files-left")
    for stray in out_dir.iterdir():
        stray.unlink()


def run_format(name: str, mutants: int, seed: int, work: Path) -> Tally:
    filename, write_seed = SEEDS[name]
    seed_path = work / f"seed-{filename}"
    write_seed(seed_path, _weights(np.random.default_rng(seed)))
    pristine = seed_path.read_bytes()
    rng = random.Random(f"{name}:{seed}")
    tally = Tally()
    mutant_path, out_dir = work / filename, work / "out"
    out_dir.mkdir(exist_ok=True)
    for _ in range(mutants):
        kind, damaged = mutate(pristine, rng)
        mutant_path.write_bytes(damaged)
        before = hashlib.sha256(damaged).digest()
        _open_and_read(mutant_path, tally, kind)
        _scan(mutant_path, tally, kind)
        _convert(mutant_path, out_dir, tally, kind)
        if hashlib.sha256(mutant_path.read_bytes()).digest() != before:
            tally.note("input-changed")
    return tally


_COLUMNS = (
    ("open whole", "open:whole"),
    ("open typed", "open:typed"),
    ("open untyped", "open:untyped"),
    ("scan safe", "scan:safe"),
    ("scan susp.", "scan:suspicious"),
    ("scan unsafe", "scan:unsafe"),
    ("scan error", "scan:error"),
    ("scan untyped", "scan:untyped"),
    ("conv. ok", "convert:verified"),
    ("conv. typed", "convert:typed"),
    ("conv. untyped", "convert:untyped"),
)
_NEVER = ("open:hang", "scan:hang", "convert:hang", "convert:files-left", "input-changed")


def print_table(results: dict[str, Tally], mutants: int, seconds: float) -> None:
    header = ["format", *(label for label, _ in _COLUMNS), "hangs", "left", "changed"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, tally in results.items():
        c = tally.counts
        hangs = c["open:hang"] + c["scan:hang"] + c["convert:hang"]
        cells = [name, *(str(c[key]) for _, key in _COLUMNS)]
        cells += [str(hangs), str(c["convert:files-left"]), str(c["input-changed"])]
        print("| " + " | ".join(cells) + " |")
    total = sum(len(results) * [mutants])
    bad = sum(t.counts[k] for t in results.values() for k in _NEVER)
    untyped = sum(c for t in results.values() for k, c in t.counts.items() if "untyped" in k)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\n{total:,} mutants in {seconds:.0f} s; untyped errors: {untyped}; hangs, files "
        f"left and inputs changed: {bad}; peak RSS of the whole run {peak:.0f} MB"
    )
    for name, tally in results.items():
        for line in tally.untyped:
            print(f"  {name}: {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=300, help="per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default=",".join(SEEDS), help="comma-separated")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    results: dict[str, Tally] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modelport-faults-") as tmp:
        for name in args.formats.split(","):
            work = Path(tmp) / name
            work.mkdir()
            results[name] = run_format(name, args.mutants, args.seed, work)
            shutil.rmtree(work)
            print(f"{name}: done", file=sys.stderr, flush=True)
    print_table(results, args.mutants, time.perf_counter() - started)
    untyped = sum(c for t in results.values() for k, c in t.counts.items() if "untyped" in k)
    return 1 if untyped else 0


if __name__ == "__main__":
    sys.exit(main())
