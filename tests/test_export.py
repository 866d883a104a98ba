"""``modelport export``: exported files run in their own runtime and agree with eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import modelport
from modelport.cli.cmd_export import parse_dynamic, parse_input
from modelport.cli.markdown import export_markdown
from modelport.errors import ConversionError, ModelSpecError, UsageError
from modelport.torch_models.building import resolve_model
from modelport.torch_models.example_inputs import read_example_inputs
from modelport.torch_models.exporting import export
from tests.conftest import Cli
from tests.models import Router, TinyResNet
from tests.real_models import KINDS, real_model

pytestmark = pytest.mark.heavy  # exports run in every target runtime


class CallCounter(nn.Module):
    """Wrong on purpose: forward reads Python-side state that export freezes as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) * self.calls


def tiny() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet(classes=5, width=4).eval()


@pytest.mark.parametrize("to", ["onnx", "torchscript", "pt2"])
def test_export_verified(tmp_path: Path, to: str) -> None:
    path = tmp_path / f"model.{to}"
    dynamic = {"x": {0: "batch"}} if to == "onnx" else None
    report = export(tiny(), path, {"x": torch.randn(2, 3, 8, 8)}, to=to, dynamic=dynamic)
    assert report.verified is True
    assert report.max_abs_error < 1e-4
    assert all(f.exists() for f in report.files)
    samples = {c.sample for c in report.outputs}
    assert {"example", "random1", "random2"} <= samples
    if to == "onnx":
        assert {"batch=3", "batch=5"} <= samples  # other batch sizes ran through onnxruntime
        assert report.files[0] == path
    if to == "torchscript":
        assert any("deprecated" in w for w in report.warnings)
    payload = report.to_json()
    assert payload["verified"] is True and payload["format"] == to
    assert {"max_abs", "max_rel", "ok"} <= set(payload["outputs"][0])


def test_wrong_export_fails_verification(tmp_path: Path) -> None:
    model = CallCounter().eval()
    report = export(model, tmp_path / "counter.pt2", [torch.randn(2, 4)], to="pt2")
    assert report.verified is False
    assert report.max_abs_error > 0.1
    assert not all(c.ok for c in report.outputs)


def test_bfloat16_pt2_uses_loose_tolerance(tmp_path: Path) -> None:
    model = tiny().to(torch.bfloat16)
    report = export(model, tmp_path / "m.pt2", [torch.randn(2, 3, 8, 8).bfloat16()], to="pt2")
    assert report.verified is True
    assert report.outputs[0].dtype == "bfloat16" and report.outputs[0].atol > 1e-3


def test_resolve_model_with_safetensors_weights(tmp_path: Path) -> None:
    source = tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    model = resolve_model(
        "tests.models:TinyResNet", init={"classes": 5, "width": 4}, weights=weights
    )
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(ConversionError, match="do not fit"):
        resolve_model("tests.models:TinyResNet", init={"classes": 7, "width": 4}, weights=weights)


def test_resolve_model_errors() -> None:
    with pytest.raises(ModelSpecError):
        resolve_model("no_colon_here")
    with pytest.raises(ModelSpecError):
        resolve_model("tests.models:Missing")
    with pytest.raises(ModelSpecError):
        resolve_model("tests.models:TinyResNet", init={"bogus": 1})
    with pytest.raises(ModelSpecError):
        resolve_model("tests.models:trained_checkpoint")  # callable, but not a module maker


