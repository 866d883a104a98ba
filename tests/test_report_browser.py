"""The report in a real browser: headless Chromium (Debian's ``chromium`` package, driven by
Playwright pointed at it; no browser download) with every request but ``file://`` aborted.
The page opens with no console error and no request, the tensor table sorts and filters,
the module tree expands, the diff heat map renders, an export's verification section shows
its table, a script planted in a tensor or output name never runs, and a 10,000-tensor
report opens and sorts within two seconds. Screenshots go to the
test's temporary folder (``MODELPORT_SCREENSHOTS=DIR`` keeps them).

Setup, once: ``apt-get install -y chromium`` and ``pip install playwright`` (the ``test``
extra); ``playwright install`` is not needed. ``scripts/test`` installs chromium when it is
missing and sets ``MODELPORT_REQUIRE_BROWSER=1``, which turns a missing browser or
Playwright from a skip into a failure: the suite it runs never passes without these tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
import tomllib
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from modelport.reporting import html, model_report
from modelport.reporting.verification import export_facts
from modelport.torch_models.agreement import OutputCheck
from modelport.torch_models.export_report import ExportReport
from tests.models import TinyResNet

pytestmark = pytest.mark.heavy
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE = "<script>alert(1)</script>"
ROOT = Path(__file__).resolve().parent.parent


def browser_missing(reason: str) -> NoReturn:
    """Skip, or fail where the browser tests must run (``MODELPORT_REQUIRE_BROWSER=1``)."""
    if os.environ.get("MODELPORT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (MODELPORT_REQUIRE_BROWSER=1: these tests must run)")
    pytest.skip(reason)


@dataclass
class Opened:
    """A report open in a page, and what the page did while it was open."""

    page: Any
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def visible_names(self, table: str) -> list[str]:
        return list(
            self.page.eval_on_selector_all(
                f"#{table} tbody tr:not([hidden]) td.name", "cells => cells.map(c => c.textContent)"
            )
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright import sync_api
    except ImportError:
        browser_missing("no playwright: pip install -e '.[test]'")
    if not Path(CHROMIUM).exists():
        browser_missing("no chromium: apt-get install -y chromium")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    kept = os.environ.get("MODELPORT_SCREENSHOTS")
    folder = Path(kept) if kept else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_report(browser: Any, path: Path) -> Opened:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    opened = Opened(context.new_page())

    def route(found: Any) -> None:
        if found.request.url.startswith("file://"):
            found.continue_()
        else:
            opened.blocked.append(found.request.url)
            found.abort()

    def dialog(shown: Any) -> None:
        opened.dialogs.append(shown.message)
        shown.dismiss()

    context.route("**/*", route)
    opened.page.on("console", lambda m: opened.errors.append(m.text) if m.type == "error" else 0)
    opened.page.on("pageerror", lambda e: opened.errors.append(str(e)))
    opened.page.on("dialog", dialog)
    opened.page.goto(path.as_uri())
    return opened


def write_report(paths: list[Path], out: Path) -> Path:
    out.write_text(html.render(model_report.build(paths)), encoding="utf-8")
    return out


def model_files(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    state = {
        f"layers.{i}.{role}.weight": (rng.standard_normal((32, 32)) * (i + 1)).astype(np.float32)
        for i in range(6)
        for role in ("attn", "mlp")
    }
    state[HOSTILE] = np.zeros(8, dtype=np.float32)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_numpy(state, a, metadata={"note": '<img src=x onerror="alert(2)">'})
    state["layers.4.mlp.weight"] = state["layers.4.mlp.weight"] + 1
    save_numpy(state, b)
    return a, b


def test_the_report_sorts_filters_expands_and_runs_nothing_planted(
    browser: Any, tmp_path: Path, shots: Path
) -> None:
    a, _ = model_files(tmp_path)
    opened = open_report(browser, write_report([a], tmp_path / "one.html"))
    page = opened.page
    page.screenshot(path=str(shots / "report.png"), full_page=True)
    before = opened.visible_names("table-0")
    assert len(before) == 13 and HOSTILE in before  # the planted name, shown as text

    page.click("#table-0 thead th[data-field=max] button")  # max, ascending
    ascending = opened.visible_names("table-0")
    assert ascending != before and ascending[0] == HOSTILE and ascending[-1].startswith("layers.5")
    page.click("#table-0 thead th[data-field=max] button")
    assert opened.visible_names("table-0") == [*reversed(ascending)]
    assert page.get_attribute("#table-0 thead th[data-field=max]", "aria-sort") == "descending"

    page.fill("#values-0 input.filter", "layers.1 mlp")
    assert opened.visible_names("table-0") == ["layers.1.mlp.weight"]
    assert page.text_content("#count-0") == "1 of 1 shown (13 in all)"
    page.fill("#values-0 input.filter", "")
    page.check("#flagged-0")
    assert opened.visible_names("table-0") == [HOSTILE]  # the only flag: all-zero

    node = page.locator("#tree-0 details").first  # "layers", closed
    assert node.evaluate("n => n.open") is False
    child = node.locator(":scope > ul > li").first  # layer "0"
    assert not child.is_visible()
    node.locator(":scope > summary").click()
    assert node.evaluate("n => n.open") is True and child.is_visible()
    page.click('button[data-tree="tree-0"][data-open="1"]')
    assert page.locator("#tree-0 details:not([open])").count() == 0

    assert page.locator("img").count() == 0 and page.locator("script:not([type])").count() == 1
    page.screenshot(path=str(shots / "report-sorted.png"), full_page=True)
    assert opened.dialogs == [] and opened.errors == [] and opened.blocked == []


def test_the_diff_heat_map_renders(browser: Any, tmp_path: Path, shots: Path) -> None:
    a, b = model_files(tmp_path)
    opened = open_report(browser, write_report([a, b], tmp_path / "pair.html"))
    page = opened.page
    cells = page.locator("svg.heat rect")
    assert cells.count() == 12
    box = cells.first.bounding_box()
    assert box is not None and box["width"] > 5 and box["height"] > 5
    fills = set(cells.evaluate_all("rects => rects.map(r => r.getAttribute('fill'))"))
    assert "#ffffff" in fills and len(fills) == 2  # equal layers white, the changed one not
    page.locator("#diff").screenshot(path=str(shots / "diff.png"))
    assert opened.dialogs == [] and opened.errors == [] and opened.blocked == []


def test_ten_thousand_tensors_open_and_sort(browser: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    values = rng.standard_normal((10_000, 16)).astype(np.float32)
    state = {f"model.layers.{i // 100}.block{i % 100}.weight": values[i] for i in range(10_000)}
    path = tmp_path / "many.safetensors"
    save_numpy(state, path)
    report = write_report([path], tmp_path / "many.html")
    opened = open_report(browser, report)
    page = opened.page
    loaded = page.evaluate(
        "() => { const n = performance.getEntriesByType('navigation')[0];"
        " return n.loadEventEnd - n.startTime; }"
    )
    sort_ms = page.evaluate(
        "() => { const t = performance.now();"
        " document.querySelector('#table-0 thead th[data-field=std] button').click();"
        " return performance.now() - t; }"
    )
    stds = values.std(axis=1)
    names = opened.visible_names("table-0")
    assert len(names) == 200 and names[0] == list(state)[int(stds.argmin())]
    page.click("#values-0 button.more[data-step='0']")
    assert len(opened.visible_names("table-0")) == 10_000
    print(f"10,000 tensors: opened in {loaded:.0f} ms, sorted in {sort_ms:.0f} ms")  # figures only
    assert opened.errors == [] and opened.blocked == []


def test_the_export_verification_renders(browser: Any, tmp_path: Path, shots: Path) -> None:
    a, _ = model_files(tmp_path)
    checks = (
        OutputCheck("logits", "example", (2, 5), "float32", 2.5e-7, 1e-6, 1e-4, 1e-3, True),
        OutputCheck(HOSTILE, "random1", (2, 5), "float32", 0.5, 0.1, 1e-4, 1e-3, False),
    )
    report = ExportReport(a, "onnx", (a,), False, 0.5, checks, 2.0, (HOSTILE,), runtime="ort")
    facts = export_facts(report, "--model pkg:Net", '# modelport export\nmain(["export"])\n')
    out = tmp_path / "export.html"
    out.write_text(html.render(model_report.build([a], verification=facts)), encoding="utf-8")
    opened = open_report(browser, out)
    page = opened.page
    page.click('nav a[href="#verification"]')
    table = page.locator("#verification-checks")
    assert table.is_visible() and table.locator("tbody tr").count() == 2
    box = table.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 40
    exact = table.locator("td[data-value]").evaluate_all(
        "cells => cells.map(c => Number(c.dataset.value))"
    )
    assert exact[:4] == [2.5e-7, 1e-6, 1e-4, 1e-3]  # the first row's numbers, unrounded
    assert table.locator("tbody tr").nth(1).locator("td code").text_content() == HOSTILE
    assert page.locator("#verification pre code").is_visible()  # the recipe
    page.locator("#verification").screenshot(path=str(shots / "verification.png"))
    assert opened.dialogs == [] and opened.errors == [] and opened.blocked == []


def test_the_fit_and_the_config_json_render(browser: Any, tmp_path: Path, shots: Path) -> None:
    folder = tmp_path / "resnet"
    folder.mkdir()
    weights = TinyResNet().state_dict()
    save_file({k: v for k, v in weights.items() if k != "fc.bias"}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "resnet", "note": "' + HOSTILE + '"}')
    out = tmp_path / "fit.html"
    built = model_report.build([folder], model="tests.models:TinyResNet")
    out.write_text(html.render(built), encoding="utf-8")
    opened = open_report(browser, out)
    page = opened.page
    page.click('nav a[href="#fit-0"]')
    assert page.locator("#fit-0 .verdict.misfit").is_visible()
    assert page.locator("#fit-0 li code").all_text_contents() == ["fc.bias"]
    config = page.locator("#structure-0 details.config")
    assert config.evaluate("n => n.open") is False and not config.locator("pre").is_visible()
    config.locator(":scope > summary").click()
    assert config.locator("pre").is_visible() and HOSTILE in config.locator("pre").inner_text()
    page.locator("#fit-0").screenshot(path=str(shots / "fit.png"))
    assert opened.dialogs == [] and opened.errors == [] and opened.blocked == []


def test_a_missing_browser_fails_where_it_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPORT_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="no chromium"):
        browser_missing("no chromium")
    monkeypatch.delenv("MODELPORT_REQUIRE_BROWSER")
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        browser_missing("no chromium")


def test_the_test_script_provides_the_browser() -> None:
    """scripts/test installs Debian's chromium when missing and requires the browser tests;
    Playwright comes with the test extra."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    test_extra = extra["optional-dependencies"]["test"]
    assert any(dependency.startswith("playwright") for dependency in test_extra)
    script = (ROOT / "scripts" / "test").read_text()
    assert "apt-get install -y chromium" in script and "command -v chromium" in script
    assert "export MODELPORT_REQUIRE_BROWSER=1" in script
