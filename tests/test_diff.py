"""``modelport.diff``: pairing by name, value statistics checked against torch, and the CLI."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

import modelport
from modelport.comparing.diffing import DiffReport, TensorDiff
from modelport.errors import UnsafeModelError
from tests.conftest import Cli
from tests.models import TinyResNet, dtype_zoo, trained_checkpoint

# ``modelport.diff`` is the function; the module lives in sys.modules under the same name.
diff_module = importlib.import_module("modelport.comparing.diffing")

State = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[State, dict[str, Path]]:
    """One trained TinyResNet saved as checkpoint, torch zip, legacy, safetensors and npz."""
    torch.manual_seed(0)
    checkpoint = trained_checkpoint(TinyResNet(), torch.randn(2, 3, 8, 8))
    state: State = checkpoint["model_state_dict"]
    folder = tmp_path_factory.mktemp("diff")
    paths = {
        "checkpoint": folder / "checkpoint.pt",
        "zip": folder / "pytorch_model.bin",
        "legacy": folder / "legacy.pt",
        "safetensors": folder / "model.safetensors",
        "npz": folder / "weights.npz",
    }
    torch.save(checkpoint, paths["checkpoint"])
    torch.save(state, paths["zip"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
    np.savez(paths["npz"], **{k: v.numpy() for k, v in state.items()})  # type: ignore[arg-type]
    return state, paths


def save(path: Path, state: State) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def by_name(report: DiffReport) -> dict[str, TensorDiff]:
    return {t.name: t for t in report.tensors}


def torch_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    delta = (x - y).abs()
    return (
        float(delta.max()),
        float((delta / y.abs()).max()),
        float(F.cosine_similarity(x, y, dim=0)),
    )


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("checkpoint", "safetensors"),
        ("zip", "npz"),
        ("legacy", "checkpoint"),
        ("npz", "legacy"),
    ],
)
def test_identical_content_across_formats(
    model: tuple[State, dict[str, Path]], left: str, right: str
) -> None:
    state, paths = model
    report = modelport.diff(paths[left], paths[right])
    assert report.same
    assert not report.only_in_a and not report.only_in_b and not report.changed
    assert {t.name for t in report.tensors} == set(state)
    for item in report.tensors:
        assert item.bit_equal and item.within_tolerance and item.mismatched == 0
        assert item.max_abs == 0.0 and item.max_rel == 0.0
        assert item.cosine == pytest.approx(1.0, abs=1e-12)


def test_one_perturbed_tensor_matches_torch(
    tmp_path: Path, model: tuple[State, dict[str, Path]]
) -> None:
    state, paths = model
    changed = {k: v.clone() for k, v in state.items()}
    changed["layer1.0.conv1.weight"][1, 2, 0, 1] += 1e-3
    path = save(tmp_path / "changed.safetensors", changed)
    report = modelport.diff(path, paths["checkpoint"])
    assert not report.same
    assert [t.name for t in report.differing] == ["layer1.0.conv1.weight"]
    item = by_name(report)["layer1.0.conv1.weight"]
    max_abs, max_rel, cosine = torch_stats(
        changed["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"]
    )
    assert not item.bit_equal and not item.within_tolerance and item.mismatched == 1
    assert item.max_abs == pytest.approx(max_abs, rel=1e-12)
    assert item.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert item.max_rel == pytest.approx(max_rel, rel=1e-12)
    assert item.cosine == pytest.approx(cosine, rel=1e-12)
    assert item.cosine is not None and item.cosine < 1.0
    assert all(t.bit_equal for t in report.tensors if t.name != "layer1.0.conv1.weight")

    loose = modelport.diff(path, paths["checkpoint"], atol=1e-2)
    assert loose.same and not loose.differing
    assert not by_name(loose)["layer1.0.conv1.weight"].bit_equal
    assert modelport.diff(path, paths["checkpoint"], rtol=1.0).same
    assert not modelport.diff(path, paths["checkpoint"], atol=1e-4).same


def test_every_tensor_perturbed_statistics(tmp_path: Path) -> None:
    torch.manual_seed(1)
    a = {"w": torch.randn(64, 33), "v": torch.randn(100), "ones": torch.ones(5)}
    b = {k: v + 1e-4 * torch.randn_like(v) for k, v in a.items()}
    report = modelport.diff(save(tmp_path / "a.safetensors", a), save(tmp_path / "b.st", b))
    for name, item in by_name(report).items():
        max_abs, max_rel, cosine = torch_stats(a[name], b[name])
        assert item.max_abs == pytest.approx(max_abs, rel=1e-12)
        assert item.max_rel == pytest.approx(max_rel, rel=1e-12)
        assert item.cosine == pytest.approx(cosine, rel=1e-12)
        expected = ~torch.isclose(a[name].double(), b[name].double(), rtol=1e-3, atol=1e-4)
        tolerant = modelport.diff(
            tmp_path / "a.safetensors", tmp_path / "b.st", atol=1e-4, rtol=1e-3
        )
        assert by_name(tolerant)[name].mismatched == int(expected.sum())


def test_renamed_key(tmp_path: Path, model: tuple[State, dict[str, Path]]) -> None:
    state, paths = model
    renamed = {("head.weight" if k == "fc.weight" else k): v for k, v in state.items()}
    report = modelport.diff(save(tmp_path / "renamed.safetensors", renamed), paths["zip"])
    assert not report.same
    assert report.only_in_a == ("head.weight",) and report.only_in_b == ("fc.weight",)
    assert not report.changed and all(t.bit_equal for t in report.tensors)


def test_ddp_prefix(tmp_path: Path, model: tuple[State, dict[str, Path]]) -> None:
    state, paths = model
    ddp = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "step": 7}, ddp)
    plain = modelport.diff(ddp, paths["safetensors"])
    assert not plain.same and len(plain.only_in_a) == len(state) == len(plain.only_in_b)
    auto = modelport.diff(ddp, paths["safetensors"], strip_prefix="auto")
    assert auto.same and len(auto.tensors) == len(state)
    assert any("module." in note for note in auto.notes)
    assert modelport.diff(paths["safetensors"], ddp, strip_prefix="auto").same
    assert modelport.diff(ddp, paths["safetensors"], strip_prefix="module.").same

    compiled = tmp_path / "compiled.pt"
    torch.save({f"_orig_mod.module.{k}": v for k, v in state.items()}, compiled)
    assert modelport.diff(compiled, ddp, strip_prefix="auto").same


def test_auto_prefix_keeps_the_better_pairing(tmp_path: Path) -> None:
    """``model.`` on every name of A but not of B: stripping it would pair nothing."""
    a = {"model.layer.weight": torch.ones(2), "model.norm.weight": torch.ones(3)}
    b = {**a, "lm_head.weight": torch.ones(4)}
    report = modelport.diff(
        save(tmp_path / "a.safetensors", a),
        save(tmp_path / "b.safetensors", b),
        strip_prefix="auto",
    )
    assert report.only_in_b == ("lm_head.weight",) and not report.only_in_a
    assert len(report.tensors) == 2 and not report.notes


def test_given_prefix_never_merges_names(tmp_path: Path) -> None:
    a = {"module.w": torch.ones(2), "w": torch.zeros(2)}
    b = {"module.w": torch.ones(2), "w": torch.zeros(2)}
    report = modelport.diff(
        save(tmp_path / "a.safetensors", a),
        save(tmp_path / "b.safetensors", b),
        strip_prefix="module.",
    )
    assert report.same and {t.name for t in report.tensors} == {"module.w", "w"}
    assert any("collides" in note for note in report.notes)


def test_dtype_and_shape_changes(tmp_path: Path, model: tuple[State, dict[str, Path]]) -> None:
    state, paths = model
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    report = modelport.diff(paths["zip"], save(tmp_path / "half.safetensors", half))
    assert not report.same
    floats = {k for k, v in state.items() if v.is_floating_point()}
    assert {c.name for c in report.changed} == floats
    assert all(c.kinds == ("dtype",) for c in report.changed)
    assert {c.dtype_b for c in report.changed} == {"float16"}
    for name, item in by_name(report).items():
        if name not in floats:
            assert item.bit_equal
            continue
        assert not item.bit_equal and item.dtype_a == "float32" and item.dtype_b == "float16"
        max_abs, _, cosine = torch_stats(state[name], half[name])
        assert item.max_abs == pytest.approx(max_abs, rel=1e-12, abs=1e-300)
        assert item.cosine == pytest.approx(cosine, rel=1e-9)

    reshaped = {k: (v.reshape(-1) if k == "fc.weight" else v) for k, v in state.items()}
    report = modelport.diff(paths["zip"], save(tmp_path / "reshaped.safetensors", reshaped))
    (change,) = report.changed
    assert change.name == "fc.weight" and change.kinds == ("shape",)
    assert change.shape_a == (10, 8) and change.shape_b == (80,)
    assert "fc.weight" not in by_name(report)
    assert report.to_json()["counts"]["common"] == len(state)


def test_small_chunks_pair_up_across_dtypes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of different element counts (fp32 against fp16, strided views) pair exactly."""
    torch.manual_seed(2)
    base = torch.randn(37, 29)
    a = {"w": base.t(), "v": base[::2, 3:]}  # strided in the torch file
    torch.save(a, tmp_path / "a.pt")
    b = {k: v.half() for k, v in a.items()}
    save(tmp_path / "b.safetensors", b)
    whole = modelport.diff(tmp_path / "a.pt", tmp_path / "b.safetensors")
    monkeypatch.setattr(diff_module, "DIFF_CHUNK", 52)
    chunked = modelport.diff(tmp_path / "a.pt", tmp_path / "b.safetensors")
    for name, item in by_name(chunked).items():
        max_abs, max_rel, cosine = torch_stats(a[name], b[name])
        assert item.max_abs == pytest.approx(max_abs, rel=1e-12)
        assert item.max_rel == pytest.approx(max_rel, rel=1e-12)
        assert item.cosine == pytest.approx(cosine, rel=1e-9)
        assert item.cosine == pytest.approx(by_name(whole)[name].cosine, rel=1e-12)
    same = modelport.diff(tmp_path / "a.pt", save(tmp_path / "a.safetensors", a))
    assert same.same


