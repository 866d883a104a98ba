"""Fault campaign, part three: damage aimed at the fields the readers trust (lengths, offsets,
counts, byte orders, nesting), run through the command line the way a user runs it.

``bench_faults.py`` damages bytes at random and calls the library in its own process. This one
places each damage where a reader reads a number or a structure: a cut at many points, flips in
the header, extreme values (2**63-1, 2**64-1, -1, 2**31) written over every aligned word of the
header, zip size/offset/count fields, safetensors and npy header fields, protobuf varints,
deeply nested JSON. The seeds are written by the formats' own libraries or by the byte-exact
writers of ``tests/`` (legacy GGML, TFLite, Keras, DeepSpeed). Each mutant goes through
``modelport inspect --json``, ``scan --json`` and ``convert`` to safetensors in a worker
process with its address space capped; a verdict is one of:

* ``ok``: the command finished, or failed with a typed ``ModelportError``;
* ``untyped``: any other exception (the CLI would call it an internal error);
* ``described``: an ``OSError``, ``RecursionError`` or ``MemoryError``, which the CLI words but
  which say a reader trusted a number or a depth it should have bounded;
* ``hang`` (past ``--timeout``), ``crash`` (the worker died), ``memory`` (peak RSS rose more
  than ``MEMORY_LIMIT_MB`` over the worker's warm baseline);
* ``partial``: a failed convert left a file in its empty output folder;
* ``safe-unread``: scan called the file safe although inspect could not read it.

Run from the repository root: ``python -m benchmarks.bench_reader_mutants [--formats a,b]
[--mutants 200] [--timeout 20]``; ``--show N`` prints N examples of each finding.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
import torch
from benchmarks.bench_faults import SEEDS
from tests.formats.test_ggml import write_ggjt_v3, write_gpt2
from tests.formats.test_keras import write_keras
from tests.formats.test_tflite import small_model
from tests.test_deepspeed_zero import BUFFERS, checkpoint_root, groups_of, write_stage12

MEMORY_LIMIT_MB = 500
WORD_VALUES = (
    struct.pack("<Q", 2**63 - 1),
    struct.pack("<Q", 2**64 - 1),
    struct.pack("<q", -(2**62)),
    struct.pack("<I", 2**31),
    struct.pack("<I", 2**32 - 1),
    struct.pack("<I", 0),
)

# -- seeds --------------------------------------------------------------------------------------
Seed = Callable[[Path], Path]  # writes into a fresh folder, returns the path to open


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "embed.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "head.weight": rng.standard_normal((4, 8)).astype(np.float16),
        "steps": np.arange(5, dtype=np.int64),
    }


def _from_bench_faults(name: str) -> Seed:
    filename, write = SEEDS[name]

    def seed(folder: Path) -> Path:
        write(folder / filename, _weights())
        return folder / filename

    return seed


def _written_by(write: Callable[[Path], object], filename: str) -> Seed:
    """A seed that is one file a test suite's builder writes."""

    def seed(folder: Path) -> Path:
        write(folder / filename)
        return folder / filename

    return seed


def _onnx_external(folder: Path) -> Path:
    SEEDS["onnx"][1](folder / "plain.onnx", _weights())
    model = onnx.load(str(folder / "plain.onnx"))
    (folder / "plain.onnx").unlink()
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)  # fmt: skip
    return folder / "model.onnx"


def _hdf5_chunked(folder: Path) -> Path:
    """Chunked and deflated, so a B-tree and a filter pipeline are there to damage."""
    with h5py.File(folder / "chunked.h5", "w") as handle:
        values = np.arange(2400, dtype=np.float32).reshape(24, 100)
        handle.create_dataset("layer/kernel", data=values, chunks=(4, 50), compression="gzip")
        handle.create_dataset("layer/bias", data=values[0], chunks=(25,), shuffle=True)
    return folder / "chunked.h5"


def _torchscript(folder: Path) -> Path:
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    scripted: Any = torch.jit.script(module)
    scripted.save(str(folder / "scripted.pt"))
    return folder / "scripted.pt"


