"""``modelport check``: do these weights load into this model, and if not, why?

The oracle is torch itself: weights that check says fit load with
``load_state_dict(strict=True)``, and those it rejects do not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

import modelport
from modelport.torch_models.building import build_model
from modelport.torch_models.checking import check, group_by_prefix
from tests.conftest import Cli
from tests.models import TinyResNet, trained_checkpoint

SPEC = "tests.models:TinyResNet"


def _save(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "w.pt") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def _strict_loads(model: torch.nn.Module, path: Path) -> bool:
    try:
        model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    except RuntimeError:
        return False
    return True


def test_plain_weights_fit(tmp_path: Path) -> None:
    model = TinyResNet()
    path = _save(tmp_path, model.state_dict())
    report = check(path, SPEC)
    assert report.ok, report.lines()
    assert report.to_json()["missing"] == [] and report.suggestions == ()
    assert report.lines()[0].startswith("fits")
    assert check(path, TinyResNet()).ok  # an nn.Module works as well as a spec


def test_ddp_prefix_is_named_and_fixed(tmp_path: Path) -> None:
    model = TinyResNet()
    path = _save(tmp_path, {f"module.{k}": v for k, v in model.state_dict().items()})
    report = check(path, SPEC)
    assert not report.ok
    assert len(report.missing) == len(report.unexpected) == len(model.state_dict())
    (suggestion,) = report.suggestions
    assert "'module.'" in suggestion.cause and "DistributedDataParallel" in suggestion.cause
    assert suggestion.command == f"modelport convert {path} OUT --strip-prefix auto"
    assert not _strict_loads(TinyResNet(), path)

    fixed = tmp_path / "fixed.pt"
    report = check(path, SPEC, fix=fixed)
    assert report.fixed == str(fixed) and report.fixed_ok
    fresh = TinyResNet()
    assert _strict_loads(fresh, fixed)
    assert torch.equal(fresh.fc.weight, model.fc.weight)


def test_missing_model_prefix_suggests_add_prefix(tmp_path: Path) -> None:
    expected = {
        f"backbone.{k}": (tuple(v.shape), "float32") for k, v in TinyResNet().state_dict().items()
    }
    path = _save(tmp_path, TinyResNet().state_dict())
    report = check(path, expected)
    (suggestion,) = report.suggestions
    assert suggestion.command == f"modelport convert {path} OUT --add-prefix backbone."


def test_class_count_names_both_counts(tmp_path: Path) -> None:
    path = _save(tmp_path, TinyResNet(classes=50).state_dict())
    report = check(path, SPEC, init='{"classes": 10}')
    assert not report.ok and not report.missing and not report.unexpected
    assert {name for name, _, _ in report.mismatched} == {"fc.weight", "fc.bias"}
    causes = [s.cause for s in report.suggestions]
    assert len(causes) == 1 and "the checkpoint has 50 classes, the model 10" in causes[0]
    assert "--exclude 'fc.*'" in (report.suggestions[0].command or "")
    assert not _strict_loads(TinyResNet(classes=10), path)


def test_causes_seen_through_a_prefix_shift(tmp_path: Path) -> None:
    model = TinyResNet(classes=7)
    checkpoint = trained_checkpoint(model, torch.randn(1, 3, 8, 8))
    checkpoint["model_state_dict"] = {
        f"_orig_mod.{k}": v for k, v in checkpoint["model_state_dict"].items()
    }
    path = _save(tmp_path, checkpoint, "ckpt.pt")  # a training checkpoint: weights inside
    report = check(path, SPEC)
    prefix, classes = report.suggestions
    assert "torch.compile" in prefix.cause
    assert "the checkpoint has 7 classes, the model 10" in classes.cause
    assert "--exclude '_orig_mod.fc.*'" in (classes.command or "")
    fixed = tmp_path / "fixed.pt"
    report = check(path, SPEC, init={"classes": 7}, fix=fixed)
    assert report.fixed_ok and _strict_loads(TinyResNet(classes=7), fixed)


def test_missing_and_unexpected_keys_grouped(tmp_path: Path) -> None:
    state = TinyResNet().state_dict()
    del state["layer1.1.bn2.running_var"]
    state["extra.proj.weight"] = torch.zeros(2, 2)
    path = _save(tmp_path, state)
    report = check(path, SPEC)
    assert report.missing == ("layer1.1.bn2.running_var",)
    assert report.unexpected == ("extra.proj.weight",)
    assert report.suggestions == ()
    text = "\n".join(report.lines())
    assert "layer1.1: bn2.running_var" in text and "extra.proj: weight" in text
    assert group_by_prefix(["a.b.c.weight", "a.b.d", "top"]) == {
        "a.b": ["c.weight", "d"],
        "": ["top"],
    }


def test_transposed_conv1d_weight(tmp_path: Path) -> None:
    path = _save(tmp_path, {"proj.weight": torch.zeros(4, 6)})
    report = check(path, {"proj.weight": ((6, 4), "float32")})
    assert report.mismatched == (("proj.weight", (6, 4), (4, 6)),)
    assert "transposed" in report.suggestions[0].cause


def test_vocabulary_size_differs(tmp_path: Path) -> None:
    path = _save(tmp_path, {"wte.weight": torch.zeros(60, 4), "lm_head.weight": torch.zeros(60, 4)})
    report = check(
        path, {"wte.weight": ((50, 4), "float32"), "lm_head.weight": ((50, 4), "float32")}
    )
    (suggestion,) = report.suggestions
    assert "different vocabulary: the checkpoint has 60 tokens, the model 50" in suggestion.cause


def _gpt2(tmp_path: Path) -> tuple[Path, transformers.GPT2LMHeadModel]:
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        architectures=["GPT2LMHeadModel"],
    )
    directory = tmp_path / "gpt2"
    directory.mkdir()
    config.save_pretrained(directory)
    return directory, transformers.GPT2LMHeadModel(config)


def test_gpt2_tie_stored_once(tmp_path: Path) -> None:
    directory, model = _gpt2(tmp_path)
    # safetensors' save_model keeps one name and records the other in its metadata
    saved = tmp_path / "model.safetensors"
    safetensors.torch.save_model(model, str(saved))
    report = check(saved, str(directory))
    assert report.ok, report.lines()
    assert any("once" in note and "lm_head.weight" in note for note in report.notes)

    # without that record (as save_pretrained writes it), the head is missing: say why
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(bare))
    report = check(bare, str(directory))
    assert report.missing == ("lm_head.weight",) and not report.unexpected
    (suggestion,) = report.suggestions
    assert "tied" in suggestion.cause and "transformer.wte.weight" in suggestion.cause
    assert "the model ties them" in suggestion.cause


def test_bad_model_specs(tmp_path: Path) -> None:
    with pytest.raises(modelport.errors.ModelportError, match=r"pkg\.module:Name"):
        build_model("nothing-here")
    with pytest.raises(modelport.errors.ModelportError, match="cannot import"):
        build_model("no_such_package_xyz:Net")
    with pytest.raises(modelport.errors.ModelportError, match="has no"):
        build_model("tests.models:Missing")
    with pytest.raises(modelport.errors.ModelportError, match="JSON"):
        build_model(SPEC, "{not json")
    with pytest.raises(modelport.errors.ModelportError, match=r"not an nn\.Module"):
        build_model("tests.models:dtype_zoo")
    with pytest.raises(modelport.errors.ModelportError, match="building it failed"):
        build_model(SPEC, '{"no_such_argument": 1}')


def test_cli_exit_codes_and_json(tmp_path: Path, cli: Cli) -> None:
    model = TinyResNet()
    plain = _save(tmp_path, model.state_dict())
    wrapped = _save(tmp_path, {f"module.{k}": v for k, v in model.state_dict().items()}, "d.pt")

    done = cli("check", "--model", SPEC, plain, "--json")
    assert done.code == 0, done.err
    assert done.json["ok"] is True

    done = cli("check", "--model", SPEC, wrapped, "--json")
    assert done.code == 1, done.err
    answer = done.json
    assert {"ok", "missing", "unexpected", "mismatched", "suggestions"} <= set(answer)
    assert answer["suggestions"][0]["command"].endswith("--strip-prefix auto")

    fixed = tmp_path / "fixed.safetensors"
    done = cli("check", "--model", SPEC, wrapped, "--fix", fixed)
    assert done.code == 0, done.err
    assert "likely cause: prefix shift" in done.out and "and it fits" in done.out
    fresh = TinyResNet()
    fresh.load_state_dict(safetensors.torch.load_file(str(fixed)), strict=True)


def test_cli_error_and_human_output(tmp_path: Path, cli: Cli) -> None:
    plain = _save(tmp_path, TinyResNet(classes=3).state_dict())
    done = cli("check", "--model", "no_such_package_xyz:Net", plain, "--json")
    assert done.code == 2
    assert "cannot import" in done.json["error"]["message"]
    done = cli("check", "--model", SPEC, plain)
    assert done.code == 1
    text = done.out
    assert text.startswith("does not fit: 0 missing, 0 unexpected, 2 with another shape")
    assert "fc.weight: [10, 8] vs [3, 8]" in text
    assert "likely cause: different class count: the checkpoint has 3 classes, the model 10" in text
