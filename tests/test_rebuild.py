"""``modelport rebuild``: weights + class -> a whole model that loads back and agrees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import modelport
from modelport.cli.markdown import rebuild_markdown
from modelport.errors import ConversionError, UsageError
from modelport.torch_models.rebuilding import rebuild
from tests.conftest import Cli
from tests.models import TinyResNet

pytestmark = pytest.mark.heavy  # exports run in every target runtime

SPEC = "tests.models:TinyResNet"
INIT = {"classes": 5, "width": 4}


class Counter(torch.nn.Module):
    """Wrong on purpose: export freezes the Python-side call count as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) * self.calls


def weights(tmp_path: Path) -> tuple[Path, TinyResNet]:
    torch.manual_seed(0)
    source = TinyResNet(**INIT)
    with torch.no_grad():  # non-default running stats, so buffers are really carried over
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path, source.eval()


def test_pickle_from_safetensors_loads_back_equal(tmp_path: Path) -> None:
    source_path, source = weights(tmp_path)
    out = tmp_path / "model.pt"
    report = modelport.rebuild(SPEC, source_path, out, init=INIT)
    assert report.verified is True
    assert report.method == "state_dict" and report.tensors_compared == len(source.state_dict())
    assert report.requires.startswith("the class tests.models.TinyResNet must be importable")
    loaded = torch.load(out, weights_only=False)  # our own freshly written file
    assert isinstance(loaded, TinyResNet) and not loaded.training
    state = loaded.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(state[name], tensor), name
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    payload = report.to_json()
    assert payload["format"] == "pickle" and payload["mismatched"] == []


def test_pickle_with_inputs_compares_outputs(tmp_path: Path) -> None:
    source_path, _ = weights(tmp_path)
    report = rebuild(
        SPEC, source_path, tmp_path / "m.pt", init=INIT, example_inputs=[torch.randn(2, 3, 8, 8)]
    )
    assert report.verified is True and report.method == "outputs+state_dict"
    assert {"example", "random1"} <= {c.sample for c in report.outputs}
    assert report.max_abs_error == 0.0


@pytest.mark.parametrize("to", ["pt2", "torchscript"])
def test_traced_formats_verified(tmp_path: Path, to: str) -> None:
    source_path, source = weights(tmp_path)
    out = tmp_path / f"model.{to}"
    report = rebuild(
        SPEC, source_path, out, init=INIT, to=to, example_inputs={"x": torch.randn(2, 3, 8, 8)}
    )
    assert report.verified is True and report.method == "outputs"
    assert "not needed" in report.requires
    if to == "pt2":
        program = torch.export.load(str(out)).module()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert torch.allclose(program(x), source(x), atol=1e-5)


def test_errors(tmp_path: Path) -> None:
    source_path, _ = weights(tmp_path)
    with pytest.raises(UsageError, match="needs example inputs"):
        rebuild(SPEC, source_path, tmp_path / "m.pt2", init=INIT, to="pt2")
    with pytest.raises(UsageError, match="unknown rebuild format"):
        rebuild(SPEC, source_path, tmp_path / "m.x", init=INIT, to="onnx")
    with pytest.raises(ConversionError, match="do not fit"):
        rebuild(SPEC, source_path, tmp_path / "m.pt", init={"classes": 7, "width": 4})


def test_cli_json(tmp_path: Path, cli: Cli) -> None:
    source_path, _ = weights(tmp_path)
    out = tmp_path / "cli.pt2"
    command = [
        "rebuild",
        "--model",
        SPEC,
        "--init",
        json.dumps(INIT),
        str(source_path),
        str(out),
        "--to",
        "pt2",
        "--input",
        "x:2,3,8,8",
        "--json",
    ]
    result = cli(*command)
    assert result.code == 0, result.err
    payload = result.json
    assert payload["verified"] is True and payload["format"] == "pt2" and out.exists()
    assert payload["load_with"].startswith("torch.export.load")
    missing = cli(*command[:-3], "--json")
    assert missing.code == 2
    assert "needs example inputs" in missing.json["error"]["message"]


def test_cli_verification_failure_exit_1(tmp_path: Path, cli: Cli) -> None:
    source = tmp_path / "counter.safetensors"
    save_file(dict(Counter().state_dict()), str(source))
    command = [
        "rebuild",
        "--model",
        "tests.test_rebuild:Counter",
        str(source),
        str(tmp_path / "counter.pt2"),
        "--to",
        "pt2",
        "--input",
        "x:2,4",
    ]
    result = cli(*command)
    assert result.code == 1, result.err
    assert "FAILED" in result.out and "requires: torch only" in result.out


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    source_path, _ = weights(tmp_path)
    out = tmp_path / "model.pt"
    rebuild(SPEC, source_path, out, init=INIT)
    before = out.read_bytes()
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        rebuild(SPEC, source_path, out, init=INIT)
    assert out.read_bytes() == before
    assert rebuild(SPEC, source_path, out, init=INIT, overwrite=True).verified is True
    with pytest.raises(ConversionError, match="would overwrite the input"):
        rebuild(SPEC, source_path, source_path, init=INIT, overwrite=True)
    pt2 = tmp_path / "model.pt2"
    pt2.write_bytes(b"older")
    with pytest.raises(ConversionError, match="exists"):
        rebuild(SPEC, source_path, pt2, init=INIT, example_inputs=[torch.randn(2, 3, 8, 8)])
    assert pt2.read_bytes() == b"older"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.pt",
        "model.pt2",
        "weights.safetensors",
    ]  # nothing half-written left beside them


def test_pickle_report_and_dynamic(tmp_path: Path) -> None:
    source_path, _ = weights(tmp_path)
    report = rebuild(
        SPEC,
        source_path,
        tmp_path / "m.pt",
        init=INIT,
        example_inputs={"x": torch.randn(2, 3, 8, 8)},
        dynamic={"x": {0: "batch"}},
    )
    assert report.verified is True and {"batch=3", "batch=5"} <= {c.sample for c in report.outputs}
    text = rebuild_markdown(report)
    assert text.startswith("# modelport rebuild: m.pt\n") and "**verified**" in text
    assert f"{report.tensors_compared} tensors compared bit for bit" in text and "all equal" in text
    assert "| Load with | `torch.load(" in text and "| batch=5 | `output` |" in text
    with pytest.raises(UsageError, match="not inputs"):
        rebuild(
            SPEC,
            source_path,
            tmp_path / "n.pt",
            init=INIT,
            example_inputs={"x": torch.randn(2, 3, 8, 8)},
            dynamic={"y": {0: "batch"}},
        )


def test_cli_example_inputs_dynamic_report(tmp_path: Path, cli: Cli) -> None:
    import numpy as np

    source_path, _ = weights(tmp_path)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, images=np.random.default_rng(0).standard_normal((2, 3, 8, 8), "float32"))
    out, report = tmp_path / "cli.pt2", tmp_path / "rebuild.md"
    argv = ["rebuild", "--model", SPEC, "--init", json.dumps(INIT), str(source_path), str(out)]
    argv += ["--example-inputs", str(inputs), "--dynamic", "x:0=batch", "--report", str(report)]
    result = cli(*argv)
    assert result.code == 0, result.err
    shown = result.out
    assert "loaded back and verified" in shown and f"report: {report}" in shown
    text = report.read_text()
    assert "| Format | pt2 |" in text and "| batch=5 | `output` | [5, 5] |" in text
    result = cli(*argv)
    assert result.code == 2 and "exists; pass --overwrite" in result.err