def test_dtype_zoo_against_contiguous_copies(tmp_path: Path) -> None:
    zoo = dtype_zoo()  # bf16, fp8, bool, 0-d, empty, strided views
    torch.save(zoo, tmp_path / "zoo.pt")
    save(tmp_path / "zoo.safetensors", {k: v.clone() for k, v in zoo.items()})
    report = modelport.diff(tmp_path / "zoo.pt", tmp_path / "zoo.safetensors")
    assert report.same and len(report.tensors) == len(zoo)


def test_nan_inf_and_zero_vectors(tmp_path: Path) -> None:
    nan, inf = math.nan, math.inf
    a = {
        "nan_same": torch.tensor([1.0, nan]),
        "nan_vs_number": torch.tensor([1.0, nan]),
        "inf": torch.tensor([inf, -inf, 2.0]),
        "zeros": torch.zeros(4),
        "zero_vs_one": torch.zeros(2),
    }
    b = {
        "nan_same": torch.tensor([1.0, nan]),
        "nan_vs_number": torch.tensor([1.0, 2.0]),
        "inf": torch.tensor([inf, 5.0, 2.0]),
        "zeros": torch.zeros(4),
        "zero_vs_one": torch.ones(2),
    }
    report = modelport.diff(save(tmp_path / "a.st", a), save(tmp_path / "b.st", b), atol=10.0)
    items = by_name(report)
    assert items["nan_same"].bit_equal and items["nan_same"].within_tolerance
    assert items["nan_vs_number"].max_abs == inf and items["nan_vs_number"].mismatched == 1
    assert items["inf"].max_abs == inf and items["inf"].mismatched == 1
    assert items["zeros"].cosine == 1.0 and items["zero_vs_one"].cosine == 0.0
    assert items["zero_vs_one"].max_rel == 1.0 and items["zero_vs_one"].within_tolerance
    payload = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert {"name": "inf", "max_abs": "inf"}.items() <= next(
        t for t in payload["tensors"] if t["name"] == "inf"
    ).items()


