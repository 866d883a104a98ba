""" "The model weights" by what the file is: checkpoints laid out the way ultralytics, Stable
Diffusion (LDM) and training loops write them, built here the way those tools build them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import modelport
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
    expected = torch.load(path, weights_only=False)["ema"].state_dict()
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    report = modelport.inspect(path)
    assert report.weights_source == "ema"
    assert "ultralytics" in report.weights_note
    assert report.parameters == sum(t.numel() for t in expected.values())


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
    assert report.parameters == sum(t.numel() for t in model.state_dict().values())
