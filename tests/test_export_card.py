"""``export --card`` and ``rebuild --card`` write a model card beside their output, with the
command as its provenance; ``--report FILE.html`` writes the page ``modelport report`` writes,
opened by the verification the Markdown report shows.

Oracles: huggingface_hub's ``ModelCard`` parses the card, onnx reads the exported graph's
initializers, onnxruntime runs the card's own loading code, and the card's recipe, run as
written in another folder, makes the same file again. The page is read back with the
standard library's ``html.parser``; its verification table must carry the numbers of the
command's own ``--json`` report, and the Markdown report the same cells.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from modelport.cli.markdown import markdown
from modelport.reporting import html, model_report
from modelport.reporting.verification import export_facts
from modelport.torch_models.agreement import OutputCheck
from modelport.torch_models.export_report import ExampleInput, ExportReport
from tests.conftest import Cli
from tests.html_check import assert_self_contained, read_page
from tests.models import TinyResNet

INIT = '{"classes": 5, "width": 4}'
CHECK_HEADER = ["Inputs", "Output", "Shape", "Dtype", "Max abs", "Max rel", "atol", "rtol"]
PAGE_SECTIONS = ("verification", "identity", "safety", "flags-0", "structure-0", "values-0")
Cell = tuple[str, str | None]  # its text, its data-value


class Tables(HTMLParser):
    """Every table of a page that has an id: its rows, header row first, as cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[Cell]]] = {}
        self.table: str | None = None
        self.cell: list[str] | None = None
        self.value: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table":
            self.table = found.get("id")
            if self.table is not None:
                self.tables[self.table] = []
        elif tag == "tr" and self.table is not None:
            self.tables[self.table].append([])
        elif tag in ("td", "th") and self.table is not None:
            self.cell, self.value = [], found.get("data-value")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.table = None
        elif tag in ("td", "th") and self.table is not None and self.cell is not None:
            self.tables[self.table][-1].append(("".join(self.cell), self.value))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def page_tables(page: str) -> dict[str, list[list[Cell]]]:
    found = Tables()
    found.feed(page)
    found.close()
    return found.tables


def page_data(page: str) -> Any:
    return read_page(page).data()


def checks_as_json(rows: list[list[Cell]]) -> list[dict[str, Any]]:
    """The page's verification rows in the fields of ``OutputCheck.to_json``, numbers from
    each cell's exact value."""
    header, *body = rows
    assert [title for title, _ in header] == [*CHECK_HEADER, "Result"]

    def exact(cell: Cell) -> float | None:
        assert cell[1] is not None
        number = float(cell[1])
        return number if abs(number) != float("inf") and number == number else None

    return [
        {
            "sample": row[0][0],
            "name": row[1][0],
            "shape": json.loads(row[2][0]),
            "dtype": row[3][0],
            "max_abs": exact(row[4]),
            "max_rel": exact(row[5]),
            "atol": exact(row[6]),
            "rtol": exact(row[7]),
            "ok": {"ok": True, "FAIL": False}[row[8][0]],
        }
        for row in body
    ]


