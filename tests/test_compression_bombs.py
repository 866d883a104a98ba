"""Compressed streams are scanned in bounded time and memory: a few KB that inflate to
gigabytes stop at ``limits.MAX_INFLATION_RATIO`` times their size (or
``limits.MIN_INFLATION_ALLOWANCE``) with an error naming that limit, while real joblib dumps,
which compress a few times, still scan. Each bomb is scanned in a child process under an
address-space limit: a scan that held the whole inflated stream would die or crawl there."""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import json
import lzma
import pickle
import pickletools
import resource
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pytest

import modelport
from modelport import limits

# what the child process may map: the interpreter, numpy and modelport take a few hundred MB
ADDRESS_SPACE = 1536 << 20
BLOCK = bytes(1 << 20)  # one stream's worth of zeros; streams of one kind follow each other

_CHILD = """
import json, sys, time
import modelport
from modelport import limits
if len(sys.argv) > 2:
    limits.MIN_INFLATION_ALLOWANCE = int(sys.argv[2])
started = time.process_time()
report = modelport.scan(sys.argv[1])
print(json.dumps({
    "verdict": report.verdict,
    "messages": [f.message for f in report.files[0].findings],
    "cpu_s": time.process_time() - started,
    # this process's own peak: ru_maxrss would carry the parent's over from before exec
    "peak_mb": next(
        int(line.split()[1]) >> 10
        for line in open("/proc/self/status")
        if line.startswith("VmHWM:")
    ),
}))
"""


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@dataclass(frozen=True)
class ChildScan:
    """What the child's scan gave, and what it cost."""

    verdict: str
    messages: list[str]
    cpu_s: float
    peak_mb: int


def scan_bounded(path: Path, allowance: int | None = None) -> ChildScan:
    """The scan of ``path`` in a child that may map only ``ADDRESS_SPACE`` bytes, with
    ``limits.MIN_INFLATION_ALLOWANCE`` set to ``allowance`` if given."""
    extra = [] if allowance is None else [str(allowance)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_address_space,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return ChildScan(**json.loads(done.stdout))


def alone(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_ALONE)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "bz2": bz2.compress,
    "xz": lzma.compress,
    "lzma": alone,
    "gzip": lambda data: gzip.compress(data, 9),
    "zlib": lambda data: zlib.compress(data, 9),
}
# what each reference reader makes of the same bytes: every stream, one after another
REFERENCE: dict[str, Callable[[bytes], bytes]] = {
    "bz2": bz2.decompress,
    "xz": lzma.decompress,
    "lzma": lzma.decompress,
    "gzip": gzip.decompress,
}


def bomb(compress: Callable[[bytes], bytes], prefix: bytes, suffix: bytes, count: int) -> bytes:
    """``prefix``, ``count`` blocks of zeros, ``suffix``, as streams of one kind back to back
    (the zeros compressed once, repeated): KBs on disk."""
    return compress(prefix) + _zeros(compress) * count + compress(suffix)


@functools.cache
def _zeros(compress: Callable[[bytes], bytes]) -> bytes:
    return compress(BLOCK)


def giant_bytes_pickle(size: int) -> tuple[bytes, bytes]:
    """The opening and closing of one pickled bytes object of ``size`` zeros."""
    return b"\x80\x04\x8e" + struct.pack("<Q", size), b"."


# deflate tops out near 1032:1, so its bombs are larger files of fewer blocks
BLOCKS = {"bz2": 1600, "xz": 1600, "lzma": 1600, "gzip": 256, "zlib": 256}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_a_bytes_object_of_zeros_stops_at_the_ratio(tmp_path: Path, kind: str) -> None:
    compress, count = COMPRESSORS[kind], BLOCKS[kind]
    prefix, suffix = giant_bytes_pickle(count * len(BLOCK))
    if kind in REFERENCE:  # the reference reader reads such streams as one (two blocks here)
        small = giant_bytes_pickle(2 * len(BLOCK))
        assert REFERENCE[kind](bomb(compress, *small, 2)) == small[0] + BLOCK * 2 + small[1]
    data = bomb(compress, prefix, suffix, count)
    path = tmp_path / "model.joblib"
    path.write_bytes(data)
    allowance = 8 << 20  # the ratio alone decides, in less time than the default allowance
    cap = max(allowance, len(data) * limits.MAX_INFLATION_RATIO)
    assert cap * 3 < count * len(BLOCK)
    result = scan_bounded(path, allowance)
    assert result.verdict == "error", result
    (message,) = result.messages
    assert "MAX_INFLATION_RATIO" in message and "decompress a file you trust" in message
    assert result.peak_mb < (cap >> 20) + 200, result  # the cap and one chunk, no more
    assert result.cpu_s < 5, result