def test_parse_specs() -> None:
    name, tensor = parse_input("ids:2,16:int64", high=50)
    assert name == "ids" and tensor.shape == (2, 16) and tensor.dtype == torch.int64
    assert int(tensor.max()) < 50
    assert parse_input("x:1,3,8,8")[1].dtype == torch.float32
    name, mask = parse_input("attention_mask:2,16:int64", high=50)
    assert name == "attention_mask" and bool((mask == 1).all())  # a mask hides nothing
    assert parse_dynamic("x:0=batch,2=h") == ("x", {0: "batch", 2: "h"})
    for bad in ("x", "x:1,a", "x:1:float99"):
        with pytest.raises(UsageError):
            parse_input(bad)
    with pytest.raises(UsageError):
        parse_dynamic("x:batch")
    with pytest.raises(UsageError, match="at least 2"):
        export(
            tiny(),
            Path("unused.pt2"),
            {"x": torch.randn(1, 3, 8, 8)},
            to="pt2",
            dynamic={"x": {0: "batch"}},
        )


def test_cli_json(tmp_path: Path, cli: Cli) -> None:
    weights = tmp_path / "w.safetensors"
    save_file(dict(tiny().state_dict()), str(weights))
    out = tmp_path / "model.pt2"
    result = cli(
        "export",
        "--model",
        "tests.models:TinyResNet",
        "--init",
        '{"classes": 5, "width": 4}',
        "--weights",
        weights,
        "--input",
        "x:2,3,8,8",
        "--dynamic",
        "x:0=batch",
        "--to",
        "pt2",
        "--json",
        out,
    )
    assert result.code == 0, result.err
    payload = result.json
    assert payload["verified"] is True and payload["format"] == "pt2"
    assert payload["path"] == str(out) and out.exists()
    assert {"max_abs_error", "outputs", "seconds", "warnings"} <= set(payload)
    report = modelport.inspect(out)  # modelport reads what it wrote; torch.export is the oracle
    program = torch.export.load(str(out))
    stored = dict(program.state_dict)
    stored |= {f"constants.{k}": v for k, v in program.constants.items()}
    args, kwargs = program.example_inputs
    stored |= {f"example_inputs.args.{i}": v for i, v in enumerate(args)}
    stored |= {f"example_inputs.kwargs.{k}": v for k, v in kwargs.items()}
    assert report.format == "torch-export"
    assert {t.name: (t.dtype, t.shape) for t in report.tensors} == {
        k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in stored.items()
    }


def test_cli_verification_failure_exit_1(tmp_path: Path, cli: Cli) -> None:
    command = [
        "export",
        "--model",
        "tests.test_export:CallCounter",
        "--input",
        "x:2,4",
        "--to",
        "pt2",
        str(tmp_path / "c.pt2"),
    ]
    result = cli(*command)
    assert result.code == 1, result.err
    assert "FAILED" in result.out
    bad = cli(*command[:-1], "--init", "[1]", command[-1])
    assert bad.code == 2 and "--init" in bad.err


def test_hf_directory_model(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(tmp_path / "bert")
    model = resolve_model(tmp_path / "bert")
    assert type(model).__name__ == "BertModel"
    original = BertModel.from_pretrained(tmp_path / "bert").state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    ids = {"input_ids": torch.randint(0, 64, (2, 8))}
    report = export(model, tmp_path / "bert.pt2", ids, to="pt2", dynamic={"input_ids": {0: "b"}})
    assert report.verified is True and len({c.name for c in report.outputs}) == 2


def test_static_export_fails_on_other_batch_sizes(tmp_path: Path) -> None:
    class Reshaper(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1) + torch.ones(int(x.shape[0]))  # a trace bakes the batch size in

    report = export(Reshaper(), tmp_path / "r.pt2", {"x": torch.randn(2, 3)}, to="pt2")
    assert report.verified is True  # static shapes: only batch 2 is checked
    dynamic = {"x": {0: "batch"}}
    with pytest.raises(ConversionError, match="could not export"):  # must specialize batch
        export(Reshaper(), tmp_path / "d.pt2", {"x": torch.randn(2, 3)}, to="pt2", dynamic=dynamic)
    report = export(
        Reshaper(), tmp_path / "t.ts", {"x": torch.randn(2, 3)}, to="torchscript", dynamic=dynamic
    )
    assert report.verified is False  # the trace froze batch 2; batch 3 and 5 fail
    assert report.to_json()["max_abs_error"] is None
    assert any(c.name.startswith("(failed") or not c.ok for c in report.outputs)


def router_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "x": torch.randn(2, 5, 8),
        "mask": (torch.rand(2, 5) > 0.3).float(),
        "scale": torch.tensor(2.0),
    }


