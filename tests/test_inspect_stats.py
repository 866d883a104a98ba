"""``modelport inspect --stats`` and ``modelport.stats`` of a file already open, checked
against numpy over the arrays the file was written from (safetensors' own numpy writer
makes the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelport
from tests.conftest import Cli


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    weight[0, :3] = [np.nan, np.inf, 0.0]
    weight[1, 0] = 1e-40  # a float32 subnormal
    weight[2, 0] = 7e4  # beyond float16
    return {
        "layer.weight": weight,
        "layer.bias": np.zeros(8, dtype=np.float16),
        "steps": np.arange(-5, 20, dtype=np.int32),
    }


def oracle(values: np.ndarray) -> dict[str, Any]:
    """numpy in float64 over the finite values; NaN, Inf and zeros counted apart."""
    wide = values.astype(np.float64).reshape(-1)
    finite = wide[np.isfinite(wide)]
    tiny = float(np.finfo(values.dtype).tiny) if values.dtype.kind == "f" else 0.0
    return {
        "min": finite.min(),
        "max": finite.max(),
        "mean": finite.mean(),
        "std": finite.std(),
        "nan": int(np.isnan(wide).sum()),
        "inf": int(np.isinf(wide).sum()),
        "zeros": int((wide == 0).sum()),
        "subnormal": int(((finite != 0) & (np.abs(finite) < tiny)).sum()),
        "over_float16": int((np.abs(finite) > 65504).sum()),
    }


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(arrays(), path)
    return path


def test_json_carries_the_statistics_numpy_computes(model: Path, cli: Cli) -> None:
    result = cli("inspect", model, "--stats", "--json")
    assert result.code == 0, result.err
    printed = result.json
    assert printed["tensor_count"] == 3  # what inspect says is still there
    by_name = {t["name"]: t for t in printed["stats"]["tensors"]}
    assert list(by_name) == [t["name"] for t in printed["tensors"]]  # inspect's order
    assert sorted(by_name) == sorted(arrays())
    for name, values in arrays().items():
        for key, expected in oracle(values).items():
            assert by_name[name][key] == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, key)
    assert "nan" in by_name["layer.weight"]["flags"]
    assert {f["kind"] for f in printed["stats"]["flags"]} >= {"nan", "inf", "all-zero"}
    assert "stats" not in cli("inspect", model, "--json").json  # asked for by name only


def test_the_table_shows_each_tensors_numbers(model: Path, cli: Cli) -> None:
    result = cli("inspect", model, "--stats")
    assert result.code == 0, result.err
    lines = {line.split("│")[1].strip(): line for line in result.out.splitlines() if "│" in line}
    for name in ("layer.weight", "steps"):
        expected = oracle(arrays()[name])
        for key in ("min", "max", "mean", "std"):
            assert f" {expected[key]:.4g} " in lines[name], (name, key)
    assert "flag all-zero" in result.out and "layer.bias" in result.out.split("flag all-zero")[1]


def test_stats_of_an_open_file_is_stats_of_its_path(model: Path) -> None:
    expected = modelport.stats(model).to_json()
    with modelport.open(model) as opened:
        found = modelport.stats(opened, threads=1)
        assert np.array_equal(opened.get_tensor("steps"), arrays()["steps"])  # still open
    assert isinstance(found, modelport.StatsReport)
    got = found.to_json()
    assert got["threads"] == 1
    for volatile in ("threads", "seconds"):
        del got[volatile], expected[volatile]
    assert got == expected
    assert found.tensor("layer.weight").mean == pytest.approx(
        oracle(arrays()["layer.weight"])["mean"], rel=1e-12
    )


def test_stats_are_for_one_local_file(model: Path, cli: Cli) -> None:
    two = cli("inspect", model, model, "--stats")
    assert two.code == 2 and "one file" in two.err
    remote = cli("inspect", "https://example.invalid/model.safetensors", "--stats")
    assert remote.code == 2 and "download" in remote.err