def _deepspeed(folder: Path) -> Path:
    groups = groups_of([[(3, 4), (4,)], [(2, 3)]])
    write_stage12(folder / "global_step4", groups, 2, buffers=BUFFERS)
    return checkpoint_root(folder)


SEED_WRITERS: dict[str, Seed] = {
    "safetensors": _from_bench_faults("safetensors"),
    "gguf": _from_bench_faults("gguf"),
    "ggjt": _written_by(write_ggjt_v3, "model.bin"),
    "ggml-gpt2": _written_by(write_gpt2, "gpt2.bin"),
    "onnx": _from_bench_faults("onnx"),
    "onnx-external": _onnx_external,
    "hdf5": _from_bench_faults("hdf5"),
    "hdf5-chunked": _hdf5_chunked,
    "keras": _written_by(write_keras, "model.keras"),
    "tflite": _written_by(small_model, "model.tflite"),
    "npy": _from_bench_faults("npy"),
    "npz": _from_bench_faults("npz"),
    "torch-zip": _from_bench_faults("torch-zip"),
    "torchscript": _torchscript,
    "deepspeed": _deepspeed,
}

WHOLE = {
    "hdf5",
    "hdf5-chunked",
    "keras",
    "tflite",
}  # numbers trusted anywhere in the file, not in a header
# -- mutations ----------------------------------------------------------------------------------
Mutation = tuple[str, bytes]


def _cuts(data: bytes, count: int) -> Iterator[Mutation]:
    points = sorted({*range(0, min(len(data), 64), 4), *np.linspace(0, len(data) - 1, count)})
    for at in list(points)[: count + 16]:
        yield f"cut@{int(at)}", data[: int(at)]


def _header_words(data: bytes, rng: random.Random, count: int, span: int) -> Iterator[Mutation]:
    reach = max(4, min(len(data), span) - 8)
    for _ in range(count):
        at = rng.randrange(0, reach, 4)
        value = rng.choice(WORD_VALUES)
        yield f"word@{at}={value.hex()}", data[:at] + value + data[at + len(value) :]


def _flips(data: bytes, rng: random.Random, count: int, span: int) -> Iterator[Mutation]:
    for _ in range(count):
        damaged = bytearray(data)
        at = rng.randrange(min(len(data), span))
        damaged[at] ^= 1 << rng.randrange(8)
        yield f"flip@{at}", bytes(damaged)


def _zip_fields(data: bytes) -> Iterator[Mutation]:
    """Central directory and local header fields: sizes, offsets, name lengths, counts."""
    fields = {"csize": 20, "usize": 24, "namelen": 28, "extralen": 30, "offset": 42}
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        for field, where in fields.items():
            width = 2 if field.endswith("len") else 4
            for value in (b"\xff" * width, b"\x7f" + b"\xff" * (width - 1), b"\x00" * width):
                start = at + where
                yield f"cd@{at}.{field}={value.hex()}", data[:start] + value + data[start + width :]
        at = data.find(b"PK\x01\x02", at + 4)
    end = data.rfind(b"PK\x05\x06")
    if end >= 0:
        for where, width in ((8, 2), (10, 2), (12, 4), (16, 4), (20, 2)):
            for value in (b"\xff" * width, b"\x00" * width):
                start = end + where
                yield f"eocd+{where}={value.hex()}", data[:start] + value + data[start + width :]
    at = data.find(b"PK\x03\x04")
    local = 0
    while at >= 0 and local < 8:
        for where, width in ((18, 4), (22, 4), (26, 2), (28, 2)):
            start = at + where
            yield f"lh@{at}+{where}", data[:start] + b"\xff" * width + data[start + width :]
        at, local = data.find(b"PK\x03\x04", at + 4), local + 1


