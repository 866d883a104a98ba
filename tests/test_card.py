"""Model cards: front matter the hub's own parser reads, and loading code that runs as written
on the file it describes (executed in a subprocess, in the file's folder). The oracles are
huggingface_hub's ``ModelCard``, torch's weights-only unpickler, safetensors, onnxruntime and
transformers, never modelport's reading of its own card."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt
from safetensors.torch import load_file, save_file

import modelport
from modelport.cli.main import main
from modelport.reporting._card_markdown import code, escaped, table
from modelport.reporting.card import Provenance, build_card, conversion_provenance
from tests.conftest import Cli

# Runs each card's code in its folder, then saves the variable the code binds last.
_DRIVER = """
import json, os, sys
import torch
for job in json.loads(sys.argv[1]):
    os.chdir(job["cwd"])
    scope = {"__name__": "__card__"}
    exec(compile(job["code"], "card", "exec"), scope)
    torch.save(dict(scope[job["result"]]), job["out"])
"""


def python_block(text: str) -> str:
    found = re.search(r"^(`{3,})python\n(.*?)^\1$", text, re.S | re.M)
    assert found is not None, "the card shows no Python block"
    return found.group(2)


def python_blocks(text: str) -> list[str]:
    """Every Python block of the card, in order: the main code, then the other ways."""
    return [m.group(2) for m in re.finditer(r"^(`{3,})python\n(.*?)^\1$", text, re.S | re.M)]


def state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "encoder.0.weight": torch.randn(4, 3, generator=generator),
        "encoder.0.bias": torch.randn(4, generator=generator),
        "head.weight": torch.randn(2, 4, generator=generator).half(),
    }


@pytest.fixture(scope="module")
def torch_cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plain state_dict, a checkpoint with an argparse.Namespace and a safetensors file,
    each with its card, and what each card's code bound when run (one subprocess)."""
    folder = tmp_path_factory.mktemp("cards")
    weights = state_dict()
    torch.save(weights, folder / "plain.pt")
    checkpoint = {"model": weights, "epoch": 7, "args": argparse.Namespace(lr=0.1, arch="mlp")}
    torch.save(checkpoint, folder / "namespace.pt")
    save_file(weights, folder / "model.safetensors")
    names = ("plain.pt", "namespace.pt", "model.safetensors")
    cards = {name: build_card(folder / name) for name in names}
    jobs = [
        {
            "cwd": str(folder),
            "code": python_block(cards[name].text),
            "result": _bound_last(python_block(cards[name].text)),
            "out": str(folder / f"{name}.result"),
        }
        for name in names
    ]
    subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(jobs)], check=True, timeout=120, cwd=folder
    )
    results = {name: torch.load(folder / f"{name}.result", weights_only=True) for name in names}
    return {"folder": folder, "weights": weights, "cards": cards, "results": results}


def _bound_last(code: str) -> str:
    """The variable the card's code binds last (its result)."""
    bound = re.findall(r"^(\w+) = ", code, re.M)
    assert bound, code
    return str(bound[-1])


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype
        assert torch.equal(got[name], tensor), name


def test_plain_state_dict_card_loads_with_torch_weights_only(torch_cards: dict[str, Any]) -> None:
    made = torch_cards["cards"]["plain.pt"]
    code = python_block(made.text)
    assert 'torch.load("plain.pt", weights_only=True' in code
    torch.load(torch_cards["folder"] / "plain.pt", weights_only=True)  # the oracle agrees
    assert_same_tensors(torch_cards["results"]["plain.pt"], torch_cards["weights"])
    data = ModelCard(made.text).data
    assert data.tags == ["modelport", "torch-zip"]
    assert data.library_name is None and data.base_model is None
    path = torch_cards["folder"] / "plain.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() in made.text
    assert modelport.hash(path).digest in made.text
    assert "| `float16` | 1 | 8 |" in made.text  # parameters by dtype
    assert "- `encoder`: 16 parameters in 2 tensors" in made.text


