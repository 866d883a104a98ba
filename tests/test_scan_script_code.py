"""TorchScript code is read with Python's tokenizer: a file-reading operator is found however
the call is spaced or split, wherever it sits, and code that cannot be read is an error."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import modelport
from modelport.scanning import script_code


class Plain(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _with_code(tmp_path: Path, rewrite: str) -> Path:
    """A real scripted module whose forward is rewritten to ``rewrite`` (indented body)."""
    source = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(Plain()), source)
    target = tmp_path / "model.pt"
    rewritten = False
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = archive.read(info.filename)
            if info.filename.endswith(".py") and b"def forward" in data:
                head, _, _ = data.decode().partition("    return")
                data = (head + rewrite).encode()
                rewritten = True
            out.writestr(info, data)
    assert rewritten, "no forward() in the archive's code"
    return target


@pytest.mark.parametrize(
    "body",
    [
        '    y = torch.from_file("/etc/hostname", None, 4, dtype=0)\n    return x\n',
        '    y = torch . from_file ("/etc/hostname", None, 4)\n    return x\n',
        '    y = torch.\\\n      from_file("/etc/hostname", None, 4)\n    return x\n',
        '    y = ops.aten.from_file(  # a comment\n      "/etc/hostname", None, 4)\n    return x\n',
        '    torch.save(x, "/tmp/anywhere")\n    return x\n',
        '    ops.aten.save(x, "/tmp/anywhere")\n    return x\n',
    ],
    ids=["plain", "spaced", "continued", "ops-namespace", "save", "save-ops-namespace"],
)
def test_file_operators_are_found_however_spelled(tmp_path: Path, body: str) -> None:
    report = modelport.scan(_with_code(tmp_path, body))
    assert report.verdict == "unsafe", report.to_json()
    assert [f.rule for f in report.serious] == ["torchscript-file-access"]


def test_a_custom_operator_namespace_is_suspicious(tmp_path: Path) -> None:
    body = "    return torch.ops.mylib.run_native(x)\n"
    report = modelport.scan(_with_code(tmp_path, body))
    assert report.verdict == "suspicious", report.to_json()
    rules = {f.rule for f in report.files[0].findings}
    assert "torchscript-custom-op" in rules


REGISTERED = """
import torch
print(*sorted({name.split("::")[0] for name in torch._C._dispatch_get_all_op_names()}))
"""


def test_torch_own_operator_namespaces_are_no_custom_op(tmp_path: Path) -> None:
    """Every namespace torch's dispatcher registers itself is torch's, not a native library
    of the model's, but for the communication and test namespaces left out on purpose."""
    listed = subprocess.run(  # in a fresh process: torch's submodules register more on import
        [sys.executable, "-c", REGISTERED], capture_output=True, text=True, check=True
    )
    registered = set(listed.stdout.split())
    assert "aten" in registered
    apart = {"c10d", "symm_mem", "_test", "debug_mode_ops", "debugprims"}
    assert registered - apart <= script_code.TORCH_NAMESPACES
    calls = "".join(f"    x = torch.ops.{ns}.some_op(x)\n" for ns in sorted(registered - apart))
    report = modelport.scan(_with_code(tmp_path, calls + "    return x\n"))
    assert report.verdict == "safe", report.to_json()
    apart_call = "    return torch.ops.c10d.allreduce_(x)\n"
    report = modelport.scan(_with_code(tmp_path, apart_call))
    assert report.verdict == "suspicious", report.to_json()


def test_the_same_text_in_a_string_or_comment_is_not_a_call(tmp_path: Path) -> None:
    body = '    s = "torch.from_file(x)"  # from_file( in a comment\n    return x\n'
    assert modelport.scan(_with_code(tmp_path, body)).verdict == "safe"


def test_code_the_tokenizer_rejects_is_an_error(tmp_path: Path) -> None:
    body = '    return """never closed\n'
    report = modelport.scan(_with_code(tmp_path, body))
    assert report.verdict == "error", report.to_json()


def test_setstate_runs_while_loading(tmp_path: Path) -> None:
    body = (
        "    return x\n"
        "  def __setstate__(self, state: Tuple[bool]) -> None:\n"
        '    _0 = torch.from_file("/etc/hostname", None, 4)\n'
        "    return None\n"
    )
    (finding,) = modelport.scan(_with_code(tmp_path, body)).serious
    assert "while the model loads" in finding.message


class SavesWhileLoading(torch.nn.Module):
    """torch.jit.load runs __setstate__, and TorchScript's torch.save (aten::save) writes
    the path it is given: here one kept in the saved state."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.w = torch.ones(2)
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.w = state[0]
        self.target = state[1]
        self.training = state[2]
        torch.save(self.w, self.target)


def test_torch_save_in_setstate_writes_files_on_load(tmp_path: Path) -> None:
    path, written = tmp_path / "model.pt", tmp_path / "written-on-load.pt"
    torch.jit.save(torch.jit.script(SavesWhileLoading(str(written))), path)
    assert not written.exists()
    report = modelport.scan(path)
    assert report.verdict == "unsafe", report.to_json()
    (finding,) = report.serious
    assert finding.rule == "torchscript-file-access"
    assert "while the model loads" in finding.message
    torch.jit.load(path)
    assert written.exists()  # the oracle: the default loader wrote the file
    body = "    self.save(x)\n    return x\n"  # a method of the model's own, not aten::save
    assert modelport.scan(_with_code(tmp_path, body)).verdict == "safe"