def _zip_members(data: bytes) -> Iterator[Mutation]:
    """Rewritten members: byte order and version records, and nested JSON configs."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: archive.read(info) for info in archive.infolist()}
    except (zipfile.BadZipFile, ValueError):
        return
    swaps: dict[str, list[bytes]] = {
        "byteorder": [b"big", b"middle", b"\x00" * 9, b"little" * 1000],
        "version": [b"99999999999999999999999", b"-1", b"\xff\xfe", b"3" * 5000, b""],
        ".data/version": [b"99999999999999999999999", b"-1", b"abc"],
        "config.json": [b"[" * 100000 + b"]" * 100000, b'{"a":' * 50000 + b"1" + b"}" * 50000],
        "metadata.json": [b"[" * 100000, b"\xff" * 10],
        ".py": [b"x = " + b"a." * 150000 + b"b\n", b"x = " + b"(" * 99999 + b")" * 99999 + b"\n"],
    }
    for name in members:
        for suffix, values in swaps.items():
            if not name.endswith(suffix):
                continue
            for value in values:
                buffer = io.BytesIO()
                with zipfile.ZipFile(buffer, "w") as out:
                    for other, content in members.items():
                        out.writestr(other, value if other == name else content)
                yield f"member {name}={value[:12]!r}", buffer.getvalue()
    names = list(members)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for name in names:
            out.writestr(name, members[name])
        out.writestr(names[0], b"duplicate")
    yield "duplicate member", buffer.getvalue()


def rebuilt_raw(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def _safetensors_fields(data: bytes) -> Iterator[Mutation]:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    first = next(k for k in header if k != "__metadata__")

    def rebuilt(changed: dict[str, Any]) -> bytes:
        raw = json.dumps(changed).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    for offsets in ([0, 2**63 - 1], [2**64, 2**64 + 4], [-8, 0], [8, 0], [0, len(body) + 64],
                    [len(body), len(body) + 4], [0, 4], [1.5, 8], ["0", "8"]):  # fmt: skip
        changed = json.loads(json.dumps(header))
        changed[first]["data_offsets"] = offsets
        yield f"data_offsets={offsets}", rebuilt(changed)
    for shape in ([2**62, 2**62], [-1], [2**31] * 4, [0] * 10000, [1.5], "ab"):
        changed = json.loads(json.dumps(header))
        changed[first]["shape"] = shape
        yield f"shape={str(shape)[:20]}", rebuilt(changed)
    for dtype in ("F4", "", 7, "U8" * 100):
        changed = json.loads(json.dumps(header))
        changed[first]["dtype"] = dtype
        yield f"dtype={str(dtype)[:10]}", rebuilt(changed)
    deep = "[" * 100000 + "1" + "]" * 100000
    meta = json.dumps({**header, "__metadata__": {"x": "@"}}).encode()
    yield "nested __metadata__", rebuilt_raw(meta.replace(b'"@"', deep.encode()), body)
    entry = json.dumps({**header, first: "@"}).encode()
    yield "nested entry", rebuilt_raw(entry.replace(b'"@"', deep.encode()), body)
    yield "nested raw", rebuilt_raw(b"[" * 200000 + b"]" * 200000, body)
    for value in (2**63 - 1, 2**64 - 1, len(data) - 7, 1, 0):
        yield f"header_len={value}", struct.pack("<Q", value) + data[8:]


def _npy_fields(data: bytes) -> Iterator[Mutation]:
    header_len = struct.unpack("<H", data[8:10])[0]
    start = 10 + header_len

    def with_header(text: str) -> bytes:
        raw = text.encode("latin1")
        raw += b" " * (-(12 + len(raw) + 1) % 64) + b"\n"
        if len(raw) < 65536:
            return data[:8] + struct.pack("<H", len(raw)) + raw + data[start:]
        return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(raw)) + raw + data[start:]

    for shape in ("(4611686018427387904, 4)", "(-1,)", "(2147483648, 2147483648)",
                  "(" + "1, " * 40000 + ")", "((),)", "(1.5,)"):  # fmt: skip
        yield (
            f"shape={shape[:20]}",
            with_header(f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"),
        )
    for descr in ("'<f9'", "'|O'", "'<U2147483647'", "[('a', '<f4')] * 3", "'V4294967296'",
                  "[" * 5000 + "]" * 5000):  # fmt: skip
        yield (
            f"descr={descr[:20]}",
            with_header(f"{{'descr': {descr}, 'fortran_order': False, 'shape': (16, 8), }}"),
        )
    yield "header_len=65535", data[:8] + b"\xff\xff" + data[10:]
    yield "v2 header_len=2**32-1", b"\x93NUMPY\x02\x00" + b"\xff\xff\xff\xff" + data[10:]


def _varints(data: bytes, rng: random.Random, count: int) -> Iterator[Mutation]:
    """Protobuf lengths: a ten-byte varint of 2**63-1 or 2**64-1 over a byte in the message."""
    huge = (b"\xff" * 8 + b"\x7f", b"\xff" * 9 + b"\x01", b"\x80" * 11)
    for _ in range(count):
        at = rng.randrange(len(data))
        value = rng.choice(huge)
        yield f"varint@{at}", data[:at] + value + data[at + 1 :]


def _onnx_external_fields(data: bytes) -> Iterator[Mutation]:
    """The ``external_data`` records: offsets and lengths past the file, huge or negative,
    locations that leave the folder or name nothing."""
    edits = [("offset", str(2**63 - 1)), ("offset", "-8"), ("offset", "100000"),
             ("length", str(2**63 - 1)), ("length", "-1"), ("length", "4"), ("length", "x"),
             ("offset", "0"), ("location", "missing.bin"), ("location", "../../outside.bin"),
             ("location", "/etc/hostname"), ("location", ""), ("location", "."),
             ("checksum", "0" * 40)]  # fmt: skip
    for key, value in edits:
        model = onnx.load_from_string(data)
        for tensor in model.graph.initializer:
            entries = {e.key: e for e in tensor.external_data}
            if key in entries:
                entries[key].value = value
            else:
                tensor.external_data.add(key=key, value=value)
        yield f"external {key}={value[:20]}", model.SerializeToString()


def mutants(name: str, filename: str, data: bytes, count: int, seed: int) -> list[Mutation]:
    """About ``count`` damages placed by the seed, plus every rewritten zip member."""
    rng = random.Random(f"{name}:{filename}:{seed}")
    made: list[Mutation] = list(_cuts(data, count // 4))
    made += _header_words(data, rng, count // 4, len(data) if name in WHOLE else 1024)
    made += _flips(data, rng, count // 8, 512)
    if data[:4] == b"PK\x03\x04":
        made += _zip_fields(data)
    if name == "safetensors":
        made += _safetensors_fields(data)
    if data[:6] == b"\x93NUMPY":
        made += _npy_fields(data)
    if filename.endswith(".onnx"):
        made += _varints(data, rng, count // 4)
    if filename.endswith(".onnx") and b"weights.bin" in data:
        made += _onnx_external_fields(data)
    sampled = made if len(made) <= count else rng.sample(made, count)
    return sampled + (list(_zip_members(data)) if data[:4] == b"PK\x03\x04" else [])


# -- the worker ---------------------------------------------------------------------------------
class Worker:
    """The worker process; started again after a hang, a crash or a memory finding."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.process: subprocess.Popen[str] | None = None
        self.baseline = 0

    def run(self, argv: list[str]) -> dict[str, Any]:
        if self.process is None:
            self._start()
        assert self.process is not None and self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(argv) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        line = self.process.stdout.readline() if ready else ""
        if not ready or not line:
            self.close()
            detail = f"no answer in {self.timeout:.0f} s" if not ready else "the worker died"
            return {"verdict": "hang" if not ready else "crash", "detail": detail, "out": ""}
        answer: dict[str, Any] = json.loads(line)
        if answer["rss"] - self.baseline > MEMORY_LIMIT_MB:
            answer["verdict"], answer["detail"] = "memory", f"peak {answer['rss']} MB"
            self.close()
        return answer

    def warm(self, argvs: list[list[str]]) -> None:
        for argv in argvs:
            self.baseline = max(self.baseline, self.run(argv).get("rss", 0))

    def _start(self) -> None:
        command = [sys.executable, "-m", "benchmarks.mutant_worker"]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                 "MODELPORT_DEBUG": "1", "HOME": tempfile.gettempdir()},
        )  # fmt: skip

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