@pytest.mark.parametrize("to", ["onnx", "pt2"])
def test_control_flow_several_inputs_and_outputs(tmp_path: Path, to: str) -> None:
    torch.manual_seed(0)
    model = Router(layers=3, gated=True)
    dynamic = {"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}}
    report = export(model, tmp_path / f"router.{to}", router_inputs(), to=to, dynamic=dynamic)
    assert report.verified is True, [c for c in report.outputs if not c.ok]
    names = {c.name for c in report.outputs}
    assert names == {"output_0", "output_1.hidden", "output_1.pooled"}
    assert {"batch=3", "batch=5", "seq=6", "seq=11"} <= {c.sample for c in report.outputs}
    assert [i.name for i in report.inputs] == ["x", "mask", "scale"]
    assert report.inputs[0].dynamic == ((0, "batch"), (1, "seq"))
    assert report.inputs[2].shape == () and report.inputs[2].dynamic == ()


GPT2_DYNAMIC = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )  # use_cache left on, as saved models have it: modelport turns it off to export
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def gpt2_npz(path: Path) -> Path:
    """``input_ids`` and an ``attention_mask`` with left padding: the padded positions have
    no defined output (eager and onnxruntime differ there), so they are not compared."""
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 100, (2, 8))
    mask = np.ones((2, 8), dtype=np.int64)
    mask[0, :3] = 0
    np.savez(path, attention_mask=mask, input_ids=ids)
    return path


@pytest.mark.parametrize(("source", "to"), [("npz", "onnx"), ("npz", "pt2"), ("flags", "pt2")])
def test_gpt2_input_ids_and_attention_mask(
    tmp_path: Path, gpt2_dir: Path, source: str, to: str
) -> None:
    """GPT-2's ``forward(input_ids, past_key_values, cache_position, attention_mask, ...)``:
    ``attention_mask`` goes by keyword, past the arguments left out."""
    model = resolve_model(gpt2_dir)  # built from config.json, weights by modelport
    if source == "npz":
        inputs = read_example_inputs(gpt2_npz(tmp_path / "inputs.npz"), model)
    else:  # as --input input_ids:2,8:int64 --input attention_mask:2,8:int64 give them
        specs = ("input_ids:2,8:int64", "attention_mask:2,8:int64")
        inputs = dict(parse_input(spec, 100) for spec in specs)
    out = tmp_path / f"gpt2.{to}"
    report = export(model, out, inputs, to=to, dynamic=GPT2_DYNAMIC)
    assert report.verified is True, [c for c in report.outputs if not c.ok]
    assert [(i.name, i.keyword) for i in report.inputs] == [
        ("input_ids", False),
        ("attention_mask", True),
    ]
    samples = {c.sample for c in report.outputs}
    assert {"batch=3", "batch=5", "sequence=9", "sequence=17"} <= samples
    example = next(c for c in report.outputs if c.sample == "example")
    assert example.padded == (3 if source == "npz" else 0)
    logits = next(c for c in report.outputs if c.sample == "sequence=17")
    assert logits.shape == (2, 17, 100)  # the exported file ran a length never exported
    if to == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [(i.name, i.shape) for i in session.get_inputs()] == [
            ("input_ids", ["batch", "sequence"]),
            ("attention_mask", ["batch", "sequence"]),
        ]
        assert [o.name for o in session.get_outputs()] == ["logits"] == [logits.name]
    else:  # called as it was exported, the way transformers users call the model
        program = torch.export.load(str(out)).module()
        ids, mask = torch.randint(0, 100, (3, 11)), torch.ones(3, 11, dtype=torch.int64)
        with torch.no_grad():
            got, expected = program(ids, attention_mask=mask), model(ids, attention_mask=mask)
        assert torch.allclose(got["logits"], expected.logits, atol=1e-4)


