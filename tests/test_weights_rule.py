""" "The model weights" by what the file is: checkpoints laid out the way ultralytics, Stable
Diffusion (LDM) and training loops write them, built here the way those tools build them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import modelport
from modelport.conversion.options import ConvertOptions
from tests.models import TinyResNet


def test_ultralytics_keeps_the_trained_model_under_ema(tmp_path: Path) -> None:
    """A stripped ultralytics checkpoint: ``model`` is None, the model is pickled whole under
    ``ema`` (in half precision), beside training state."""
    model = TinyResNet()
    path = tmp_path / "best.pt"
    checkpoint = {
        "epoch": -1,
        "best_fitness": None,
        "model": None,
        "ema": copy.deepcopy(model).half(),
        "updates": 120,
        "optimizer": None,
        "train_args": {"imgsz": 64, "epochs": 3},
        "date": "2026-12-01T00:00:00",
        "version": "8.3.0",
    }
    torch.save(checkpoint, path)
    with pytest.warns(modelport.errors.SuspiciousModelWarning):  # a whole pickled module
        loaded = modelport.load(path)
    ema = torch.load(path, weights_only=False)["ema"]
    expected = ema.state_dict()
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    report = modelport.inspect(path)
    assert report.weights_source == "ema"
    assert "ultralytics" in report.weights_note
    assert report.parameters == sum(p.numel() for p in ema.parameters())  # not its buffers


def _ldm_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """LDM's layout: the model under ``model.``, LitEma's copies as ``model_ema.`` + the
    name without dots, its decay and update count beside them, and the autoencoder."""
    unet = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 4, 1))
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    ema = {
        f"model_ema.diffusion_model{k.replace('.', '')}": v + 1
        for k, v in unet.state_dict().items()
    }
    vae = {"first_stage_model.decoder.weight": torch.ones(2, 2)}
    extras = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    torch.save({"state_dict": {**state, **ema, **vae, **extras}, "global_step": 7}, path)
    return {**state, **vae}


def test_stable_diffusion_ema_copies_are_left_out_and_taken_with_ema(tmp_path: Path) -> None:
    path = tmp_path / "sd.ckpt"
    model = _ldm_checkpoint(path)
    loaded = modelport.load(path)
    assert sorted(loaded) == sorted(model)
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    note = modelport.inspect(path).weights_note
    assert "left out 6 EMA copies (model_ema.*)" in note and "--ema" in note

    with modelport.open(path) as opened:
        chosen = opened.weights(ema=True)
    assert sorted(chosen.tensors) == sorted(model)  # the model's names
    for name, tensor in model.items():
        taken = torch.from_numpy(chosen.tensors[name].numpy().copy())
        expected = tensor + 1 if name.startswith("model.") else tensor  # the EMA copy
        assert torch.equal(taken, expected), name
    assert "took the EMA weights (model_ema.*) for 4 of the model's tensors" in chosen.note


def test_an_ordinary_checkpoint_still_takes_its_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    model = TinyResNet()
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, path)
    report = modelport.inspect(path)
    assert report.weights_source == "state_dict"
    assert report.parameters == sum(p.numel() for p in model.parameters())  # not its buffers


class DetectionModel(torch.nn.Module):
    """ultralytics' layout: the layers live in ``self.model``, so ``model.`` begins every
    name of the module's own state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def _wrapper_notes(source: Path, tmp_path: Path, **options: object) -> list[str]:
    target = tmp_path / f"{source.stem}-out.safetensors"
    report = modelport.convert(source, target, ConvertOptions(**options))  # type: ignore[arg-type]
    return [note for note in report.notes if "--strip-prefix auto" in note]


def test_the_strip_prefix_hint_is_given_only_where_stripping_fits(tmp_path: Path) -> None:
    """Lightning's ``self.model`` and DDP's ``module.`` are wrappers; ``model.`` of a pickled
    module (ultralytics) or of a narrowed Stable Diffusion selection is the model's own name."""
    inner = torch.nn.Linear(2, 2)
    lightning = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in inner.state_dict().items()},
            "pytorch-lightning_version": "2.4.0",
            "epoch": 1,
        },
        lightning,
    )
    assert _wrapper_notes(lightning, tmp_path) == [
        "every key starts with 'model.' (a wrapper); --strip-prefix auto removes it"
    ]
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in inner.state_dict().items()}, ddp)
    assert len(_wrapper_notes(ddp, tmp_path)) == 1

    yolo = tmp_path / "best.pt"
    torch.save({"model": None, "ema": DetectionModel(), "epoch": -1}, yolo)
    assert _wrapper_notes(yolo, tmp_path, allow_unsafe=True) == []
    sd = tmp_path / "sd.ckpt"
    _ldm_checkpoint(sd)
    assert _wrapper_notes(sd, tmp_path, include=("model.diffusion_model.*",)) == []
