"""TorchScript code read for names costs time in proportion to its size: a code file of one
long dotted name (80,000 parts, 160 KB) took 21 s of CPU to scan when each part rebuilt the
name so far."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import torch


class Plain(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _with_long_name(tmp_path: Path, parts: int) -> Path:
    source = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(Plain()), source)
    target = tmp_path / "model.pt"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = archive.read(info.filename)
            if info.filename.endswith(".py") and b"def forward" in data:
                data = b"x = " + b"a." * parts + b"b\n"
            out.writestr(info, data)
    return target


def test_a_code_file_of_one_long_dotted_name_scans_in_linear_time(tmp_path: Path) -> None:
    archive = _with_long_name(tmp_path, 40_000)
    probe = textwrap.dedent(
        f"""
        import resource, modelport
        report = modelport.scan({str(archive)!r})
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(report.verdict, usage.ru_utime + usage.ru_stime)
        """
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    verdict, _ = result.stdout.split()
    assert verdict in ("safe", "error"), result.stdout
    # quadratic: 5.7 s of CPU here; linear: 0.7 s, start-up included
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 3.0
