"""``modelport export``: exported files run in their own runtime and agree with eager."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import modelport
from modelport.cli.cmd_export import parse_dynamic, parse_input
from modelport.errors import ConversionError, ModelSpecError
from modelport.export import export
from modelport.models import resolve_model
from tests.models import TinyResNet

ROOT = Path(__file__).resolve().parents[1]


class CallCounter(nn.Module):
    """Wrong on purpose: forward reads Python-side state that export freezes as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) * self.calls


def tiny() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet(classes=5, width=4).eval()


@pytest.mark.parametrize("to", ["onnx", "torchscript", "pt2"])
def test_export_verified(tmp_path: Path, to: str) -> None:
    path = tmp_path / f"model.{to}"
    dynamic = {"x": {0: "batch"}} if to == "onnx" else None
    report = export(tiny(), path, {"x": torch.randn(2, 3, 8, 8)}, to=to, dynamic=dynamic)
    assert report.verified is True
    assert report.max_abs_error < 1e-4
    assert all(f.exists() for f in report.files)
    samples = {c.sample for c in report.outputs}
    assert {"example", "random1", "random2"} <= samples
    if to == "onnx":
        assert {"batch=3", "batch=5"} <= samples  # other batch sizes ran through onnxruntime
        assert report.files[0] == path
    if to == "torchscript":
        assert any("deprecated" in w for w in report.warnings)
    payload = report.to_json()
    assert payload["verified"] is True and payload["format"] == to
    assert {"max_abs", "max_rel", "ok"} <= set(payload["outputs"][0])


def test_wrong_export_fails_verification(tmp_path: Path) -> None:
    model = CallCounter().eval()
    report = export(model, tmp_path / "counter.pt2", [torch.randn(2, 4)], to="pt2")
    assert report.verified is False
    assert report.max_abs_error > 0.1
    assert not all(c.ok for c in report.outputs)


def test_bfloat16_pt2_uses_loose_tolerance(tmp_path: Path) -> None:
    model = tiny().to(torch.bfloat16)
    report = export(model, tmp_path / "m.pt2", [torch.randn(2, 3, 8, 8).bfloat16()], to="pt2")
    assert report.verified is True
    assert report.outputs[0].dtype == "bfloat16" and report.outputs[0].atol > 1e-3


def test_resolve_model_with_safetensors_weights(tmp_path: Path) -> None:
    source = tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    model = resolve_model(
        "tests.models:TinyResNet", init={"classes": 5, "width": 4}, weights=weights
    )
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(ConversionError, match="do not fit"):
        resolve_model("tests.models:TinyResNet", init={"classes": 7, "width": 4}, weights=weights)


def test_resolve_model_errors() -> None:
    with pytest.raises(ModelSpecError):
        resolve_model("no_colon_here")
    with pytest.raises(ModelSpecError):
        resolve_model("tests.models:Missing")
    with pytest.raises(ModelSpecError):
        resolve_model("tests.models:TinyResNet", init={"bogus": 1})
    with pytest.raises(ModelSpecError):
        resolve_model("tests.models:trained_checkpoint")  # callable, but not a module maker


def test_parse_specs() -> None:
    name, tensor = parse_input("ids:2,16:int64", high=50)
    assert name == "ids" and tensor.shape == (2, 16) and tensor.dtype == torch.int64
    assert int(tensor.max()) < 50
    assert parse_input("x:1,3,8,8")[1].dtype == torch.float32
    assert parse_dynamic("x:0=batch,2=h") == ("x", {0: "batch", 2: "h"})
    for bad in ("x", "x:1,a", "x:1:float99"):
        with pytest.raises(ConversionError):
            parse_input(bad)
    with pytest.raises(ConversionError):
        parse_dynamic("x:batch")
    with pytest.raises(ConversionError, match="at least 2"):
        export(
            tiny(),
            Path("unused.pt2"),
            {"x": torch.randn(1, 3, 8, 8)},
            to="pt2",
            dynamic={"x": {0: "batch"}},
        )


def test_cli_json(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    save_file(dict(tiny().state_dict()), str(weights))
    out = tmp_path / "model.pt2"
    command = [
        sys.executable,
        "-m",
        "modelport",
        "export",
        "--model",
        "tests.models:TinyResNet",
        "--init",
        '{"classes": 5, "width": 4}',
        "--weights",
        str(weights),
        "--input",
        "x:2,3,8,8",
        "--dynamic",
        "x:0=batch",
        "--to",
        "pt2",
        "--json",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["verified"] is True and payload["format"] == "pt2"
    assert payload["path"] == str(out) and out.exists()
    assert {"max_abs_error", "outputs", "seconds", "warnings"} <= set(payload)
    assert modelport.inspect(out).format is not None  # modelport reads what it wrote


def test_cli_verification_failure_exit_1(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "modelport",
        "export",
        "--model",
        "tests.test_export:CallCounter",
        "--input",
        "x:2,4",
        "--to",
        "pt2",
        str(tmp_path / "c.pt2"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert "FAILED" in result.stdout
    bad = subprocess.run(
        [*command[:-1], "--init", "[1]", command[-1]],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "--init" in bad.stderr


def test_hf_directory_model(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(tmp_path / "bert")
    model = resolve_model(tmp_path / "bert")
    assert type(model).__name__ == "BertModel"
    original = BertModel.from_pretrained(tmp_path / "bert").state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    ids = {"input_ids": torch.randint(0, 64, (2, 8))}
    report = export(model, tmp_path / "bert.pt2", ids, to="pt2", dynamic={"input_ids": {0: "b"}})
    assert report.verified is True and len({c.name for c in report.outputs}) == 2


def test_static_export_fails_on_other_batch_sizes(tmp_path: Path) -> None:
    class Reshaper(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1) + torch.ones(int(x.shape[0]))  # a trace bakes the batch size in

    report = export(Reshaper(), tmp_path / "r.pt2", {"x": torch.randn(2, 3)}, to="pt2")
    assert report.verified is True  # static shapes: only batch 2 is checked
    dynamic = {"x": {0: "batch"}}
    with pytest.raises(ConversionError, match="could not export"):  # must specialize batch
        export(Reshaper(), tmp_path / "d.pt2", {"x": torch.randn(2, 3)}, to="pt2", dynamic=dynamic)
    report = export(
        Reshaper(), tmp_path / "t.ts", {"x": torch.randn(2, 3)}, to="torchscript", dynamic=dynamic
    )
    assert report.verified is False  # the trace froze batch 2; batch 3 and 5 fail
    assert report.to_json()["max_abs_error"] is None
    assert any(c.name.startswith("(failed") or not c.ok for c in report.outputs)
