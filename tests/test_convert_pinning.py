"""The source is pinned for the whole conversion: a file renamed over it or written in place
while it is being copied makes the run fail with the reason, and nothing is installed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import modelport
from modelport.errors import SourceChangedError
from tests.conftest import Cli


def _renamed_over(source: Path, other: Path) -> Callable[[], None]:
    return lambda: other.replace(source)


def _written_in_place(source: Path, other: Path) -> Callable[[], None]:
    def write() -> None:
        with open(source, "r+b") as handle:
            handle.seek(-64, os.SEEK_END)
            handle.write(b"\x00" * 8)

    return write


@pytest.mark.parametrize("change", [_renamed_over, _written_in_place], ids=["renamed", "in-place"])
@pytest.mark.parametrize("target_name", ["out.safetensors", "out-folder"])
def test_a_source_changed_mid_conversion_installs_nothing(
    tmp_path: Path, change: Callable[[Path, Path], Callable[[], None]], target_name: str
) -> None:
    source, other = tmp_path / "model.pt", tmp_path / "other.pt"
    torch.save({"w": torch.arange(4096.0), "b": torch.ones(8)}, source)
    torch.save({"w": torch.zeros(4096), "b": torch.ones(8)}, other)
    act = change(source, other)
    fired: list[int] = []

    def on_progress(done: int, total: int) -> None:
        if not fired:
            fired.append(done)
            act()

    target = tmp_path / target_name
    options = modelport.ConvertOptions(to="hf" if target_name == "out-folder" else None)
    with pytest.raises(SourceChangedError, match="changed while it was being converted"):
        modelport.convert(source, target, options, on_progress=on_progress)
    assert fired, "the change never happened"
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.pt", "other.pt"] if change is _written_in_place else ["model.pt"]
    )


def test_an_unchanged_source_converts(tmp_path: Path, cli: Cli) -> None:
    source = tmp_path / "model.pt"
    torch.save({"w": torch.arange(16.0)}, source)
    result = cli("convert", source, tmp_path / "out.safetensors", "--json")
    assert result.code == 0, result.err
    assert result.json["verified"] is True