def test_a_run_of_zeros_in_bz2_stops_at_the_ratio(tmp_path: Path) -> None:
    """The shape first reported: a joblib-named bz2 file of nothing but zeros (1.6 GB)."""
    path = tmp_path / "model.joblib"
    path.write_bytes(_zeros(bz2.compress) * 1600)
    assert path.stat().st_size < 100_000
    result = scan_bounded(path)  # at the default limits
    assert result.verdict == "error", result
    assert "MAX_INFLATION_RATIO" in str(result.messages)
    assert result.peak_mb < 400, result


def test_joblib_old_zfile_declaring_gigabytes_is_refused_at_once(tmp_path: Path) -> None:
    """joblib < 0.10's ``ZF`` header declares the inflated length: past the cap, nothing
    is inflated (joblib's read_zfile allocates what the header says)."""
    path = tmp_path / "model.pkl"
    declared = f"{8 << 30:#x}".ljust(19).encode()
    path.write_bytes(b"ZF" + declared + zlib.compress(b"\x80\x02N."))
    report = modelport.scan(path)
    assert report.verdict == "error"
    assert "declared size" in report.files[0].findings[0].message


def test_streams_that_follow_one_another_are_all_judged(tmp_path: Path, marker: Path) -> None:
    """A pickle split across two gzip members, the first longer than one inflated chunk:
    gzip (and joblib's reader) read on into the second, where the call is."""
    opening = b"\x80\x04\x8e" + struct.pack("<Q", 3 << 20) + bytes(3 << 20) + b"0"
    call = b"cos\nsystem\n\x8c" + bytes([len(f"touch {marker}")])
    call += f"touch {marker}".encode() + b"\x85R."
    data = gzip.compress(opening) + gzip.compress(call)
    stream = gzip.decompress(data)
    assert stream == opening + call
    assert ("GLOBAL", "os system") in [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]
    path = tmp_path / "model.joblib"
    path.write_bytes(data)
    report = modelport.scan(path)
    assert report.verdict == "unsafe", report.to_json()
    assert any(f.global_name == "os.system" for f in report.files[0].findings)
    assert not marker.exists()


JOBLIB_METHODS = ["zlib", "gzip", "bz2", "xz", "lzma"]


