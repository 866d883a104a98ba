"""``export --to executorch``: the ``.pte`` program runs in ExecuTorch's own runtime and
agrees with eager; modelport's own reader reads it back."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import modelport
from modelport.errors import MissingDependencyError
from modelport.torch_models.agreement import TOLERANCES
from modelport.torch_models.building import resolve_model
from modelport.torch_models.exporting import export
from tests.conftest import Cli
from tests.models import Router, TinyResNet
from tests.real_models import KINDS, real_model
from tests.test_export import tiny_bert_dir

FLOAT32_ATOL, _ = TOLERANCES["float32"]


@pytest.mark.heavy
def test_cnn_runs_in_executorch_with_dynamic_batch(tmp_path: Path) -> None:
    """XNNPACK takes the convolutions; the bounded batch axis runs at two other sizes."""
    torch.manual_seed(0)
    model = TinyResNet(classes=5, width=4)
    out = tmp_path / "cnn.pte"
    report = export(
        model, out, {"x": torch.randn(2, 3, 16, 16)}, to="executorch", dynamic={"x": {0: "b"}}
    )
    print(f"cnn executorch max abs error {report.max_abs_error:.3g}")
    assert report.verified is True and report.runtime == "ExecuTorch's runtime"
    assert report.max_abs_error < FLOAT32_ATOL
    assert {c.sample for c in report.outputs} == {"example", "random1", "random2", "b=3", "b=5"}
    assert report.files == (out,) and sorted(tmp_path.iterdir()) == [out]
    assert modelport.inspect(out).format == "executorch-pte"
    with modelport.open(out) as program:
        assert "XnnpackBackend" in program.details["methods"][0]["delegates"]
    assert any("XNNPACK runs" in note for note in report.warnings)
    assert any("4x its example size" in note for note in report.warnings)


@pytest.mark.heavy
def test_float64_mlp_runs_on_portable_kernels_and_reads_back(tmp_path: Path) -> None:
    """XNNPACK has no float64 kernels: the program stays on ExecuTorch's portable ones, its
    weights in the file's constant segment, where modelport reads them bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    out = tmp_path / "mlp.pte"
    report = export(model, out, [torch.randn(3, 6, dtype=torch.float64)], to="executorch")
    print(f"mlp executorch max abs error {report.max_abs_error:.3g}")
    assert report.verified is True
    assert report.max_abs_error < TOLERANCES["float64"][0]
    assert any("nothing is delegated" in note for note in report.warnings)
    expected = {name: t.numpy() for name, t in model.state_dict().items()}
    with modelport.open(out) as program:
        stored = [np.asarray(program.get_tensor(name)) for name in list(program.keys())]
    for name, weight in expected.items():
        assert any(s.shape == weight.shape and np.array_equal(s, weight) for s in stored), name


@pytest.mark.heavy
def test_cli_exports_router_and_bert(tmp_path: Path, cli: Cli) -> None:
    """Nested outputs keep their names; BERT's ``ModelOutput`` runs in the runtime too."""
    router = cli(
        "export",
        "--model",
        "tests.models:Router",
        "--input",
        "x:2,5,8",
        "--input",
        "mask:2,5",
        "--to",
        "executorch",
        tmp_path / "router.pte",
        "--json",
    )
    assert router.code == 0, router.err
    assert router.json["verified"] is True and router.json["runtime"] == "ExecuTorch's runtime"
    names = {o["name"] for o in router.json["outputs"]}
    assert names == {"output_0", "output_1.hidden", "output_1.pooled"}
    bert = cli(
        "export",
        "--model",
        tiny_bert_dir(tmp_path / "bert"),
        "--input",
        "input_ids:2,8:int64",
        "--to",
        "executorch",
        tmp_path / "bert.pte",
    )
    assert bert.code == 0, bert.out + bert.err
    assert "in ExecuTorch's runtime: max abs error" in bert.out
    print(bert.out)


@pytest.mark.heavy
def test_gpt2_with_fused_attention_runs_in_executorch(tmp_path: Path) -> None:
    """GPT-2 saved with its default (sdpa) attention: the lowering refuses the decomposed
    attention, the eager one lowers; the program agrees with the untouched sdpa model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with warnings.catch_warnings():  # executorch reads its edge.yaml with a deprecated API
        warnings.simplefilter("ignore", DeprecationWarning)
        from executorch.runtime import Runtime

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model = resolve_model(tmp_path / "gpt2")
    assert model.config._attn_implementation == "sdpa"
    mask = torch.ones(2, 8, dtype=torch.int64)
    inputs = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}
    dynamic = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
    out = tmp_path / "gpt2.pte"
    report = export(model, out, inputs, to="executorch", dynamic=dynamic)
    print(f"gpt2 executorch max abs error {report.max_abs_error:.3g}")
    assert report.verified is True, [c for c in report.outputs if not c.ok]
    assert {"sequence=9", "sequence=17"} <= {c.sample for c in report.outputs}
    assert model.config._attn_implementation == "sdpa"  # the caller's model is untouched
    ids = torch.randint(0, 100, (2, 13))
    program = Runtime.get().load_program(out).load_method("forward")
    got = program.execute([ids, torch.ones(2, 13, dtype=torch.int64)])[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.heavy
@pytest.mark.parametrize("kind", KINDS)
def test_real_models_run_in_executorch(tmp_path: Path, kind: str) -> None:
    """A head that caches in ``forward``, GPT-2, Llama and a diffusers UNet, each verified
    in ExecuTorch's runtime against eager on the example and random inputs."""
    model, inputs = real_model(kind, tmp_path)
    out = tmp_path / f"{kind}.pte"
    report = export(model, out, inputs, to="executorch")
    print(f"{kind} executorch max abs error {report.max_abs_error:.3g}")
    assert report.verified is True, [c for c in report.outputs if not c.ok]
    assert report.runtime == "ExecuTorch's runtime"
    assert report.max_abs_error < FLOAT32_ATOL


def test_missing_executorch_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # import fails as if absent
    torch.manual_seed(0)
    with pytest.raises(MissingDependencyError, match=r"pip install 'modelport\[executorch\]'"):
        export(
            Router(), tmp_path / "r.pte", [torch.randn(2, 5, 8), torch.ones(2, 5)], to="executorch"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.heavy
def test_rebuild_to_pte_by_name(tmp_path: Path) -> None:
    """``rebuild`` picks ExecuTorch from a ``.pte`` name and verifies through ``export``."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(Router().state_dict(), str(weights))
    out = tmp_path / "router.pte"
    inputs = {"x": torch.randn(2, 5, 8), "mask": torch.ones(2, 5)}
    report = modelport.rebuild("tests.models:Router", weights, out, example_inputs=inputs)
    assert report.format == "executorch" and report.verified is True
    assert report.max_abs_error < FLOAT32_ATOL
    assert report.load_with.startswith("executorch.runtime.Runtime.get().load_program(")