def test_cli_gpt2_input_flags(tmp_path: Path, gpt2_dir: Path, cli: Cli) -> None:
    out = tmp_path / "gpt2.onnx"
    argv = ["export", "--model", str(gpt2_dir), "--to", "onnx", "--json", str(out)]
    argv += ["--input", "input_ids:2,8:int64", "--input", "attention_mask:2,8:int64"]
    argv += ["--dynamic", "input_ids:0=batch,1=sequence"]
    argv += ["--dynamic", "attention_mask:0=batch,1=sequence"]
    result = cli(*argv)
    assert result.code == 0, result.err
    payload = result.json
    assert payload["verified"] is True
    assert [(i["name"], i["keyword"]) for i in payload["inputs"]] == [
        ("input_ids", False),
        ("attention_mask", True),
    ]
    assert {"batch=5", "sequence=17"} <= {o["sample"] for o in payload["outputs"]}


def test_legacy_exporter_with_opset(tmp_path: Path) -> None:
    import onnx

    path = tmp_path / "legacy.onnx"
    dynamic = {"x": {0: "batch"}}
    inputs = {"x": torch.randn(2, 3, 8, 8)}
    report = export(tiny(), path, inputs, exporter="legacy", opset=17, dynamic=dynamic)
    assert report.verified is True and report.exporter == "legacy" and report.opset == 17
    assert {"example", "random1", "random2", "batch=3", "batch=5"} == {
        c.sample for c in report.outputs
    }  # the same checks as the dynamo exporter's
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert report.files == (path,) and report.sizes == (path.stat().st_size,)
    with pytest.raises(UsageError, match="unknown ONNX exporter"):
        export(tiny(), tmp_path / "x.onnx", inputs, exporter="torchscript")