def compared(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("sample", "name", "shape", "dtype", "max_abs", "max_rel", "atol", "rtol", "ok")
    return [{k: o[k] for k in keys} for o in outputs]


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
    assert_self_contained(read_page(page))
    assert all(f"<section id={name}>" in page for name in PAGE_SECTIONS)
    data = page_data(page)
    listed = {t["name"] for t in data["files"][0]["stats"]["tensors"]}
    assert listed == set(initializers(tmp_path / "m.onnx"))
    exported = {k: v for k, v in result.json.items() if k != "card"}  # the ExportReport
    assert data["verification"] == {"command": "export", "report": exported, "recipe": recipe}
    shown = checks_as_json(page_tables(page)["verification-checks"])
    assert len(shown) == 3 and shown == compared(exported["outputs"])  # example, random1, 2
    said = read_page(page).text
    assert "Verified inonnxruntime" in said and f"Time{exported['seconds']:.2f} s" in said
    assert "Recipe" in said and recipe in said  # the recipe, as the card has it

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


def test_rebuild_html_report_carries_its_verification(tmp_path: Path, cli: Cli) -> None:
    source = weights(tmp_path)
    out = tmp_path / "model.pt"
    argv = ["rebuild", "--model", "tests.models:TinyResNet", "--init", INIT, source, out]
    result = cli(*argv, "--input", "x:2,3,8,8", "--report", tmp_path / "r.html", "--json")
    assert result.code == 0, result.err
    page = (tmp_path / "r.html").read_text()
    assert_self_contained(read_page(page))
    assert all(f"<section id={name}>" in page for name in PAGE_SECTIONS)
    data = page_data(page)
    assert data["verification"]["command"] == "rebuild"
    assert data["verification"]["report"] == result.json  # the RebuildReport
    called = data["verification"]["recipe"].rsplit("main(", 1)[1].rstrip(")\n")
    again = [*argv[:5], "--input", "x:2,3,8,8", str(source), str(out)]
    assert json.loads(called) == again  # the command line, for modelport's main to run again
    shown = checks_as_json(page_tables(page)["verification-checks"])
    assert shown and shown == compared(result.json["outputs"])
    said = read_page(page).text
    assert f"{result.json['tensors_compared']} tensors compared bit for bit" in said
    assert "all equal." in said and "Load withtorch.load(" in said


def hand_made_export(written: Path) -> ExportReport:
    """An export report with every kind of row: a failed check, a non-finite error, padding,
    a pipe and markup in names, warnings."""
    exact = OutputCheck(
        "logits", "example", (2, 5), "float32", 1.2345678e-7, 3e-6, 1e-4, 1e-3, True
    )
    nan, inf = float("nan"), float("inf")
    broken = OutputCheck("a|<b>", "batch=3", (3, 5), "float16", nan, inf, 1e-2, 1e-2, False, 4)
    return ExportReport(
        path=written,
        format="onnx",
        files=(written,),
        verified=False,
        max_abs_error=nan,
        outputs=(exact, broken),
        seconds=1.25,
        warnings=("exporter said <i>careful</i>",),
        model="pkg.Net",
        exporter="dynamo",
        opset=18,
        inputs=(ExampleInput("x", (2, 3), "float32", ((0, "batch"),)),),
        sizes=(written.stat().st_size,),
        runtime="onnxruntime",
    )


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table: its rows (header first, the rule left out) as cell texts with
    the code and strong marks and the pipe escapes removed."""
    tables: list[list[list[str]]] = [[]]
    for line in text.splitlines():
        if not line.startswith("|"):
            tables += [[]] if tables[-1] else []
        elif not line.startswith("|---"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            tables[-1].append([re.sub(r"`|\*\*", "", c.strip()).replace("\\|", "|") for c in cells])
    return [t for t in tables if t]


def test_markdown_and_page_show_the_same_facts(tmp_path: Path) -> None:
    written = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3, 3)}, written)
    report = hand_made_export(written)
    recipe = '# modelport export --model pkg:Net m.onnx\nmain(["export"])\n'
    facts = export_facts(report, "--model pkg:Net", recipe)
    text = markdown(facts)
    page = html.render(model_report.build([written], digests=False, verification=facts))
    assert_self_contained(read_page(page))
    tables = page_tables(page)
    summary, files, inputs, checks = markdown_tables(text)
    for name, rows in (("files", files), ("inputs", inputs), ("checks", checks)):
        assert [[cell for cell, _ in row] for row in tables[f"verification-{name}"]] == rows
    assert checks_as_json(tables["verification-checks"]) == compared(
        report.to_json()["outputs"]
    )  # nan and inf: null, as the command's JSON says
    assert checks[2][4:6] == ["nan", "inf"] and "a|<b>" in checks[2][1]
    said = read_page(page).text
    assert all(f"{label}{value}" in said for label, value in summary[1:])
    assert "Verified inonnxruntime" in said and "FAILED: 1 of 2 comparisons" in said
    assert "exporter said <i>careful</i>" in said and "- exporter said <i>careful</i>" in text
    assert "up to 4 per input set" in said and "up to 4 per input set" in text
    assert recipe in said and f"```python\n{recipe}```" in text
    assert page_data(page)["verification"] == {
        "command": "export",
        "report": json.loads(json.dumps(report.to_json())),
        "recipe": recipe,
    }
