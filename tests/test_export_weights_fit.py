"""``export`` and ``rebuild`` with weights that do not fit the model: refused with ``check``'s
answer, not with ``load_state_dict``'s message (every key, kilobytes for a real model).

Oracle: torch's own ``load_state_dict(strict=True)``, which refuses the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import modelport
from modelport.errors import ConversionError
from tests.conftest import Cli
from tests.models import TinyResNet

INIT = '{"classes": 5, "width": 4}'


def lightning_weights(tmp_path: Path) -> Path:
    """TinyResNet's weights under Lightning's ``model.`` prefix: every key missing and
    every key unexpected."""
    torch.manual_seed(0)
    state = TinyResNet(classes=5, width=4).state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        TinyResNet(classes=5, width=4).load_state_dict({f"model.{k}": v for k, v in state.items()})
    path = tmp_path / "lightning.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_export_reports_the_misfit_as_check_does(tmp_path: Path, cli: Cli) -> None:
    weights = lightning_weights(tmp_path)
    model = ["--model", "tests.models:TinyResNet", "--init", INIT]
    out = tmp_path / "m.onnx"
    exported = cli("export", *model, "--weights", weights, "--input", "x:1,3,8,8", out)
    checked = cli("check", *model, weights)
    assert checked.code == 1 and exported.code == 2
    assert checked.out.splitlines()[0].startswith("does not fit: 32 missing, 32 unexpected")
    assert "likely cause: prefix shift" in checked.out
    for line in checked.out.splitlines():
        assert line in exported.err
    assert "Missing key(s)" not in exported.err and "size mismatch" not in exported.err
    assert not out.exists()


def test_rebuild_reports_the_misfit_as_check_does(tmp_path: Path) -> None:
    weights = lightning_weights(tmp_path)
    expected = modelport.check(weights, "tests.models:TinyResNet", init=INIT)
    assert not expected.ok
    with pytest.raises(ConversionError) as refused:
        modelport.rebuild("tests.models:TinyResNet", weights, tmp_path / "m.pt", init=INIT)
    assert str(refused.value).splitlines()[1:] == expected.lines()
    assert list(tmp_path.iterdir()) == [weights]