# -- the campaign -------------------------------------------------------------------------------
def _commands(target: Path, out: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", "--json", str(target)],
        "scan": ["scan", "--json", str(target)],
        "convert": ["convert", str(target), str(out / "out.safetensors")],
    }


def _mutated_files(seed_root: Path) -> list[Path]:
    """The files a mutant damages: each file of the seed folder."""
    return sorted(p for p in seed_root.rglob("*") if p.is_file() and p.stat().st_size > 64)


def run_format(
    name: str, count: int, seed: int, work: Path, worker: Worker
) -> tuple[Counter[str], list[str]]:
    seed_root = work / "seed"
    seed_root.mkdir()
    opened = SEED_WRITERS[name](seed_root)
    out = work / "out"
    out.mkdir()
    worker.warm(list(_commands(opened, out).values()))
    shutil.rmtree(out)
    tally: Counter[str] = Counter()
    findings: list[str] = []
    files = _mutated_files(seed_root)
    for file in files:
        pristine = file.read_bytes()
        for label, damaged in mutants(name, file.name, pristine, count // len(files), seed):
            copy = work / "mutant"
            shutil.copytree(seed_root, copy)
            (copy / file.relative_to(seed_root)).write_bytes(damaged)
            target = copy / opened.relative_to(seed_root)
            where = f"{file.name} {label}"
            _one(target, copy / "out", where, tally, findings, worker)
            shutil.rmtree(copy)
    return tally, findings


def _one(
    target: Path, out: Path, where: str, tally: Counter[str], findings: list[str], worker: Worker
) -> None:
    out.mkdir()
    tally["mutants"] += 1
    answers = {step: worker.run(argv) for step, argv in _commands(target, out).items()}
    for step, answer in answers.items():
        tally[f"~{step} {answer['detail'].split(':')[0]}"] += 1
        if answer["verdict"] != "ok":
            tally[f"{step}:{answer['verdict']}"] += 1
            findings.append(f"{step} {answer['verdict']} [{where}] {answer['detail']}")
            print(f"  ! {findings[-1]}"[:300], file=sys.stderr, flush=True)
    if not answers["convert"]["detail"].startswith("exit 0") and any(out.iterdir()):
        tally["convert:partial"] += 1
        findings.append(f"convert partial [{where}] {[p.name for p in out.iterdir()]}")
    inspect_failed = not answers["inspect"]["detail"].startswith("exit 0")
    if inspect_failed and answers["scan"]["detail"] == "exit 0":  # exit 0: every file safe
        tally["scan:safe-unread"] += 1
        findings.append(f"scan safe-unread [{where}] {answers['inspect']['detail'][:120]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(SEED_WRITERS))
    parser.add_argument("--mutants", type=int, default=200, help="per format, about")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0, help="varies the random placements")
    parser.add_argument("--show", type=int, default=3, help="examples per finding kind")
    args = parser.parse_args()
    started = time.process_time()
    wall = time.perf_counter()
    total = 0
    with tempfile.TemporaryDirectory(prefix="modelport-mutants-") as tmp:
        for name in args.formats.split(","):
            work = Path(tmp) / name
            work.mkdir()
            runner = Worker(args.timeout)
            tally, findings = run_format(name, args.mutants, args.seed, work, runner)
            runner.close()
            shutil.rmtree(work)
            total += sum(v for k, v in tally.items() if k != "mutants" and k[0] != "~")
            _report(name, tally, findings, args.show)
    print(f"\n{time.perf_counter() - wall:.0f} s wall, {time.process_time() - started:.0f} s CPU")
    return 1 if total else 0


def _report(name: str, tally: Counter[str], findings: list[str], show: int) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(tally.items()) if k[0] not in "m~")
    print(f"{name}: {tally['mutants']} mutants; {counts or 'no findings'}", flush=True)
    outcomes = ", ".join(f"{k[1:]} {v}" for k, v in sorted(tally.items()) if k[0] == "~")
    print(f"  outcomes: {outcomes}", flush=True)
    seen: Counter[str] = Counter()
    for line in findings:
        kind = " ".join(line.split()[:2]) + line.rsplit("]", 1)[-1][:60]
        seen[kind] += 1
        if seen[kind] <= show:
            print(f"  {line}"[:400], flush=True)


if __name__ == "__main__":
    sys.exit(main())