def test_report_markdown(tmp_path: Path) -> None:
    report = export(tiny(), tmp_path / "m.pt2", {"x": torch.randn(2, 3, 8, 8)}, to="pt2")
    text = export_markdown(report, "--model tests.models:TinyResNet")
    assert text.startswith("# modelport export: m.pt2\n")
    assert "| Model | `tests.models.TinyResNet` |" in text
    assert "| Format | pt2 |" in text and "**verified**" in text
    assert f"| `{tmp_path / 'm.pt2'}` | {(tmp_path / 'm.pt2').stat().st_size:,} bytes |" in text
    assert "| `x` | [2, 3, 8, 8] | float32 | - |" in text
    for sample in ("example", "random1", "random2"):
        assert f"| {sample} | `output` | [2, 5] | float32 |" in text
    failed = export(CallCounter(), tmp_path / "c.pt2", [torch.randn(2, 4)], to="pt2")
    text = export_markdown(failed)
    assert "**FAILED**" in text and "| **FAIL** |" in text and "Built from" not in text


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    inputs = {"x": torch.randn(2, 3, 8, 8)}
    path = tmp_path / "m.pt2"
    export(tiny(), path, inputs, to="pt2")
    before = path.read_bytes()
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        export(tiny(), path, inputs, to="pt2")
    assert path.read_bytes() == before
    assert export(tiny(), path, inputs, to="pt2", overwrite=True).verified is True
    onnx_path = tmp_path / "m.onnx"
    stale = tmp_path / "m.onnx.data"  # half of an older bundle: also never replaced silently
    stale.write_bytes(b"old")
    with pytest.raises(ConversionError, match=r"m\.onnx\.data exists"):
        export(tiny(), onnx_path, inputs, exporter="legacy")
    assert not onnx_path.exists() and stale.read_bytes() == b"old"
    report = export(tiny(), onnx_path, inputs, exporter="legacy", overwrite=True)
    assert report.files == (onnx_path,) and not stale.exists()  # the stale half is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt2"]  # no temp dirs


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    class Reshaper(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1) + torch.ones(int(x.shape[0]))

    with pytest.raises(ConversionError, match="could not export"):
        export(
            Reshaper(),
            tmp_path / "d.pt2",
            {"x": torch.randn(2, 3)},
            to="pt2",
            dynamic={"x": {0: "batch"}},
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["npz", "pt", "safetensors"])
def test_cli_example_inputs_and_report(tmp_path: Path, kind: str, cli: Cli) -> None:
    import numpy as np

    inputs = router_inputs()
    path = tmp_path / f"inputs.{kind}"
    ordered = {"scale": inputs["scale"], "mask": inputs["mask"], "x": inputs["x"]}  # not forward's
    if kind == "npz":
        np.savez(path, **{k: v.numpy() for k, v in ordered.items()})
    elif kind == "pt":
        torch.save(ordered, path)
    else:
        save_file(ordered, str(path))
    out, report_path = tmp_path / "router.pt2", tmp_path / "report.md"
    argv = ["export", "--model", "tests.models:Router", "--example-inputs", str(path)]
    argv += ["--dynamic", "x:0=batch", "--dynamic", "mask:0=batch", "--to", "pt2"]
    argv += ["--report", str(report_path), "--json", str(out)]
    result = cli(*argv)
    assert result.code == 0, result.err
    payload = result.json
    assert payload["verified"] is True
    assert [(i["name"], i["shape"]) for i in payload["inputs"]] == [
        ("x", [2, 5, 8]),
        ("mask", [2, 5]),
        ("scale", []),
    ]
    text = report_path.read_text()
    assert f"--example-inputs {path}" in text and "| `mask` | [2, 5] | float32 | 0=batch |" in text
    assert "`output_1.pooled`" in text
    result = cli(*argv)
    assert result.code == 2  # OUT exists now
    assert "exists; pass --overwrite" in result.json["error"]["message"]
    assert cli(*argv[:-2], "--overwrite", out).code == 0
    fresh = tmp_path / "fresh.pt2"  # the report exists: refused before any export work
    result = cli(*argv[:-1], fresh)
    assert result.code == 2
    assert "report.md exists" in result.json["error"]["message"]
    assert not fresh.exists()
    result = cli(*argv[:-4], "--report", out, "--overwrite", "--json", out)
    assert result.code == 2
    assert "would replace the output" in result.json["error"]["message"]