def test_quantized_blocks_compare_by_bytes(tmp_path: Path) -> None:
    values = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    for name, data in (("a", values), ("b", values), ("c", values * 2)):
        writer = GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
        writer.add_tensor(
            "q", quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
        )
        writer.add_tensor("f", data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    assert modelport.diff(tmp_path / "a.gguf", tmp_path / "b.gguf").same
    report = modelport.diff(tmp_path / "a.gguf", tmp_path / "c.gguf")
    item = by_name(report)["q"]
    assert not item.bit_equal and item.max_abs is None and "bytes" in item.note
    assert by_name(report)["f"].max_abs == pytest.approx(1.0)


def test_unsafe_files_are_refused(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes], model: tuple[State, dict[str, Path]]
) -> None:
    _, paths = model
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(attacks["string-arg"])
    with pytest.raises(UnsafeModelError):
        modelport.diff(evil, paths["zip"])
    assert not marker.exists()
    with pytest.raises(ValueError, match="non-negative"):
        modelport.diff(paths["zip"], paths["zip"], atol=-1.0)


def test_cli_exit_codes_and_json(
    tmp_path: Path,
    marker: Path,
    attacks: dict[str, bytes],
    model: tuple[State, dict[str, Path]],
    cli: Cli,
) -> None:
    state, paths = model
    changed = {k: v.clone() for k, v in state.items()}
    changed["fc.bias"][0] += 1e-3
    other = save(tmp_path / "changed.safetensors", changed)

    result = cli("diff", paths["checkpoint"], paths["npz"])
    assert result.code == 0, result.err
    assert "same" in result.out

    result = cli("diff", other, paths["zip"])
    assert result.code == 1, result.err
    assert "fc.bias" in result.out and "different" in result.out

    result = cli("diff", other, paths["zip"], "--json")
    assert result.code == 1
    payload = result.json
    assert payload["same"] is False
    assert payload["counts"] == {
        "common": len(state),
        "only_in_a": 0,
        "only_in_b": 0,
        "changed": 0,
        "differing": 1,
    }
    first = next(t for t in payload["tensors"] if t["name"] == "fc.bias")
    assert set(first) == {
        "name",
        "dtype_a",
        "dtype_b",
        "shape",
        "bit_equal",
        "within_tolerance",
        "mismatched",
        "max_abs",
        "max_rel",
        "cosine",
        "note",
    }
    assert first["max_abs"] == pytest.approx(1e-3, rel=1e-3)

    assert cli("diff", other, paths["zip"], "--atol", "1e-2").code == 0
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, ddp)
    assert cli("diff", ddp, paths["zip"]).code == 1
    assert cli("diff", ddp, paths["zip"], "--strip-prefix", "auto").code == 0

    result = cli("diff", tmp_path / "missing.pt", paths["zip"], "--json")
    assert result.code == 2
    assert result.json["error"]["type"] == "ModelFileNotFoundError"
    result = cli("diff", paths["zip"], paths["zip"], "--atol", "-1")
    assert result.code == 2 and "atol" in result.err
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(attacks["string-arg"])
    result = cli("diff", evil, paths["zip"])
    assert result.code == 2 and "unsafe" in result.err
    assert not marker.exists()
