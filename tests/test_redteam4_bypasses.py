"""Bypasses a fourth red-team audit found in the fixes of the third, each checked against its
real loader: TorchScript's ``torch.autograd`` (read as ``torch``), operator namespaces held
in a variable, joblib side files named through BUILD's slot state, and a Dense config's
dotted activation without the layer's sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modelport
from modelport.scanning import script_code
from tests.attacks.corpus_bypasses import joblib_side_file
from tests.attacks.writers import _scripted, zip_archive


def _archive_whose_setstate_runs(tmp_path: Path, line: str) -> Path:
    """A scripted module's archive whose ``__setstate__`` (run by torch.jit.load) also
    runs ``line``."""
    anchor = "    self.weight = (state)[0]\n"
    members = []
    for name, data in _scripted():
        if "/code/" in name and name.endswith(".py"):
            text = data.decode()
            assert anchor in text
            data = text.replace(anchor, f"{anchor}    {line}\n").encode()
        members.append((name, data))
    target = tmp_path / "model.pt"
    target.write_bytes(zip_archive(members))
    return target


@pytest.mark.parametrize(
    "line",
    [
        'torch.autograd.save(self.weight, "{out}")',
        'ops.aten.autograd.save(self.weight, "{out}")',
        'ops.prim.autograd.save(self.weight, "{out}")',
        'getattr(torch, "autograd").save(self.weight, "{out}")',
        't = torch\n    t.save(self.weight, "{out}")',
    ],
    ids=["torch-autograd", "ops-aten-autograd", "ops-prim-autograd", "getattr-autograd", "alias"],
)
def test_torch_save_spelled_through_autograd_or_an_alias_is_unsafe(
    tmp_path: Path, line: str
) -> None:
    written = tmp_path / "written-on-load.pt"
    path = _archive_whose_setstate_runs(tmp_path, line.format(out=written))
    report = modelport.scan(path)
    assert report.verdict == "unsafe", report.to_json()
    assert {f.rule for f in report.serious} <= {"torchscript-file-access", "computed-call"}
    torch.jit.load(str(path))
    assert written.exists()


def test_the_same_archive_without_the_line_is_safe(tmp_path: Path) -> None:
    path = _archive_whose_setstate_runs(tmp_path, "pass")
    assert modelport.scan(path).verdict == "safe"
    assert torch.jit.load(str(path))(torch.zeros(2)).tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("  a = ops.aten\n  return a.add(x, x)\n", [("computed-call", "HIGH")]),
        ("  return ops.mylib.run(x)\n", [("torchscript-custom-op", "MEDIUM")]),
        ("  return ops.mylib.autograd.run(x)\n", [("torchscript-custom-op", "MEDIUM")]),
        ("  return getattr(getattr(ops, 'aten'), 'add')(x, x)\n", []),
        ("  return torch.add(ops.aten.mul(x, x), ops.prim.NumToTensor(x))\n", []),
        ("  return torch.autograd.grad([x], [x])\n", []),
    ],
    ids=["namespace-alias", "custom-op", "custom-op-autograd", "nested-getattr", "aten", "grad"],
)
def test_operator_names_are_read_as_torchscript_reads_them(
    code: str, expected: list[tuple[str, str]]
) -> None:
    found = script_code.findings(f"def forward(self, x):\n{code}".encode(), "code/m.py")
    assert [(f.rule, f.severity.name) for f in found] == expected


@pytest.mark.parametrize("evil", [True, False], ids=["attack", "twin"])
def test_a_side_file_named_through_slot_state_is_judged(tmp_path: Path, evil: bool) -> None:
    marker = tmp_path / "marker"
    path = joblib_side_file(tmp_path, marker if evil else None, slot_state=True)
    report = modelport.scan(path)
    assert report.verdict == ("unsafe" if evil else "safe"), report.to_json()
    load = f"import joblib; joblib.load({str(path)!r})"
    subprocess.run([sys.executable, "-c", load], capture_output=True, timeout=120, check=False)
    assert marker.exists() == evil


@pytest.mark.parametrize(
    ("activation", "verdict"),
    [
        ("torch._dynamo.debug_utils.minifier_dir", "unsafe"),
        ("torch.nn.modules.activation.Tanh", "safe"),
    ],
)
def test_a_dense_config_without_sizes_has_its_activation_judged(
    tmp_path: Path, activation: str, verdict: str
) -> None:
    """sentence-transformers' Dense.load imports and calls the path before it reads the
    layer's sizes."""
    modules = [
        {"idx": 0, "name": "0", "path": "1_Dense", "type": "sentence_transformers.models.Dense"}
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Dense").mkdir()
    (tmp_path / "1_Dense" / "config.json").write_text(
        json.dumps({"activation_function": activation})
    )
    assert modelport.scan(tmp_path).verdict == verdict
