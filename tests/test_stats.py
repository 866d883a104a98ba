"""Tensor statistics (``modelport.stats``) against numpy on the same values: finite-value
moments, NaN/Inf/zero/subnormal counts, float16/bfloat16 overflow, the power-of-two
histogram; every dtype family, strided views, GGML blocks, tiny chunks and pieces shared
by several threads; the flags; and memory that does not grow with the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

import modelport
from modelport.measuring.stats import measure
from modelport.measuring.stats_records import TensorStats


def special_values(n: int, seed: int = 0) -> np.ndarray:
    """Normal weights with every kind of special value mixed in."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    specials = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -3e-42, 7e4, -1e5, 3.3e38, 1.0]
    x[rng.choice(n, len(specials) * 3, replace=False)] = np.repeat(specials, 3)
    return x


def oracle(values: np.ndarray, stored: np.dtype) -> dict[str, float | int]:
    """What the statistics must say, computed by numpy in float64."""
    wide = values.astype(np.float64).reshape(-1)
    finite = wide[np.isfinite(wide)]
    smallest_normal = float(ml_dtypes.finfo(stored).smallest_normal)
    return {
        "min": finite.min(),
        "max": finite.max(),
        "mean": finite.mean(),
        "std": finite.std(),
        "rms": float(np.sqrt(np.mean(finite**2))),
        "nan": int(np.isnan(wide).sum()),
        "inf": int(np.isinf(wide).sum()),
        "zeros": int((wide == 0).sum()),
        "subnormal": int(((finite != 0) & (np.abs(finite) < smallest_normal)).sum()),
        "over_float16": int((np.abs(finite) > 65504).sum()),
        "over_bfloat16": int(
            (np.abs(finite) > float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)).sum()
        ),
    }


def assert_matches(found: TensorStats, values: np.ndarray, stored: np.dtype) -> None:
    expected = oracle(values, stored)
    assert found.computed, found.note
    for key, value in expected.items():
        got = getattr(found, key)
        if isinstance(value, int):
            assert got == value, key
        else:
            assert got == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert_histogram(found, values)


def assert_histogram(found: TensorStats, values: np.ndarray) -> None:
    """Each non-zero finite value sits in the bin of its power of two (subnormals of the
    type values are carried in, float32 or float64, share the bin under its smallest normal)."""
    wide = values.astype(np.float64).reshape(-1)
    wide = wide[np.isfinite(wide) & (wide != 0)]
    floor = -1023 if found.dtype in ("float64", "int32", "int64") else -127
    exponents = np.maximum(np.frexp(wide)[1] - 1, floor)
    histogram = found.histogram
    assert histogram is not None
    for sign, counts in ((-1, histogram.negative), (1, histogram.positive)):
        side = exponents[np.sign(wide) == sign]
        expected = np.bincount(side - histogram.low, minlength=len(counts))
        assert np.array_equal(np.asarray(counts), expected), sign
    assert sum(histogram.negative) + sum(histogram.positive) == wide.size


def test_float32_matches_numpy_across_chunks_pieces_and_threads(tmp_path: Path) -> None:
    values = special_values(300_001)
    path = tmp_path / "w.safetensors"
    save_numpy({"w": values, "m": values[:300_000].reshape(1000, 300)}, path)
    with modelport.open(path) as model:
        small = {s.name: s for s in measure(model.tensors, threads=4, chunk=4096, piece=65_536)}
        whole = {s.name: s for s in measure(model.tensors, threads=1)}
    assert_matches(small["w"], values, np.dtype(np.float32))
    assert_matches(small["m"], values[:300_000], np.dtype(np.float32))
    for name in ("w", "m"):  # the same sums however the tensor was split
        assert small[name].to_json() == whole[name].to_json()
    assert small["w"].histogram is not None and small["w"].histogram.low == -127


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float64]
)
def test_other_floats_match_numpy(tmp_path: Path, dtype: torch.dtype) -> None:
    source = torch.from_numpy(special_values(20_000, seed=1).astype(np.float64)) * 10
    if dtype in (torch.float8_e4m3fn,):  # no Inf in e4m3fn: a cast makes those NaN
        source = torch.where(source.isinf(), torch.zeros(()).double(), source)
    tensor = source.to(dtype)
    path = tmp_path / "t.safetensors"
    save_file({"t": tensor}, path)
    with modelport.open(path) as model:
        stored = model.tensor("t").numpy()
        (found,) = measure(model.tensors, chunk=1024)
    assert_matches(found, stored, stored.dtype)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.bool_])
