"""``modelport report``: one self-contained, well-formed HTML page per file or pair of files,
with identity, scan findings, structure, statistics and the diff; everything from the file
shown as text, never as markup; an unsafe file reported without running anything."""

from __future__ import annotations

import hashlib
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from gguf import GGUFWriter
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file as save_numpy

import modelport
from modelport.measuring.stats_records import Histogram
from modelport.reporting import html, model_report
from modelport.reporting.html_parts import SparkAxis, sparkline
from tests.conftest import Cli
from tests.html_check import Page, assert_self_contained, read_page
from tests.models import TinyResNet, trained_checkpoint

HOSTILE_NAME = "<script>alert(1)</script>"
HOSTILE_VALUE = '<img src=x onerror="alert(2)"></script><script>alert(3)</script>&amp;'


def report_page(cli: Cli, *paths: Path, out: Path) -> Page:
    result = cli("report", *paths, "-o", out)
    assert result.code == 0, result.err
    assert f"wrote {out}" in result.out
    return read_page(out.read_text(encoding="utf-8"))


def rows(page: Page, table: str) -> int:
    """Rows of a table: those in its JSON block, checked against those in the HTML itself."""
    every = page.data(f"rows-{table}")
    assert all(row.startswith("<tr>") and row.endswith("</tr>") for row in every)
    return len(every)


