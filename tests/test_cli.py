"""The command line: output, JSON contract and exit codes, as a user sees them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

import modelport
from tests import yolo_shapes
from tests.conftest import Cli
from tests.models import TinyResNet, trained_checkpoint


def test_inspect_json_contract(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(trained_checkpoint(TinyResNet(), torch.randn(2, 3, 8, 8)), path)
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    payload = result.json
    for key in (
        "format",
        "size_bytes",
        "parameters",
        "metadata",
        "tensors",
        "extras",
        "aliases",
        "warnings",
    ):
        assert key in payload
    assert payload["format"] == "torch-zip"
    assert payload["size_bytes"] == path.stat().st_size
    first = payload["tensors"][0]
    assert set(first) == {"name", "dtype", "shape", "nbytes"}
    assert payload["extras"]["epoch"] == 3
    # the model's parameters(): not the optimizer's moments, nor the BatchNorm buffers
    assert payload["parameters"] == sum(p.numel() for p in TinyResNet().parameters())
    assert payload["parameters"] < sum(math.prod(t["shape"]) for t in payload["tensors"])


def test_inspect_human_output(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "m.pt"
    torch.save(TinyResNet(), path)
    result = cli("inspect", path, "--tensors")
    assert result.code == 0, result.err
    out = result.out
    assert "torch-zip" in out and "TinyResNet" in out and "fc.weight" in out


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "pointer.bin"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 10\n"
    )
    result = cli("inspect", path)
    assert result.code == 2
    assert "Traceback" not in result.err
    assert "git lfs pull" in result.err
    result = cli("inspect", path, "--json")
    assert result.code == 2
    error = result.json["error"]
    assert error["type"] == "NotAModelError" and "LFS" in error["message"]
    assert cli("inspect", tmp_path / "missing.pt").code == 2


def test_python_m_modelport_entry_point(tmp_path: Path) -> None:
    # a child process: what runs is `python -m modelport` itself, and its exit status
    run = [sys.executable, "-m", "modelport"]
    done = subprocess.run([*run, "--version"], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, f"modelport {modelport.__version__}\n")
    missing = str(tmp_path / "missing.pt")
    done = subprocess.run([*run, "inspect", missing], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and missing in done.stderr, done.stderr
    done = subprocess.run(
        [*run, "inspect", missing, "--json"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["type"] == "ModelFileNotFoundError"


def test_a_detection_checkpoint_prints_a_short_tree(tmp_path: Path, cli: Cli) -> None:
    """An ultralytics-shaped ``best.pt`` (a pickled DetectionModel of some 200 modules): the
    tree stops two levels down and counts the rest, and ``--depth`` shows them all."""
    path = tmp_path / "best.pt"
    checkpoint = {"epoch": 3, "model": yolo_shapes.DetectionModel().half(), "optimizer": None}
    torch.save(checkpoint, path)
    shown = cli("inspect", path).out
    assert [line for line in shown.splitlines() if line.endswith(" ")] == []  # no padding
    tree = _tree_lines(shown)
    whole = _tree_lines(cli("inspect", path, "--depth", "99").out)
    assert 20 < len(tree) <= 45, tree
    assert len(whole) > 200
    assert "└── 17: tests.yolo_shapes.Detect" in "\n".join(tree)
    assert "… 62 modules below (--depth for more)" in "\n".join(tree)


def _tree_lines(out: str) -> list[str]:
    """The module tree's lines of ``inspect``'s output: from ``modules`` to the next section."""
    lines = out.splitlines()
    start = lines.index("modules") + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith((" ", "└", "├")))
    return lines[start:end]


def test_inspect_folds_the_module_tree_below_depth(tmp_path: Path, cli: Cli) -> None:
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU())),
        torch.nn.Linear(2, 1),
    )
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    shallow = cli("inspect", path, "--depth", "1")
    assert shallow.code == 0
    assert "… 3 modules below (--depth for more)" in shallow.out
    relu = "── 0: torch.nn.modules.activation.ReLU"  # the innermost module's tree line
    assert relu not in shallow.out
    deep = cli("inspect", path, "--depth", "3")
    assert relu in deep.out and "modules below" not in deep.out