def test_namespace_checkpoint_card_shows_modelport_load(torch_cards: dict[str, Any]) -> None:
    path = torch_cards["folder"] / "namespace.pt"
    with pytest.raises(Exception, match=r"argparse\.Namespace"):  # the oracle refuses
        torch.load(path, weights_only=True)
    text = torch_cards["cards"]["namespace.pt"].text
    assert "would refuse this file" in text and "`argparse.Namespace` (at `args`)" in text
    code = python_block(text)
    assert 'modelport.load("namespace.pt")' in code and "torch.load" not in code
    assert_same_tensors(torch_cards["results"]["namespace.pt"], torch_cards["weights"])
    assert "- `epoch`: `7`" in text  # checkpoint extras
    ModelCard(text)


def test_safetensors_card_loads_with_load_file(torch_cards: dict[str, Any]) -> None:
    text = torch_cards["cards"]["model.safetensors"].text
    assert 'load_file("model.safetensors")' in python_block(text)
    assert "safe_open" in text
    assert_same_tensors(torch_cards["results"]["model.safetensors"], torch_cards["weights"])
    assert ModelCard(text).data.tags == ["modelport", "safetensors"]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (np.float64(0.5), "numpy"),  # a numpy scalar reads as a float; torch still refuses
        (torch.__version__, "TorchVersion"),
        (frozenset({1, 2}), "frozenset"),
    ],
)
def test_values_the_tree_flattens_still_refuse_weights_only(
    tmp_path: Path, value: Any, why: str
) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.ones(2), "value": value}, path)
    with pytest.raises(Exception, match=why):
        torch.load(path, weights_only=True)
    text = build_card(path, digests=False).text
    assert "would refuse this file" in text and why in text
    assert "modelport.load" in python_block(text)


def test_onnx_card_runs_an_inference_session(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    bias = np.array([1, 2, 3], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "tiny.onnx")
    text = build_card(tmp_path / "tiny.onnx").text
    code = python_block(text)
    assert 'onnxruntime.InferenceSession("tiny.onnx"' in code
    script = code + "\nnumpy.save('outputs.npy', outputs[0])\n"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, cwd=tmp_path)
    outputs = np.load(tmp_path / "outputs.npy")
    np.testing.assert_array_equal(outputs, np.zeros((1, 4), np.float32) @ weight.T + bias)
    assert ModelCard(text).data.tags == ["modelport", "onnx"]


def _config_folder(tmp_path: Path, config: dict[str, Any]) -> Path:
    save_file(state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / "model.safetensors"


def test_front_matter_from_the_config_beside_the_file(tmp_path: Path) -> None:
    path = _config_folder(
        tmp_path,
        {
            "_name_or_path": "google-bert/bert-base-uncased",
            "architectures": ["BertForSequenceClassification"],
            "model_type": "bert",
        },
    )
    made = build_card(path, digests=False)
    data = ModelCard(made.text).data
    assert data.library_name == "transformers"
    assert data.base_model == "google-bert/bert-base-uncased"
    assert data.pipeline_tag == "text-classification"
    assert data.tags == ["modelport", "safetensors", "bert"]
    assert made.front_matter == data.to_dict()
    assert 'BertForSequenceClassification.from_pretrained(".")' in made.text


@pytest.mark.parametrize(
    "name_or_path", ["/home/me/runs/bert", "./outputs/bert", "runs/../bert", "bert", "a/b/c"]
)
def test_a_local_path_is_no_base_model(tmp_path: Path, name_or_path: str) -> None:
    config = {"_name_or_path": name_or_path, "model_type": "bert"}
    made = build_card(_config_folder(tmp_path, config), digests=False)
    assert "base_model" not in made.front_matter
    assert ModelCard(made.text).data.base_model is None


def test_code_from_a_config_is_never_written_into_the_card(tmp_path: Path) -> None:
    evil = "BertModel\nimport os; os.system('echo pwned')"
    made = build_card(_config_folder(tmp_path, {"architectures": [evil], "model_type": "bert"}))
    assert "pwned" not in made.text
    assert "AutoModel.from_pretrained" in made.text


def test_names_from_the_file_cannot_break_the_markdown(tmp_path: Path) -> None:
    hostile = "a|b`c<script>x</script>\n# heading"
    save_file({hostile: torch.ones(2), "x.y": torch.ones(1)}, tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors").rename(tmp_path / "m```.safetensors")
    text = build_card(tmp_path / "m```.safetensors", digests=False).text
    page = MarkdownIt("commonmark").enable("table").render(text.split("---\n", 2)[2])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "heading</h1>" not in page and "<h1>m```.safetensors</h1>" in page
    code = python_block(text)
    assert 'load_file("m```.safetensors")' in code  # in the literal; a longer fence around it
    assert "<code>a|b`c&lt;script&gt;" in page
    assert ModelCard(text).data.tags == ["modelport", "safetensors"]


def test_provenance_of_a_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"model": state_dict(), "step": 3}, tmp_path / "source.pt")
    options = modelport.ConvertOptions(strip_prefix="auto")
    report = modelport.convert(tmp_path / "source.pt", tmp_path / "out.safetensors", options)
    made = build_card(
        tmp_path / "out.safetensors", provenance=conversion_provenance(report, options)
    )
    source_sha = hashlib.sha256((tmp_path / "source.pt").read_bytes()).hexdigest()
    assert source_sha in made.text
    assert "the weights are the source's, bit for bit" in made.text
    recipe = made.text.split("Made with:", 1)[1]
    again = tmp_path / "again"
    again.mkdir()
    (again / "source.pt").write_bytes((tmp_path / "source.pt").read_bytes())
    monkeypatch.chdir(again)
    exec(python_block(recipe), {})
    assert_same_tensors(load_file(again / "out.safetensors"), state_dict())