class Sections(HTMLParser):
    """The text of each ``<section id=...>`` and of each ``<details>`` in it, as a browser's
    tokenizer reads them (character references decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: dict[str, list[str]] = {}
        self.details: dict[str, list[str]] = {}
        self.current = ""
        self.depth = 0  # open <details> in the current section

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self.current = dict(attrs).get("id") or ""
            self.texts[self.current] = []
        elif tag == "details" and self.current:
            self.depth += 1
            self.details.setdefault(self.current, []).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.current = ""
        elif tag == "details" and self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.current:
            self.texts[self.current].append(data)
            if self.depth:
                self.details[self.current][-1] += data

    def text(self, section: str) -> str:
        return "".join(self.texts[section])


def sections(source: str) -> Sections:
    found = Sections()
    found.feed(source)
    found.close()
    return found


def test_a_checkpoint_gives_one_self_contained_page(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    checkpoint = trained_checkpoint(TinyResNet(), torch.randn(2, 3, 8, 8))
    checkpoint["best_loss"] = float("nan")
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    out = tmp_path / "report.html"
    page = report_page(cli, path, out=out)
    assert_self_contained(page)
    data = page.data()
    (section,) = data["files"]
    expected = modelport.inspect(path)
    assert section["inspect"]["tensor_count"] == len(expected.tensors)
    assert section["files"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert section["weights"]["digest"] == modelport.hash(path).digest
    assert section["inspect"]["extras"]["best_loss"] == "nan"  # strict JSON: no NaN token
    assert rows(page, "0") == len(expected.tensors)
    assert "model_state_dict" in page.text and "optimizer_state_dict" in page.text
    assert page.text.count("sha256") >= 1 and modelport.__version__ in page.text


def test_text_from_the_file_is_shown_as_text(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "hostile.safetensors"
    values = np.arange(300, dtype=np.float32)
    save_numpy(
        {HOSTILE_NAME: values, f"layer.{HOSTILE_VALUE}": values + 1},
        path,
        metadata={"note": HOSTILE_VALUE, HOSTILE_NAME: "key"},
    )
    page = report_page(cli, path, out=tmp_path / "hostile.html")
    assert_self_contained(page)  # still exactly our two scripts, and no image
    assert HOSTILE_NAME in page.text and HOSTILE_VALUE in page.text
    data = page.data()["files"][0]
    assert data["inspect"]["metadata"]["note"] == HOSTILE_VALUE
    assert {t["name"] for t in data["stats"]["tensors"]} == {HOSTILE_NAME, f"layer.{HOSTILE_VALUE}"}


def test_two_files_stand_side_by_side_with_their_diff(tmp_path: Path, cli: Cli) -> None:
    rng = np.random.default_rng(0)
    a = {f"layers.{i}.{role}": rng.standard_normal((16, 16)) for i in range(4) for role in "qk"}
    b = {name: value.copy() for name, value in a.items()}
    b["layers.2.q"] += 0.5
    a["only_a"], b["only_b"] = np.ones(3), np.ones(3)
    a["reshaped"], b["reshaped"] = np.ones((2, 3)), np.ones((3, 2))
    paths = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path, state in zip(paths, (a, b), strict=True):
        save_numpy({k: v.astype(np.float32) for k, v in state.items()}, path)
    out = tmp_path / "diff.html"
    page = report_page(cli, *paths, out=out)
    assert_self_contained(page)
    source = out.read_text()
    diff = page.data()["diff"]
    assert diff["only_in_a"] == ["only_a"] and diff["only_in_b"] == ["only_b"]
    assert [c["name"] for c in diff["changed"]] == ["reshaped"]
    assert "Only in A: 1" in page.text and "Only in B: 1" in page.text
    assert source.count("<rect ") == 8  # one heat map cell per layer and role
    assert "layers.2.q: max abs 0.5" in page.text
    assert rows(page, "diff") == 8
    assert rows(page, "0") == rows(page, "1") == 10


def test_an_unsafe_pickle_is_reported_and_nothing_runs(
    tmp_path: Path, cli: Cli, marker: Path, attacks: dict[str, bytes]
) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(attacks["global-reduce"])
    page = report_page(cli, path, out=tmp_path / "unsafe.html")
    assert_self_contained(page)
    assert not marker.exists()
    scan = page.data()["files"][0]["scan"]
    assert scan["verdict"] == "unsafe"
    finding = next(f for f in scan["findings"] if f["global"] == "posix.system")
    assert finding["opcode"] and finding["offset"] is not None and finding["fix"]
    assert "posix.system" in page.text and finding["fix"] in page.text


def test_gguf_key_values_and_onnx_inputs_are_shown(tmp_path: Path, cli: Cli) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(gguf_path), "llama")
    writer.add_string("general.name", HOSTILE_VALUE)
    writer.add_uint32("llama.context_length", 4096)
    writer.add_tensor("blk.0.attn_q.weight", np.ones((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    page = report_page(cli, gguf_path, out=tmp_path / "gguf.html")
    assert "llama.context_length" in page.text and HOSTILE_VALUE in page.text
    assert "constant" in page.text  # a tensor of ones is flagged

    weight = numpy_helper.from_array(np.ones((3, 2), dtype=np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "weight"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [weight],
    )
    onnx_path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph), onnx_path)
    page = report_page(cli, onnx_path, out=tmp_path / "onnx.html")
    assert_self_contained(page)
    assert "pixels" in page.text and "logits" in page.text and "MatMul" in page.text


def test_outputs_are_placed_like_every_other_command(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "w.safetensors"
    save_numpy({"w": np.arange(4, dtype=np.float32)}, path)
    out = tmp_path / "w.html"
    assert cli("report", path, "-o", out).code == 0
    refused = cli("report", path, "-o", out)
    assert refused.code == 2 and "--overwrite" in refused.err
    assert cli("report", path, "-o", out, "--overwrite", "--no-digests").code == 0
    assert read_page(out.read_text()).data()["files"][0]["weights"] is None
    assert cli("report", path, "-o", tmp_path / "w.txt").code == 2
    as_json = cli("report", path, "--json")
    assert as_json.json["files"][0]["stats"]["tensors"][0]["max"] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.html", "w.safetensors"]


def test_sparkline_puts_each_sign_on_its_side() -> None:
    histogram = Histogram(low=-3, negative=(1, 0, 0), positive=(0, 5, 1000))
    axis = SparkAxis.over([histogram])
    assert (axis.low, axis.high) == (-3, -1)
    svg = sparkline(histogram, zeros=7, axis=axis)
    negative = svg.split('class=n d="', 1)[1].split('"', 1)[0]
    positive = svg.split('class=p d="', 1)[1].split('"', 1)[0]
    assert negative.startswith("M4 ")  # exponent -3 is the outermost negative bar
    assert positive.count("M") == 2 and 'class=z d="M6 ' in svg  # zeros in the middle slot
    assert sparkline(None, 0, axis) == ""


def test_the_page_renders_a_report_built_in_process(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_numpy({"w": np.array([1.0, -2.0, math.inf], dtype=np.float32)}, path)
    report = model_report.build([path], digests=False)
    page = read_page(html.render(report))
    assert_self_contained(page)
    stats = page.data()["files"][0]["stats"]
    assert stats["tensors"][0]["inf"] == 1 and stats["flags"][0]["kind"] == "inf"
    assert json.dumps(page.data(), allow_nan=False)
    with pytest.raises(ValueError, match="one or two files"):
        model_report.build([path, path, path])


def test_model_says_whether_the_weights_fit(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    weights = TinyResNet().state_dict()
    fits, short = tmp_path / "fits.pt", tmp_path / "short.pt"
    torch.save(weights, fits)
    torch.save({k: v for k, v in weights.items() if k != "fc.bias"}, short)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"fc\.bias"'):  # the oracle
        TinyResNet().load_state_dict(torch.load(short, weights_only=True), strict=True)
    TinyResNet().load_state_dict(torch.load(fits, weights_only=True), strict=True)

    out = tmp_path / "fit.html"
    result = cli("report", fits, short, "--model", "tests.models:TinyResNet", "-o", out)
    assert result.code == 0, result.err
    assert "model: fits, does not fit" in result.out
    source = out.read_text(encoding="utf-8")
    page = read_page(source)
    assert_self_contained(page)
    data = page.data()
    assert data["model"] == "tests.models:TinyResNet"
    first, second = (f["check"] for f in data["files"])
    assert first["ok"] and first["missing"] == [] and first["unexpected"] == []
    assert not second["ok"] and second["missing"] == ["fc.bias"]
    found = sections(source)
    assert "fits" in found.text("fit-0") and "does not fit" not in found.text("fit-0")
    assert "does not fit" in found.text("fit-1") and "fc.bias" in found.text("fit-1")
    assert "Missing (in the model, not in the file): 1" in found.text("fit-1")
    assert 'href="#fit-1"' in source

    alone = cli("report", fits, "-o", tmp_path / "alone.html")
    assert "fit-0" not in (tmp_path / "alone.html").read_text() and alone.code == 0
    assert read_page((tmp_path / "alone.html").read_text()).data()["files"][0]["check"] is None
    no_model = cli("report", fits, "--init", "{}", "-o", tmp_path / "x.html")
    assert no_model.code == 2 and "--model" in no_model.err
    typo = cli("report", fits, "--model", "no_such_package_xyz:Net", "-o", tmp_path / "y.html")
    assert typo.code == 2 and "no_such_package_xyz" in typo.err
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "y.html").exists()


def hf_folder(folder: Path, config: str) -> None:
    folder.mkdir()
    save_numpy(
        {"embeddings.weight": np.ones((4, 2), dtype=np.float32)}, folder / "model.safetensors"
    )
    (folder / "config.json").write_text(config, encoding="utf-8")


def test_a_long_config_json_is_cut_with_a_note(tmp_path: Path, cli: Cli) -> None:
    labels = {str(i): f"label {i} {HOSTILE_VALUE}" for i in range(3000)}
    config = json.dumps({"model_type": "bert", "id2label": labels, "last_key": 1}, indent=2)
    assert len(config.encode()) > model_report.MAX_CONFIG_TEXT
    hf_folder(tmp_path / "folder", config)
    source = (tmp_path / "folder.html").as_posix()
    assert cli("report", tmp_path / "folder", "-o", source).code == 0
    found = sections(Path(source).read_text(encoding="utf-8"))
    (shown,) = found.details["structure-0"][-1:]
    assert shown.endswith(config[: model_report.MAX_CONFIG_TEXT])  # as written, cut
    assert '"last_key"' not in shown and "</script><script>alert(3)</script>&amp;" in shown
    assert f"of {len(config.encode()):,} shown" in found.text("structure-0")
    carried = read_page(Path(source).read_text()).data()["files"][0]["config"]
    assert carried["truncated"] and carried["size"] == len(config.encode())

    inside = cli("report", tmp_path / "folder" / "model.safetensors", "--json")
    assert inside.json["files"][0]["config"]["text"] == carried["text"]  # the folder's file
    stray = tmp_path / "stray"
    stray.mkdir()
    save_numpy({"w": np.ones(2, dtype=np.float32)}, stray / "weights.safetensors")
    (stray / "config.json").write_text("{}")
    assert cli("report", stray / "weights.safetensors", "--json").json["files"][0]["config"] is None


@pytest.mark.heavy
def test_a_transformers_folder_shows_its_config_json(tmp_path: Path, cli: Cli) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        modelport_marker=HOSTILE_VALUE,
    )
    folder = tmp_path / "bert"
    BertModel(config).save_pretrained(folder)
    written = (folder / "config.json").read_text(encoding="utf-8")
    assert HOSTILE_VALUE in json.loads(written)["modelport_marker"]
    out = tmp_path / "bert.html"
    assert cli("report", folder, "-o", out).code == 0
    source = out.read_text(encoding="utf-8")
    page = read_page(source)
    assert_self_contained(page)  # the marker's markup stayed text
    found = sections(source)
    assert found.details["structure-0"][-1].endswith(written)  # collapsed, whole, as written
    assert "config.json" in found.text("structure-0")
    assert page.data()["files"][0]["config"] == {
        "path": str(folder / "config.json"),
        "size": len(written.encode()),
        "text": written,
        "truncated": False,
    }
