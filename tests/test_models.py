"""``--model`` naming a saved model: TorchScript, ``.pt2``, and a whole-model pickle (only with
``--trust-code``); recognised by content, never by extension."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelport.errors import CodeExecutionWarning, ConversionError, ModelSpecError, UnsafeModelError
from modelport.torch_models.building import resolve_model
from modelport.torch_models.checking import check
from modelport.torch_models.rebuilding import rebuild
from tests.conftest import Cli, CliResult
from tests.models import TinyResNet

pytestmark = pytest.mark.heavy  # exports run in every target runtime

INPUT = ["--input", "x:2,3,8,8"]


def tiny() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet(classes=5, width=4).eval()


def export_json(cli: Cli, *argv: str) -> CliResult:
    return cli("export", *INPUT, "--json", *argv)


@pytest.mark.parametrize(
    ("to", "extra"),
    [("pt2", ["--dynamic", "x:0=batch"]), ("onnx", []), ("onnx", ["--exporter", "legacy"])],
)
def test_torchscript_file_as_model(tmp_path: Path, cli: Cli, to: str, extra: list[str]) -> None:
    scripted = tmp_path / "scripted.bin"  # an extension that says nothing: content decides
    torch.jit.save(torch.jit.script(tiny()), str(scripted))
    out = tmp_path / f"out.{to}"
    result = export_json(cli, "--model", str(scripted), "--to", to, *extra, str(out))
    assert result.code == 0, result.err
    payload = result.json
    assert payload["verified"] is True
    assert payload["model"] == "TinyResNet (TorchScript)"
    if extra[:1] == ["--dynamic"]:
        assert "batch=5" in {o["sample"] for o in payload["outputs"]}


def test_pt2_file_as_model(tmp_path: Path, cli: Cli) -> None:
    program = tmp_path / "program.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(tiny(), (torch.randn(2, 3, 8, 8),)), str(program))
    result = export_json(cli, "--model", str(program), "--to", "onnx", str(tmp_path / "p.onnx"))
    assert result.code == 0, result.err
    payload = result.json
    assert payload["verified"] is True
    assert payload["model"] == "torch.fx.GraphModule"
    model = resolve_model(program)  # the API: the same single resolver
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        assert torch.allclose(model(x), tiny()(x), atol=1e-6)


def test_whole_model_pickle_needs_trust_code(tmp_path: Path, cli: Cli) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(tiny(), whole)
    out = tmp_path / "out.pt2"
    result = cli("export", *INPUT, "--model", whole, "--to", "pt2", out)
    assert result.code == 2
    error = result.err
    assert "is a pickled nn.Module of class tests.models.TinyResNet" in error
    assert "runs code from the file" in error and "--trust-code" in error
    assert "--model pkg.module:TinyResNet --weights" in error and not out.exists()
    with pytest.raises(ModelSpecError, match=r"pickled nn\.Module"):
        resolve_model(whole)
    with pytest.warns(CodeExecutionWarning, match="scan says suspicious: custom-class"):
        result = export_json(cli, "--model", str(whole), "--trust-code", "--to", "pt2", str(out))
    assert result.code == 0, result.err
    payload = result.json
    assert payload["verified"] is True
    assert payload["model"] == "tests.models.TinyResNet"


def test_attack_pickle_as_model_never_runs(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    evil = tmp_path / "model.pt"
    evil.write_bytes(attacks["exec"])
    out = tmp_path / "out.pt2"
    result = cli("export", *INPUT, "--model", evil, "--to", "pt2", out)
    assert result.code == 2
    assert "holds no model modelport recognises" in result.err
    assert not marker.exists()
    # trusting the code is not enough when the scanner calls it unsafe
    result = cli("export", *INPUT, "--model", evil, "--trust-code", "--to", "pt2", out)
    assert result.code == 2
    error = result.err
    assert "unsafe" in error and "builtins.exec" in error and "--allow-unsafe" in error
    assert not marker.exists() and not out.exists()
    with pytest.raises(UnsafeModelError):
        resolve_model(evil, trust_code=True)
    assert not marker.exists()


def test_weights_file_as_model_says_use_weights(tmp_path: Path) -> None:
    weights = tmp_path / "weights.safetensors"
    save_file(dict(tiny().state_dict()), str(weights))
    with pytest.raises(ModelSpecError, match=r"holding weights \(\d+ tensors\).*--weights"):
        resolve_model(weights)
    state = tmp_path / "state.pt"
    torch.save(tiny().state_dict(), state)
    with pytest.raises(ModelSpecError, match=r"--model pkg\.module:Name --weights"):
        resolve_model(state, trust_code=True)  # no module in it: nothing worth running


def test_check_and_weights_with_torchscript_model(tmp_path: Path) -> None:
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(tiny()), str(scripted))
    source = tiny()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)
    weights = tmp_path / "weights.safetensors"
    save_file(dict(source.state_dict()), str(weights))
    assert check(weights, str(scripted)).missing == ("scratch",)  # TorchScript keeps it
    save_file(dict(torch.jit.script(source).state_dict()), str(weights))
    assert check(weights, str(scripted)).ok
    model = resolve_model(scripted, weights=weights)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.state_dict()["fc.weight"], source.state_dict()["fc.weight"])
    with pytest.raises(ModelSpecError, match="--init applies"):
        resolve_model(scripted, init={"classes": 5})
    report = rebuild(scripted, weights, tmp_path / "new.ts", to="torchscript", example_inputs=[x])
    assert report.verified is True  # new weights into a TorchScript model, saved again
    reloaded = torch.jit.load(str(tmp_path / "new.ts"))
    assert torch.equal(reloaded.state_dict()["fc.weight"], source.state_dict()["fc.weight"])
    with pytest.raises(ConversionError, match="cannot be pickled whole"):
        rebuild(scripted, weights, tmp_path / "whole.pt")