def test_integers_and_bools_match_numpy(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(3)
    values = rng.integers(-1000, 1000, 5000).astype(dtype)
    path = tmp_path / "i.safetensors"
    save_numpy({"i": values}, path)
    found = modelport.stats(path).tensor("i")
    assert_matches(found, values, np.dtype(np.float32))
    assert found.subnormal == 0 and found.note == ""


def test_strided_views_are_walked_in_their_own_order(tmp_path: Path) -> None:
    base = torch.from_numpy(special_values(64 * 48, seed=4)).reshape(64, 48)
    path = tmp_path / "strided.pt"
    torch.save({"t": base.t(), "narrow": base[:, 5:9]}, path)
    with modelport.open(path) as model:
        assert not model.tensor("t").is_contiguous
        transposed, narrow = measure(model.tensors, threads=2, chunk=256)
    assert_matches(transposed, base.t().numpy(), np.dtype(np.float32))
    assert_matches(narrow, base[:, 5:9].numpy(), np.dtype(np.float32))


def test_ggml_blocks_are_dequantized_as_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    values = rng.standard_normal((64, 256)).astype(np.float32)
    path = tmp_path / "q.gguf"
    writer = GGUFWriter(str(path), "llama")
    for name, kind in (("q8", GGMLQuantizationType.Q8_0), ("q4", GGMLQuantizationType.Q4_0)):
        writer.add_tensor(name, quantize(values, kind), raw_dtype=kind)
    k_blocks = rng.integers(0, 256, (64, 144), dtype=np.uint8)  # gguf-py cannot make Q4_K
    k_blocks[:, :4] = np.frombuffer(np.array([0.01, 0.001], np.float16).tobytes(), np.uint8)
    writer.add_tensor("k4", k_blocks, raw_dtype=GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with modelport.open(path) as model:
        found = {s.name: s for s in measure(model.tensors, threads=3, chunk=1000, piece=2048)}
    for name, kind in (("q8", GGMLQuantizationType.Q8_0), ("q4", GGMLQuantizationType.Q4_0)):
        expected = dequantize(quantize(values, kind), kind)
        assert_matches(found[name], expected, np.dtype(np.float32))
        assert found[name].note == f"dequantized from {kind.name}"
    assert_matches(found["k4"], dequantize(k_blocks, GGMLQuantizationType.Q4_K), np.float32)


def test_what_cannot_be_measured_says_why(tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save(
        {
            "complex": torch.ones(4, dtype=torch.complex64),
            "meta": torch.empty(3, device="meta"),
            "empty": torch.zeros(0, 5),
            "fine": torch.ones(2),
        },
        path,
    )
    report = modelport.stats(path)
    assert report.tensor("complex").note.startswith("complex values")
    assert report.tensor("meta").note == "saved without data (a meta tensor)"
    assert not report.tensor("complex").computed and not report.tensor("meta").computed
    empty = report.tensor("empty")
    assert empty.computed and empty.min is None and empty.histogram is None
    assert report.tensor("fine").mean == 1.0
    assert (
        json.loads(json.dumps(report.to_json(), allow_nan=False))["tensors"][0]["computed"] is False
    )


def flag_kinds(report: modelport.StatsReport) -> dict[str, set[tuple[str, ...]]]:
    """Each kind of flag raised, with the names of each flag of that kind (sorted)."""
    kinds: dict[str, set[tuple[str, ...]]] = {}
    for flag in report.flags:
        kinds.setdefault(flag.kind, set()).add(tuple(sorted(flag.names)))
    return kinds


def test_flags_name_what_deserves_a_look(tmp_path: Path) -> None:
    torch.manual_seed(0)
    shared = torch.randn(32, 32)
    state = {f"layers.{i}.mlp.weight": torch.randn(64, 64) * 0.02 for i in range(7)}
    state["layers.3.mlp.weight"] *= 10  # one layer far from its neighbours
    state |= {
        "zero.weight": torch.zeros(10, 10),
        "const.weight": torch.full((10, 10), 0.5),
        "bad.weight": torch.tensor([1.0, float("nan"), float("inf")]),
        "copy_a.weight": shared.clone(),
        "copy_b.weight": shared.clone(),
        "tied_a.weight": shared,
        "tied_b.weight": shared,  # the same storage: a tie, not a duplicate
        "mixed.weight": torch.randn(4, 4).half(),
        "mixed.bias": torch.randn(4),
        "big.weight": torch.tensor([1e5, 1.0]),
    }
    path = tmp_path / "flags.pt"
    torch.save(state, path)
    report = modelport.stats(path)
    kinds = flag_kinds(report)
    assert kinds["all-zero"] == {("zero.weight",)}
    assert kinds["constant"] == {("const.weight",)}
    assert kinds["nan"] == {("bad.weight",)} and kinds["inf"] == {("bad.weight",)}
    assert kinds["norm-outlier"] == {("layers.3.mlp.weight",)}
    assert kinds["mixed-dtypes"] == {("mixed.bias", "mixed.weight")}
    assert kinds["float16-overflow"] == {("big.weight",)}
    assert kinds["duplicate"] == {
        ("copy_a.weight", "copy_b.weight", "tied_a.weight", "tied_b.weight")
    }
    assert report.tensor("layers.3.mlp.weight").flags == ("norm-outlier",)
    assert report.tensor("layers.2.mlp.weight").flags == ()


def test_tied_names_alone_are_no_duplicate(tmp_path: Path) -> None:
    shared = torch.randn(32, 32)
    path = tmp_path / "tied.pt"
    torch.save({"a.weight": shared, "b.weight": shared, "c.weight": torch.randn(32, 32)}, path)
    report = modelport.stats(path)
    assert flag_kinds(report) == {}
    assert report.tensor("a.weight").to_json() | {"name": ""} == report.tensor(
        "b.weight"
    ).to_json() | {"name": ""}


MEMORY_PROBE = """
import resource, sys, modelport
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = modelport.stats(sys.argv[1], threads=2)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024, report.tensors[0].max, report.tensors[0].mean)
"""


def write_large_safetensors(path: Path, mib: int) -> None:
    """One float32 tensor of ``mib`` MiB, written a block at a time (no array that size)."""
    block = np.linspace(-1, 1, 1 << 18, dtype=np.float32)  # 1 MiB
    size = mib * block.nbytes
    header = json.dumps({"big": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}})
    encoded = header.encode() + b" " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for _ in range(mib):
            handle.write(block.tobytes())


def test_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    write_large_safetensors(path, 128)
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, check=True
    )
    grown_mib, maximum, mean = probe.stdout.split()
    assert float(maximum) == 1.0 and abs(float(mean)) < 1e-6
    assert int(grown_mib) < 48, probe.stdout  # a mapped or copied tensor would be 128


OPEN_THEN_STATS = """
import sys, modelport
with modelport.open(sys.argv[1]) as model:
    before = sorted(m for m in ("numpy", "ml_dtypes") if m in sys.modules)
    report = model.stats(threads=1)
print(",".join(before) or "-", report.tensor("w").max, report.format)
"""


def test_an_open_file_measures_itself(tmp_path: Path) -> None:
    """``modelport.open(path).stats()``: the same report as ``modelport.stats(path)``, and
    ``open`` alone imports neither numpy nor ml_dtypes (the statistics do, on first use)."""
    values = special_values(5_000, seed=7)
    path = tmp_path / "w.safetensors"
    save_numpy({"w": values}, path)
    with modelport.open(path) as model:
        own = model.stats(threads=2)
        given = modelport.stats(model, threads=2)
        assert model.tensor("w").numpy().shape == values.shape  # still open, still readable
    by_path = modelport.stats(path, threads=2)
    assert_matches(own.tensor("w"), values, np.dtype(np.float32))
    assert own.tensor("w").to_json() == by_path.tensor("w").to_json()
    assert given.tensor("w").to_json() == by_path.tensor("w").to_json()
    assert (own.path, own.format) == (str(path), "safetensors")
    probe = subprocess.run(
        [sys.executable, "-c", OPEN_THEN_STATS, str(path)], capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr
    imported, maximum, fmt = probe.stdout.split()
    assert imported == "-"
    assert float(maximum) == float(own.tensor("w").max) and fmt == "safetensors"
