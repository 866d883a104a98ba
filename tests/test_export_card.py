"""``export --card`` and ``rebuild --card`` write a model card beside their output, with the
command as its provenance; ``--report FILE.html`` writes the page ``modelport report`` writes.

Oracles: huggingface_hub's ``ModelCard`` parses the card, onnx reads the exported graph's
initializers, onnxruntime runs the card's own loading code, and the card's recipe, run as
written in another folder, makes the same file again.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from tests.conftest import Cli
from tests.models import TinyResNet

INIT = '{"classes": 5, "width": 4}'


def python_blocks(text: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^(`{3,})python\n(.*?)^\1$", text, re.S | re.M)]


def weights(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "weights.safetensors"
    save_file(TinyResNet(classes=5, width=4).state_dict(), path)
    return path


def initializers(path: Path) -> dict[str, object]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


@pytest.mark.heavy
def test_export_card_and_html_report(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = weights(tmp_path)
    argv = ["export", "--model", "tests.models:TinyResNet", "--init", INIT, "--weights"]
    argv += [source.name, "--input", "x:2,3,16,16", "m.onnx", "--card", "--report", "m.html"]
    result = cli(*argv, "--json")
    assert result.code == 0, result.err
    assert result.json["card"] == "README.md" and result.json["verified"] is True

    text = (tmp_path / "README.md").read_text()
    assert ModelCard(text).data.tags == ["modelport", "onnx"]
    assert f"`{source.name}` (`safetensors`)" in text  # the source, with its digests
    assert json.dumps(str(source.name)) in text.split("Made with:")[1]
    assert "run in onnxruntime and compared with eager PyTorch" in text
    loading, recipe = python_blocks(text)
    scope: dict[str, object] = {}
    exec(loading, scope)  # the card's own loading code, run in the card's folder
    assert [o.shape for o in scope["outputs"]] == [(2, 5)]  # type: ignore[attr-defined]

    page = (tmp_path / "m.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>modelport report: m.onnx</title>" in page
    data = re.search(r'<script type="application/json" id="modelport-data">(.*?)</script>', page)
    assert data is not None
    listed = {t["name"] for t in json.loads(data.group(1))["files"][0]["stats"]["tensors"]}
    assert listed == set(initializers(tmp_path / "m.onnx"))

    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(source, again / source.name)
    monkeypatch.chdir(again)
    exec(recipe, {})  # the recipe, as written, makes the same export again
    first, second = initializers(tmp_path / "m.onnx"), initializers(again / "m.onnx")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)  # type: ignore[attr-defined]


def test_rebuild_card_says_the_weights_are_the_sources(tmp_path: Path, cli: Cli) -> None:
    source = weights(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["rebuild", "--model", "tests.models:TinyResNet", "--init", INIT, source]
    result = cli(*argv, out / "model.pt", "--card", "--report", out / "rebuild.md")
    assert result.code == 0, result.err
    assert f"card: {out / 'README.md'}" in result.out
    text = (out / "README.md").read_text()
    assert ModelCard(text).data.tags == ["modelport", "torch-zip"]
    assert "the weights are the source's, bit for bit" in text  # the digests agree
    assert "state-dict tensors compared bit for bit" in text
    assert "tests.models.TinyResNet must be importable" in text
    assert (out / "rebuild.md").read_text().startswith("# modelport rebuild: model.pt")
    rebuilt = torch.load(out / "model.pt", weights_only=False)
    assert isinstance(rebuilt, TinyResNet)


def test_card_and_report_are_refused_before_any_work(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "README.md").write_text("# someone's card\n")
    argv = ["export", "--model", "tests.models:TinyResNet", "--input", "x:1,3,8,8"]
    taken = cli(*argv, tmp_path / "m.onnx", "--card")
    assert taken.code == 2 and "README.md exists" in taken.err
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    both = ["--card", "--report", fresh / "README.md"]
    same = cli(*argv, fresh / "m.pt2", "--to", "pt2", *both)
    assert same.code == 2 and "--report and --card would write the same file" in same.err
    assert not any(fresh.iterdir())
    weights_path = weights(tmp_path)
    rebuild = ["rebuild", "--model", "tests.models:TinyResNet", weights_path, tmp_path / "m.pt"]
    assert cli(*rebuild, "--report", weights_path).code == 2  # never over the weights
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["README.md", "fresh", "weights.safetensors"]  # nothing was written