def test_provenance_from_a_dict_and_from_the_files_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(state_dict(), path, metadata={"modelport.source": "ckpt.pt"})
    assert "`modelport.source`: `ckpt.pt`" in build_card(path, digests=False).text
    given = {"source": "ckpt.pt", "recipe": "modelport convert ckpt.pt m.safetensors"}
    text = build_card(path, provenance=given, digests=False).text
    assert "modelport convert ckpt.pt m.safetensors" in text
    with pytest.raises(modelport.errors.UsageError, match="origin"):
        Provenance.of({"source": "x", "origin": "y"})


def test_cli_writes_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_file(state_dict(), tmp_path / "model.safetensors")
    card_path = tmp_path / "README.md"
    assert main(["card", str(tmp_path / "model.safetensors"), "-o", str(card_path)]) == 0
    first = card_path.read_text()
    assert ModelCard.load(card_path).data.tags == ["modelport", "safetensors"]
    assert main(["card", str(tmp_path / "model.safetensors"), "-o", str(card_path)]) == 2
    assert card_path.read_text() == first
    capsys.readouterr()
    assert main(["card", str(tmp_path / "model.safetensors"), "--json", "--no-digests"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["front_matter"] == {"tags": ["modelport", "safetensors"]}
    assert ModelCard(printed["card"]).data.to_dict() == printed["front_matter"]


@pytest.mark.heavy
def test_transformers_folder_card_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    folder = tmp_path / "bert"
    BertForMaskedLM(config).save_pretrained(folder)
    made = build_card(folder, relative_to=folder)  # the card as the folder's README.md
    data = ModelCard(made.text).data
    assert (data.library_name, data.pipeline_tag) == ("transformers", "fill-mask")
    assert data.tags == ["modelport", "hf-dir", "bert"]
    code = python_block(made.text)
    assert 'BertForMaskedLM.from_pretrained(".")' in code
    job = {"cwd": str(folder), "code": code, "result": "state", "out": str(tmp_path / "r.pt")}
    job["code"] += "state = model.state_dict()\n"
    subprocess.run([sys.executable, "-c", _DRIVER, json.dumps([job])], check=True, timeout=300)
    loaded = torch.load(tmp_path / "r.pt", weights_only=True)
    saved = load_file(folder / "model.safetensors")
    assert_same_tensors({k: loaded[k] for k in saved}, saved)
    inner = build_card(folder / "model.safetensors").text
    assert 'load_file("model.safetensors")' in python_block(inner)
    assert 'BertForMaskedLM.from_pretrained(".")' in inner


def test_convert_card_writes_beside_the_output_and_refuses_to_replace(
    tmp_path: Path, cli: Cli
) -> None:
    source = tmp_path / "source" / "state.pt"
    source.parent.mkdir()
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    torch.save(state, source)
    out = tmp_path / "out"
    out.mkdir()
    result = cli("convert", source, out / "model.safetensors", "--card", "--json")
    assert result.code == 0
    assert result.json["card"] == str(out / "README.md")
    text = (out / "README.md").read_text()
    assert ModelCard(text).data.tags == ["modelport", "safetensors"]
    assert "`state.pt` (`torch-zip`)" in text  # the conversion is the card's provenance
    assert torch.equal(load_file(out / "model.safetensors")["w"], state["w"])

    again = cli("convert", source, out / "second.safetensors", "--card")
    assert again.code == 2 and "README.md exists" in again.err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]

    folder = tmp_path / "hf"
    assert cli("convert", source, folder, "--to", "hf", "--card").code == 0
    assert "model.safetensors" in (folder / "README.md").read_text()


def test_a_pipe_in_escaped_text_is_escaped_once_in_a_table() -> None:
    """Text escaped for Markdown and then put in a cell keeps the cell count: ``\\|`` is an
    escaped pipe, ``\\\\|`` an escaped backslash followed by a cell delimiter."""
    row = table(["what", "says"], [[escaped("a|b"), code("x|y")]]).splitlines()[2]
    cells = re.split(r"(?<!\\)\|", row.strip())[1:-1]
    assert [c.strip() for c in cells] == ["a\\|b", "`x\\|y`"]


# Runs each card's code in its folder, then saves what it bound as numpy arrays: a module's
# state_dict, a dict of arrays, or one array (under the name "array").
_ARRAYS_DRIVER = """
import json, os, sys
import numpy
for job in json.loads(sys.argv[1]):
    os.chdir(job["cwd"])
    scope = {"__name__": "__card__"}
    exec(compile(job["code"], "card", "exec"), scope)
    found = scope[job["result"]]
    if hasattr(found, "state_dict"):
        found = {k: v.detach().numpy() for k, v in found.state_dict().items()}
    elif not isinstance(found, dict):
        found = {"array": found}
    numpy.savez(job["out"], **{k: numpy.asarray(v) for k, v in found.items()})
"""


def run_card_code(folder: Path, jobs: list[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """``(key, code, variable)`` each run as written, in one subprocess; what each bound."""
    payload = [
        {"cwd": str(folder), "code": code, "result": result, "out": str(folder / f"{key}.out.npz")}
        for key, code, result in jobs
    ]
    subprocess.run(
        [sys.executable, "-c", _ARRAYS_DRIVER, json.dumps(payload)], check=True, timeout=180
    )
    found = {}
    for key, _, _ in jobs:
        with np.load(folder / f"{key}.out.npz") as archive:
            found[key] = {name: archive[name] for name in archive.files}
    return found


def assert_same_arrays(got: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, values in expected.items():
        assert got[name].dtype == values.dtype, name
        np.testing.assert_array_equal(got[name], values, err_msg=name)


class ScriptedNet(torch.nn.Module):
    """A module with a parameter and a buffer, to script (TorchScript) and export (.pt2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.arange(3, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def gguf_arrays() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Plain GGUF tensors, and float32 values that go into the file as Q8_0 blocks."""
    plain = {
        "blk.0.attn_q.weight": np.arange(64, dtype=np.float32).reshape(2, 32),
        "blk.0.ffn_up.weight": np.linspace(-2, 2, 96).astype(np.float16).reshape(3, 32),
    }
    return plain, np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)


@pytest.fixture(scope="module")
def format_cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A GGUF file, an .npy and an .npz, each written by its own library, each card's code
    (and the GGUF card's second block) run in one subprocess that imports no torch."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    folder = tmp_path_factory.mktemp("formats")
    plain, quantized = gguf_arrays()
    writer = GGUFWriter(str(folder / "tiny.gguf"), "llama")
    for name, values in plain.items():
        writer.add_tensor(name, values)
    q8 = GGMLQuantizationType.Q8_0
    writer.add_tensor("blk.0.q8.weight", quantize(quantized, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    np.save(folder / "array.npy", np.arange(-3, 3, dtype=np.int16).reshape(2, 3))
    np.savez(folder / "arrays.npz", ones=np.ones(3), codes=np.arange(4, dtype=np.uint8))
    cards = {
        name: build_card(folder / name, digests=False).text
        for name in ("tiny.gguf", "array.npy", "arrays.npz")
    }
    gguf_main, gguf_values = python_blocks(cards["tiny.gguf"])
    jobs = [
        ("tiny.gguf", gguf_main, "tensors"),
        ("tiny.gguf values", gguf_values, "values"),
        ("array.npy", python_block(cards["array.npy"]), "array"),
        ("arrays.npz", python_block(cards["arrays.npz"]), "arrays"),
    ]
    return {"folder": folder, "cards": cards, "results": run_card_code(folder, jobs)}


def test_gguf_card_loads_with_gguf_reader(format_cards: dict[str, Any]) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    text = format_cards["cards"]["tiny.gguf"]
    assert 'GGUFReader("tiny.gguf")' in python_block(text)
    assert "block-quantized tensors (`Q8_0`)" in text
    plain, values = gguf_arrays()
    q8 = quantize(values, GGMLQuantizationType.Q8_0)
    assert_same_arrays(format_cards["results"]["tiny.gguf"], {**plain, "blk.0.q8.weight": q8})
    as_float = {name: array.astype(np.float32) for name, array in plain.items()}
    as_float["blk.0.q8.weight"] = dequantize(q8, GGMLQuantizationType.Q8_0)
    assert_same_arrays(format_cards["results"]["tiny.gguf values"], as_float)
    np.testing.assert_allclose(as_float["blk.0.q8.weight"], values, atol=1e-2)
    assert ModelCard(text).data.tags == ["modelport", "gguf"]


def test_numpy_cards_load_with_numpy_load(format_cards: dict[str, Any]) -> None:
    folder = format_cards["folder"]
    npy, npz = format_cards["cards"]["array.npy"], format_cards["cards"]["arrays.npz"]
    assert 'numpy.load("array.npy")' in python_block(npy)
    assert_same_arrays(
        format_cards["results"]["array.npy"], {"array": np.load(folder / "array.npy")}
    )
    assert np.load(folder / "array.npy").dtype == np.int16
    assert 'numpy.load("arrays.npz")' in python_block(npz)
    assert_same_arrays(
        format_cards["results"]["arrays.npz"],
        {"ones": np.ones(3), "codes": np.arange(4, dtype=np.uint8)},
    )
    assert ModelCard(npz).data.tags == ["modelport", "npz"]


def test_an_npz_of_objects_card_says_numpy_refuses(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, table=np.array([{"lr": 0.1}], dtype=object))
    with np.load(path) as archive, pytest.raises(ValueError, match="allow_pickle"):
        archive["table"]  # the oracle refuses
    text = build_card(path, digests=False).text
    assert "would refuse this file" in text and "allow_pickle=True" in text
    assert "numpy.load" not in python_block(text)


@pytest.mark.heavy
def test_torchscript_and_exported_program_cards_load_their_modules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ScriptedNet()
    torch.jit.script(net).save(str(tmp_path / "scripted.pt"))
    torch.export.save(torch.export.export(net, (torch.ones(2, 4),)), tmp_path / "net.pt2")
    scripted = build_card(tmp_path / "scripted.pt", digests=False).text
    exported = build_card(tmp_path / "net.pt2", digests=False).text
    assert 'torch.jit.load("scripted.pt", map_location="cpu")' in python_block(scripted)
    assert "runs the TorchScript code" in scripted
    assert 'torch.export.load("net.pt2")' in python_block(exported)
    assert "program.module()" in python_block(exported)
    jobs = [("ts", python_block(scripted), "model"), ("pt2", python_block(exported), "model")]
    found = run_card_code(tmp_path, jobs)
    expected = {name: value.detach().numpy() for name, value in net.state_dict().items()}
    assert_same_arrays(found["ts"], expected)
    assert_same_arrays(found["pt2"], expected)
    assert ModelCard(scripted).data.tags == ["modelport", "torchscript"]
    assert ModelCard(exported).data.tags == ["modelport", "torch-export"]
