"""``inspect`` says whether ``torch.load(weights_only=True)`` loads a file and what
``add_safe_globals`` would admit it; torch itself is the oracle, on files it saved."""

from __future__ import annotations

import argparse
import collections
import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import modelport


def _object(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


CHECKPOINTS = {
    "plain": {"w": torch.ones(2)},
    "ordered": collections.OrderedDict(w=torch.ones(2), epoch=3),
    "namespace": {"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)},
    "nested-namespace": {"hparams": [{"opt": argparse.Namespace(momentum=0.9)}]},
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_the_answer_is_torchs(tmp_path: Path, kind: str, zipped: bool) -> None:
    path = tmp_path / f"{kind}.pt"
    torch.save(CHECKPOINTS[kind], path, _use_new_zipfile_serialization=zipped)
    answer = modelport.inspect(path).weights_only
    assert answer is not None
    try:
        torch.load(path, weights_only=True)
        refused = False
    except Exception:  # torch's UnpicklingError: the oracle's "no"
        refused = True
    assert answer["accepted"] is not refused
    if refused:
        admitted = [_object(name) for name in answer["add_safe_globals"]]
        with torch.serialization.safe_globals(admitted):
            torch.load(path, weights_only=True)
        assert [r["global"] for r in answer["refused"]] == ["argparse.Namespace"]


def test_files_torch_does_not_load_get_no_answer(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.ones(3))
    assert modelport.inspect(path).weights_only is None