@pytest.mark.parametrize("method", JOBLIB_METHODS)
def test_a_real_dump_past_the_allowance_scans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Arrays of measurements compress a little: past the allowance, the ratio lets them."""
    monkeypatch.setattr(limits, "MIN_INFLATION_ALLOWANCE", 64 << 10)
    weights = np.random.default_rng(0).standard_normal((300, 300)).astype(np.float32)
    path = tmp_path / "model.joblib"
    joblib.dump({"coef": weights, "classes": np.arange(3)}, path, compress=(method, 3))
    np.testing.assert_array_equal(joblib.load(path)["coef"], weights)
    assert path.stat().st_size * limits.MAX_INFLATION_RATIO > weights.nbytes
    report = modelport.scan(path)
    assert report.verdict == "safe", report.to_json()


@pytest.mark.parametrize("method", ["bz2", "xz"])
def test_a_dump_of_constant_arrays_past_the_allowance_is_not_analysed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """The price of the ratio: a dump joblib reads but that compresses like a bomb is an
    error naming the limit, never a crash, and never a safe verdict."""
    monkeypatch.setattr(limits, "MIN_INFLATION_ALLOWANCE", 64 << 10)
    path = tmp_path / "model.joblib"
    joblib.dump({"mask": np.zeros(1 << 17)}, path, compress=(method, 3))
    assert joblib.load(path)["mask"].shape == (1 << 17,)
    report = modelport.scan(path)
    assert report.verdict == "error"
    assert "MAX_INFLATION_RATIO" in report.files[0].findings[0].message


@pytest.mark.heavy
@pytest.mark.parametrize("compress", [3, ("bz2", 3)], ids=["zlib", "bz2"])
def test_a_large_real_dump_scans_safe(tmp_path: Path, compress: object) -> None:
    """100 MB of weights, past the allowance at the default limits, as joblib writes them."""
    weights = np.random.default_rng(0).standard_normal(25_000_000).astype(np.float32)
    path = tmp_path / "model.joblib"
    joblib.dump({"coef": weights, "name": "big"}, path, compress=compress)
    assert weights.nbytes > limits.MIN_INFLATION_ALLOWANCE
    assert joblib.load(path)["coef"].shape == weights.shape
    report = modelport.scan(path)
    assert report.verdict == "safe", report.to_json()


def test_a_plain_pickle_of_the_same_stream_is_unaffected(tmp_path: Path) -> None:
    """The ratio bounds inflation only: uncompressed bytes are mapped, not inflated."""
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(bytes(limits.MIN_INFLATION_ALLOWANCE + 1), protocol=4))
    assert modelport.scan(path).verdict == "safe"


def _npy_header(count: int) -> bytes:
    header = io.BytesIO()
    spec = {"descr": "<f8", "fortran_order": False, "shape": (count,)}
    np.lib.format.write_array_header_1_0(header, spec)
    return header.getvalue()


def _one_member_zip(
    name: str, deflated: bytes, declared: int, crc: int, method: int = 8, version: int = 20
) -> bytes:
    """A zip of one member compressed by ``method`` (deflate unless said) whose directory
    says it inflates to ``declared``."""
    encoded = name.encode()
    sizes = (crc, len(deflated), declared, len(encoded), 0)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, version, 0, method, 0, 0, *sizes) + encoded
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, method, 0, 0, *sizes, 0, 0, 0, 0, 0
    )
    central += encoded
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(deflated), 0
    )
    return local + deflated + central + end


def deflated_zeros(head: bytes, blocks: int) -> bytes:
    """Raw deflate of ``head`` and ``blocks`` blocks of zeros, each block after the first
    compressed once and repeated (after a sync flush, a block of zeros behind zeros always
    deflates to the same bytes)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = packer.compress(head + BLOCK) + packer.flush(zlib.Z_SYNC_FLUSH)
    again = packer.compress(BLOCK) + packer.flush(zlib.Z_SYNC_FLUSH)
    return first + again * (blocks - 1) + packer.flush()


def test_an_npz_member_inflating_past_its_declared_size_stops_there(tmp_path: Path) -> None:
    """A member whose directory declares a few hundred KB and that inflates to 256 MB:
    zipfile (so numpy.load) stops at the declared size, and so does the scan."""
    header = _npy_header((256 << 20) // 8)
    assert zlib.decompress(deflated_zeros(header, 3), -15) == header + BLOCK * 3
    deflated = deflated_zeros(header, 256)
    path = tmp_path / "weights.npz"
    path.write_bytes(_one_member_zip("a.npy", deflated, len(deflated), 0))
    with pytest.raises((ValueError, OSError, zipfile.BadZipFile)), np.load(path) as archive:
        archive["a"]
    result = scan_bounded(path)
    assert result.verdict == "error", result
    assert any("the directory declares" in m for m in result.messages), result
    assert result.peak_mb < 150, result  # the declared size, not the 256 MB


def test_a_real_compressed_npz_scans_safe(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights, mask = rng.standard_normal((64, 64)), np.zeros(1 << 16)
    path = tmp_path / "weights.npz"
    np.savez_compressed(path, w=weights, mask=mask)
    with np.load(path) as archive:
        np.testing.assert_array_equal(archive["w"], weights)
        np.testing.assert_array_equal(archive["mask"], mask)
    assert modelport.scan(path).verdict == "safe"
