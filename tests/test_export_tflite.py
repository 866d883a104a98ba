"""``export --to tflite``: LiteRT's PyTorch converter writes the model, LiteRT's interpreter
runs it and it agrees with eager; modelport's own reader reads it back.

litert-torch cannot share this environment with the test extra (see pyproject's
``litert`` extra): without it these tests skip, except the one about its absence."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import modelport
from modelport.errors import ConversionError, MissingDependencyError
from modelport.torch_models.agreement import TOLERANCES
from modelport.torch_models.exporting import export
from tests.conftest import Cli
from tests.models import Router, TinyResNet
from tests.real_models import KINDS, real_model
from tests.test_export import tiny_bert_dir

FLOAT32_ATOL, _ = TOLERANCES["float32"]


def litert() -> None:
    pytest.importorskip("litert_torch", reason="litert-torch is not installed")


@pytest.mark.heavy
def test_cnn_runs_in_litert(tmp_path: Path) -> None:
    litert()
    torch.manual_seed(0)
    out = tmp_path / "cnn.tflite"
    report = export(
        TinyResNet(classes=5, width=4), out, {"x": torch.randn(2, 3, 16, 16)}, to="tflite"
    )
    print(f"cnn tflite max abs error {report.max_abs_error:.3g}")
    assert report.verified is True and report.runtime == "LiteRT's interpreter"
    assert report.max_abs_error < FLOAT32_ATOL
    assert {c.sample for c in report.outputs} == {"example", "random1", "random2"}
    assert report.files == (out,) and sorted(tmp_path.iterdir()) == [out]
    assert modelport.inspect(out).format == "tflite"


@pytest.mark.heavy
def test_mlp_weights_read_back_bit_for_bit(tmp_path: Path) -> None:
    """Nested outputs in pytree order; every Linear's weights stored as torch holds them."""
    litert()
    torch.manual_seed(0)
    model = Router()
    out = tmp_path / "router.tflite"
    inputs = {"x": torch.randn(2, 5, 8), "mask": torch.ones(2, 5), "scale": torch.tensor(0.5)}
    report = export(model, out, inputs, to="tflite")
    print(f"router tflite max abs error {report.max_abs_error:.3g}")
    assert report.verified is True and report.max_abs_error < FLOAT32_ATOL
    names = {c.name for c in report.outputs}
    assert names == {"output_0", "output_1.hidden", "output_1.pooled"}
    with modelport.open(out) as converted:
        stored = [np.asarray(converted.get_tensor(name)) for name in list(converted.keys())]
    for name, weight in model.state_dict().items():
        found = (s.shape == weight.shape and np.array_equal(s, weight.numpy()) for s in stored)
        assert any(found), name


@pytest.mark.heavy
def test_cli_exports_bert_with_int64_ids(tmp_path: Path, cli: Cli) -> None:
    """The converter narrows int64 token ids to int32; the report says so."""
    litert()
    result = cli(
        "export",
        "--model",
        tiny_bert_dir(tmp_path / "bert"),
        "--input",
        "input_ids:2,8:int64",
        "--to",
        "tflite",
        tmp_path / "bert.tflite",
        "--json",
    )
    assert result.code == 0, result.err
    print(result.out)
    assert result.json["verified"] is True and result.json["runtime"] == "LiteRT's interpreter"
    assert result.json["max_abs_error"] < FLOAT32_ATOL
    assert any("int64 -> int32" in note for note in result.json["warnings"])


@pytest.mark.heavy
def test_dynamic_axes_refused_with_advice(tmp_path: Path) -> None:
    """LiteRT's converter (litert-torch 0.10) cannot lower a Linear over a dynamic axis."""
    litert()
    torch.manual_seed(0)
    with pytest.raises(ConversionError, match="export without --dynamic"):
        export(
            Router(),
            tmp_path / "r.tflite",
            {"x": torch.randn(2, 5, 8), "mask": torch.ones(2, 5)},
            to="tflite",
            dynamic={"x": {0: "b"}, "mask": {0: "b"}},
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.heavy
@pytest.mark.parametrize("kind", KINDS)
def test_real_models_run_in_tflite(tmp_path: Path, kind: str) -> None:
    """A head that caches in ``forward``, GPT-2, Llama and a diffusers UNet, each verified
    in LiteRT's interpreter against eager on the example and random inputs."""
    litert()
    model, inputs = real_model(kind, tmp_path)
    out = tmp_path / f"{kind}.tflite"
    report = export(model, out, inputs, to="tflite")
    print(f"{kind} tflite max abs error {report.max_abs_error:.3g}")
    assert report.verified is True, [c for c in report.outputs if not c.ok]
    assert report.runtime == "LiteRT's interpreter"
    assert report.max_abs_error < FLOAT32_ATOL


def test_missing_litert_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # import fails as if absent
    torch.manual_seed(0)
    with pytest.raises(MissingDependencyError, match=r"pip install 'modelport\[litert\]'"):
        export(
            Router(), tmp_path / "r.tflite", [torch.randn(2, 5, 8), torch.ones(2, 5)], to="tflite"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.heavy
def test_rebuild_to_tflite_by_name(tmp_path: Path) -> None:
    """``rebuild`` picks LiteRT from a ``.tflite`` name and verifies through ``export``."""
    litert()
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(TinyResNet(classes=5, width=4).state_dict(), str(weights))
    out = tmp_path / "cnn.tflite"
    report = modelport.rebuild(
        "tests.models:TinyResNet",
        weights,
        out,
        init={"classes": 5, "width": 4},
        example_inputs={"x": torch.randn(2, 3, 16, 16)},
    )
    assert report.format == "tflite" and report.verified is True
    assert report.max_abs_error < FLOAT32_ATOL
    assert modelport.inspect(out).format == "tflite"
