"""Files of a million entries: inspect, scan and convert in seconds, in bounded memory.

Builds three files in a temporary folder, byte by byte (``struct`` and ``json``: the
reference writers take minutes at this count), each holding tiny tensors:

- safetensors with 1.39 M one-element float32 tensors, a header just under the 100 MB that
  the reference library accepts (modelport's cap, 100 MiB, holds ~1.45 M of them);
- ONNX with 10^6 one-element float32 initializers in ``raw_data``;
- npz (a zip64 archive) with 10^6 stored one-element ``.npy`` members.

Then runs each case as a whole process (start-up and imports included, as a user sees them)
and prints wall seconds and peak RSS (``wait4``'s ``ru_maxrss``): the CLI's ``inspect
--json`` and human summary, ``scan``, the Python API's ``inspect`` and ``scan``, and, as the
peer, the reference library's own opening of the same file (``safetensors.safe_open`` and
``keys()``, ``onnx.load``, ``numpy.load`` and each member read). ``--convert`` adds
``convert`` of the safetensors file to safetensors and to a torch zip.

Usage: python benchmarks/bench_many_tensors.py [--only safetensors,onnx,npz] [--convert]
       [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

SAFETENSORS_COUNT = 1_390_000
REFERENCE_HEADER_CAP = 100_000_000  # safetensors' own limit, in bytes
ONNX_COUNT = 1_000_000
NPZ_COUNT = 1_000_000
ONE_FLOAT = struct.pack("<f", 1.0)

PY = sys.executable
CLI = [PY, "-m", "modelport"]
API_INSPECT = "import modelport, sys; modelport.inspect(sys.argv[1])"
API_SCAN = "import modelport, sys; modelport.scan(sys.argv[1])"
PEERS = {
    "safetensors": (
        "safe_open + keys()",
        "import sys\nfrom safetensors import safe_open\n"
        "with safe_open(sys.argv[1], framework='np') as f:\n    n = len(f.keys())",
    ),
    "onnx": ("onnx.load", "import onnx, sys; onnx.load(sys.argv[1])"),
    "npz": (
        "np.load + every member",  # what inspect does: each member's header and array
        "import numpy as np, sys\nwith np.load(sys.argv[1]) as z:\n    for k in z.files: z[k]",
    ),
}


def build_safetensors(path: Path, count: int = SAFETENSORS_COUNT) -> None:
    """``count`` one-element F32 tensors ``w.<i>``, in order, under the reference's cap."""
    parts = [
        f'"w.{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(count)
    ]
    header = ("{" + ",".join(parts) + "}").encode()
    header += b" " * (-len(header) % 8)
    if len(header) > REFERENCE_HEADER_CAP:
        raise SystemExit(f"safetensors header of {len(header):,} bytes passes the cap")
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        handle.write(ONE_FLOAT * count)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def build_onnx(path: Path, count: int = ONNX_COUNT) -> None:
    """A ModelProto (ir_version 8, opset 17) whose graph holds ``count`` initializers
    ``w.<i>``: dims [1], FLOAT, raw_data of 4 bytes, fields in number order as protobuf
    writes them."""
    fixed = b"\x08\x01" + b"\x10\x01"  # dims = [1], data_type = FLOAT
    raw = _len_field(9, ONE_FLOAT)
    tensors = [_len_field(5, fixed + _len_field(8, f"w.{i}".encode()) + raw) for i in range(count)]
    graph = _len_field(2, b"many") + b"".join(tensors)
    opset = _len_field(8, b"\x10\x11")  # version 17
    model = b"\x08\x08" + _len_field(7, graph) + opset
    path.write_bytes(model)


def _npy_member() -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.ones(1, dtype=np.float32))
    return buffer.getvalue()


def build_npz(path: Path, count: int = NPZ_COUNT) -> None:
    """A zip64 archive of ``count`` stored members ``a<i>.npy``, each what ``np.save`` writes
    for a one-element float32 array (written directly: ``zipfile`` takes minutes here)."""
    data = _npy_member()
    crc = zlib.crc32(data)
    date = (0 << 9) | (1 << 5) | 1  # 1980-01-01
    local_parts: list[bytes] = []
    central_parts: list[bytes] = []
    offset = 0
    for i in range(count):
        name = f"a{i}.npy".encode()
        local = struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, date, crc, len(data), len(data),
            len(name), 0,
        )  # fmt: skip
        local_parts.append(local + name + data)
        central_parts.append(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                20,
                20,
                0,
                0,
                0,
                date,
                crc,
                len(data),
                len(data),
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
        offset += len(local) + len(name) + len(data)
    central = b"".join(central_parts)
    zip64_at = offset + len(central)
    zip64_record = struct.pack(
        "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), offset
    )
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, zip64_at, 1)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, len(central), offset, 0)
    with open(path, "wb") as handle:
        handle.writelines(local_parts)
        handle.write(central + zip64_record + locator + end)


BUILDERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "safetensors": ("many.safetensors", build_safetensors),
    "onnx": ("many.onnx", build_onnx),
    "npz": ("many.npz", build_npz),
}


def timed(command: list[str], *, quiet: bool = True) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds, peak RSS (MB) and exit status of one child process (CPU
    time says more than wall time on a machine that other work shares)."""
    start = time.perf_counter()
    sink = subprocess.DEVNULL if quiet else None
    child = subprocess.Popen(command, stdout=sink, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    assert child.stderr is not None
    error = child.stderr.read().decode(errors="replace").strip()
    child.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # 1: scan found something to report, still a verdict
        print(f"    failed ({code}): {error[-400:]}", flush=True)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, code


def cases(kind: str, path: Path, work: Path, convert: bool) -> list[tuple[str, list[str]]]:
    target = str(path)
    found = [
        ("modelport inspect --json", [*CLI, "inspect", "--json", target]),
        ("modelport inspect", [*CLI, "inspect", target]),
        ("modelport scan", [*CLI, "scan", target]),
        ("modelport.inspect()", [PY, "-c", API_INSPECT, target]),
        ("modelport.scan()", [PY, "-c", API_SCAN, target]),
    ]
    if convert and kind == "safetensors":
        for suffix in ("safetensors", "pt"):
            out = str(work / f"converted.{suffix}")
            found.append(
                (f"modelport convert -> .{suffix}", [*CLI, "convert", target, out, "--overwrite"])
            )
    label, code = PEERS[kind]
    found.append((f"peer: {label}", [PY, "-c", code, target]))
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="safetensors,onnx,npz")
    parser.add_argument("--convert", action="store_true", help="also convert the safetensors")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the files in this folder")
    args = parser.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        print(f"{'file':18} {'case':32} {'wall s':>7} {'CPU s':>7} {'peak RSS MB':>12} {'exit':>5}")
        for kind in kinds:
            name, build = BUILDERS[kind]
            path = work / name
            if not path.exists():
                started = time.perf_counter()
                build(path)
                built = time.perf_counter() - started
                print(f"# built {name}: {path.stat().st_size / 1e6:.0f} MB in {built:.0f} s")
            for label, command in cases(kind, path, work, args.convert):
                wall, cpu, rss, code = timed(command)
                print(
                    f"{name:18} {label:32} {wall:7.2f} {cpu:7.2f} {rss:12.0f} {code:5}", flush=True
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
