"""The command line: output, JSON contract and exit codes, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from modelport.cli.main import main
from tests.models import TinyResNet, trained_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelport", *args], capture_output=True, text=True, check=False
    )


def test_inspect_json_contract(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(trained_checkpoint(TinyResNet(), torch.randn(2, 3, 8, 8)), path)
    result = run_cli("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
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
    assert payload["parameters"] == sum(
        t["nbytes"] // {"float32": 4, "int64": 8}[t["dtype"]] for t in payload["tensors"]
    )


def test_inspect_human_output(tmp_path: Path, capsys: object) -> None:
    path = tmp_path / "m.pt"
    torch.save(TinyResNet(), path)
    assert main(["inspect", str(path), "--tensors"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "torch-zip" in out and "TinyResNet" in out and "fc.weight" in out


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "pointer.bin"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 10\n"
    )
    result = run_cli("inspect", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "git lfs pull" in result.stderr
    result = run_cli("inspect", str(path), "--json")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "NotAModelError" and "LFS" in error["message"]
    assert run_cli("inspect", str(tmp_path / "missing.pt")).returncode == 2