def test_cli_example_inputs_name_mismatch(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "inputs.safetensors"
    save_file({"x": torch.randn(2, 5, 8), "attention": torch.ones(2, 5)}, str(path))
    argv = ["export", "--model", "tests.models:Router", "--example-inputs", str(path)]
    result = cli(*argv, "--to", "pt2", tmp_path / "r.pt2")
    assert result.code == 2
    error = result.err
    assert "'attention' is not an argument of forward(x, mask, scale)" in error
    assert not (tmp_path / "r.pt2").exists()


def test_legacy_external_data_gathered_into_one_file(tmp_path: Path) -> None:
    """Above 2 GB the legacy exporter writes one file per tensor beside OUT; the bundle
    stays OUT + OUT.data. Reproduced small: the same layout, written by onnx itself."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import helper, numpy_helper

    from modelport.torch_models.onnx_export import one_data_file

    weight = np.arange(1200, dtype=np.float32).reshape(3, 400)  # above onnx's 1 KiB inline limit
    bias = np.ones(400, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 400])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(
        helper.make_model(graph),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(tmp_path.iterdir())) == 3  # m.onnx, w, b
    one_data_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ones((2, 3), dtype=np.float32)
    assert np.array_equal(session.run(None, {"x": x})[0], x @ weight + bias)


def test_padding_hides_only_the_positions_it_marks() -> None:
    """An error under a padded position is not counted; one anywhere else still fails."""
    from modelport.torch_models.agreement import compare, padding_of

    eager = torch.zeros(2, 4, 5)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    padding = padding_of(["input_ids", "attention_mask"], [torch.zeros(2, 4), mask])
    assert padding is not None and int(padding.sum()) == 2
    under_padding = eager.clone()
    under_padding[0, 1] = 5.0
    assert compare("logits", "example", eager, under_padding, None, None, padding).ok
    elsewhere = eager.clone()
    elsewhere[0, 2, 3] = 5.0
    check = compare("logits", "example", eager, elsewhere, None, None, padding)
    assert not check.ok and check.max_abs == 5.0 and check.padded == 2
    assert padding_of(["attention_mask"], [torch.full((2, 4), 7)]) is None  # not a 0/1 mask


def tiny_bert_dir(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(path)
    return path


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_outputs_named_after_model_output(tmp_path: Path, exporter: str) -> None:
    """BERT returns a ``ModelOutput``: the graph's outputs take its keys, as the report does."""
    import onnx
    import onnxruntime

    model = resolve_model(tiny_bert_dir(tmp_path / "bert"))
    out = tmp_path / "bert.onnx"
    ids = {"input_ids": torch.randint(0, 64, (2, 8))}
    report = export(model, out, ids, exporter=exporter, dynamic={"input_ids": {0: "batch"}})
    assert report.verified is True
    graph = onnx.load(str(out)).graph
    assert [o.name for o in graph.output] == ["last_hidden_state", "pooler_output"]
    assert [i.name for i in graph.input] == ["input_ids"]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reported = list(dict.fromkeys(c.name for c in report.outputs))
    assert [o.name for o in session.get_outputs()] == reported
    assert [i.name for i in report.inputs] == ["input_ids"]
    assert report.files == (out,) and sorted(p.name for p in tmp_path.iterdir()) == [
        "bert",
        "bert.onnx",
    ]


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_names_chosen(tmp_path: Path, exporter: str) -> None:
    """Tuple positions become ``output_0``...; ``input_names`` / ``output_names`` choose
    others, and ``dynamic`` may name an input by its new name."""
    import onnxruntime

    torch.manual_seed(0)
    out = tmp_path / "router.onnx"
    report = export(Router(), out, router_inputs(), exporter=exporter)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [
        "output_0",
        "output_1.hidden",
        "output_1.pooled",
    ]
    renamed = tmp_path / "renamed.onnx"
    report = export(
        Router(),
        renamed,
        router_inputs(),
        exporter=exporter,
        input_names=["tokens", "padding", "factor"],
        output_names=["scores", "hidden", "pooled"],
        dynamic={"tokens": {0: "batch"}, "mask": {0: "batch"}},
    )
    assert report.verified is True
    assert {"batch=3", "batch=5"} <= {c.sample for c in report.outputs}
    session = onnxruntime.InferenceSession(str(renamed), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["scores", "hidden", "pooled"]
    assert [i.name for i in session.get_inputs()][:2] == ["tokens", "padding"]
    assert [c.name for c in report.outputs[:3]] == ["scores", "hidden", "pooled"]
    assert [i.name for i in report.inputs] == ["tokens", "padding", "factor"]
    with pytest.raises(UsageError, match="gives 2 names; the model has 3 outputs"):
        export(Router(), tmp_path / "x.onnx", router_inputs(), output_names=["a", "b"])
    with pytest.raises(UsageError, match="both an input and an output"):
        export(Router(), tmp_path / "x.onnx", router_inputs(), output_names=["x", "b", "c"])


def test_sequence_inputs_named_after_forward(tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "m.onnx"
    report = export(tiny(), out, [torch.randn(2, 3, 8, 8)], dynamic={"x": {0: "batch"}})
    assert report.verified is True and [i.name for i in report.inputs] == ["x"]
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["output"]


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_small_model_is_one_file(tmp_path: Path, exporter: str) -> None:
    """Weights that fit in one protobuf stay in it; ``external_data`` moves them out."""
    import onnx

    out = tmp_path / "cnn.onnx"
    report = export(tiny(), out, {"x": torch.randn(2, 3, 8, 8)}, exporter=exporter)
    assert report.verified is True
    assert report.files == (out,) and [p.name for p in tmp_path.iterdir()] == ["cnn.onnx"]
    assert not any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(out)).graph.initializer
    )
    apart = tmp_path / "apart.onnx"
    big = nn.Linear(64, 64)  # 16 KiB of weights: above onnx's 1 KiB inline threshold
    report = export(big, apart, {"x": torch.randn(2, 64)}, exporter=exporter, external_data=True)
    data = tmp_path / "apart.onnx.data"
    assert report.verified is True and report.files == (apart, data)
    assert data.stat().st_size >= 64 * 64 * 4
    proto = onnx.load(str(apart), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_cli_stdout_holds_only_modelport_lines(tmp_path: Path, cli: Cli) -> None:
    """torch's loggers, warnings and progress lines reach neither stream."""
    out = tmp_path / "bert.onnx"
    result = cli(
        "export", "--model", tiny_bert_dir(tmp_path / "bert"), "--input", "input_ids:2,8:int64", out
    )
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) == 2, result.out
    assert lines[0].startswith(f"wrote {out} (onnx, ")
    assert lines[1].startswith("  verified against eager on 3 inputs")
    assert result.err == ""


def test_cli_names_and_external_data(tmp_path: Path, cli: Cli) -> None:
    import onnxruntime

    out = tmp_path / "router.onnx"
    argv = ["export", "--model", "tests.models:Router", "--json", "--external-data"]
    argv += ["--input", "x:2,5,8", "--input", "mask:2,5", "--input", "scale:"]
    argv += ["--input-names", "tokens,padding,factor", "--output-names", "scores,hidden,pooled"]
    result = cli(*argv, out)
    assert result.code == 0, result.err
    payload = result.json
    assert [o["name"] for o in payload["outputs"][:3]] == ["scores", "hidden", "pooled"]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["scores", "hidden", "pooled"]
    bad = cli(*argv[:-2], "--output-names", "a,b", tmp_path / "bad.onnx")
    assert bad.code == 2 and "gives 2 names" in bad.json["error"]["message"]


PROBE = """
import json, sys, time
from modelport.cli.main import main
started = time.perf_counter()
code = main(sys.argv[2:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules,
                  "seconds": time.perf_counter() - started}), file=open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("spec", ["tests.modles:TinyResNet", "tset.models:X", "./missing.pt"])
def test_typo_in_model_rejected_before_torch(tmp_path: Path, spec: str) -> None:
    import json
    import subprocess
    import sys

    result = tmp_path / "result.json"
    argv = ["export", "--model", spec, "--input", "x:1,3,8,8", str(tmp_path / "m.onnx")]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(result), *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    found = json.loads(result.read_text())
    assert found["code"] == 2 and found["torch"] is False
    assert spec in done.stderr and done.stdout == ""


@pytest.mark.heavy
@pytest.mark.parametrize("to", ["onnx", "pt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_real_models_export_and_verify(tmp_path: Path, kind: str, to: str) -> None:
    """A head that caches in ``forward``, GPT-2, Llama and a diffusers UNet, each exported
    and verified in the target's own runtime (onnxruntime, ``torch.export.load``) against
    eager on the example and random inputs."""
    model, inputs = real_model(kind, tmp_path)
    out = tmp_path / f"{kind}.{to}"
    report = export(model, out, inputs, to=to)
    print(f"{kind} {to} max abs error {report.max_abs_error:.3g}")
    assert report.verified is True, [c for c in report.outputs if not c.ok]
    assert report.runtime == {"onnx": "onnxruntime", "pt2": "torch.export.load"}[to]
    assert report.max_abs_error < 1e-4
