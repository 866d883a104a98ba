"""``--example-inputs``: tensors from npz / torch / safetensors files, matched to ``forward``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelport.errors import ConversionError, UnsafeModelError, UsageError
from modelport.torch_models.example_inputs import (
    Argument,
    forward_arguments,
    match_arguments,
    read_example_inputs,
)
from tests.models import Router, TinyResNet

ROUTER = [Argument("x", True), Argument("mask", True), Argument("scale", False)]


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"scale": torch.tensor(0.5), "mask": torch.ones(2, 5), "x": torch.randn(2, 5, 8)}


def write(path: Path, values: dict[str, torch.Tensor]) -> Path:
    """``values`` saved by the format's own library, chosen by the name's extension."""
    if path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in values.items()})
    elif path.suffix == ".pt":
        torch.save(values, path)
    else:
        save_file(values, str(path))
    return path


@pytest.mark.parametrize("name", ["inputs.npz", "inputs.pt", "inputs.safetensors"])
def test_each_file_type_in_forward_order(tmp_path: Path, name: str) -> None:
    expected = tensors()
    found = read_example_inputs(write(tmp_path / name, expected), Router())
    assert list(found) == ["x", "mask", "scale"]  # forward's order, whatever the file's
    for key, tensor in found.items():
        assert tensor.dtype == expected[key].dtype and torch.equal(tensor, expected[key])


def test_renamed_file_is_read_by_content(tmp_path: Path) -> None:
    path = write(tmp_path / "inputs.pt", tensors()).rename(tmp_path / "inputs.safetensors")
    assert list(read_example_inputs(path, Router())) == ["x", "mask", "scale"]


def test_positions_and_single_tensor(tmp_path: Path) -> None:
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5)
    saved = tmp_path / "tuple.pt"
    torch.save((x, mask), saved)  # names "0", "1"
    found = read_example_inputs(saved, Router())
    assert list(found) == ["x", "mask"] and torch.equal(found["mask"], mask)
    npz = tmp_path / "positional.npz"
    np.savez(npz, x.numpy(), mask.numpy())  # names "arr_0", "arr_1"
    assert list(read_example_inputs(npz, Router())) == ["x", "mask"]
    single = tmp_path / "one.safetensors"
    save_file({"images": torch.randn(2, 3, 8, 8)}, str(single))
    assert list(read_example_inputs(single, TinyResNet())) == ["x"]  # any name for one input
    assert list(read_example_inputs(single)) == ["images"]  # no model: the file's names


def test_mismatches_name_the_expected_arguments() -> None:
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5)
    with pytest.raises(UsageError, match=r"'ids' is not an argument of forward\(x, mask"):
        match_arguments({"ids": x, "mask": mask}, ROUTER, "f")
    with pytest.raises(UsageError, match=r"no tensor for mask, required by forward\("):
        match_arguments({"x": x, "scale": x}, ROUTER, "f")
    with pytest.raises(UsageError, match="takes 3"):
        match_arguments({"0": x, "1": x, "2": x, "3": x}, ROUTER, "f")
    gap = [Argument("input_ids", False), Argument("past", False), Argument("mask", False)]
    found = match_arguments({"mask": mask, "input_ids": x}, gap, "f")  # mask goes by keyword
    assert list(found) == ["input_ids", "mask"]
    assert list(match_arguments({"mask": mask, "x": x}, ROUTER, "f")) == ["x", "mask"]
    assert list(match_arguments({"b": x, "a": x}, None, "f")) == ["b", "a"]


def test_forward_arguments_of_torchscript() -> None:
    scripted = torch.jit.script(Router())
    assert forward_arguments(scripted) == ROUTER
    assert forward_arguments(Router()) == ROUTER


def test_attack_file_is_refused(tmp_path: Path, marker: Path, attacks: dict[str, bytes]) -> None:
    path = tmp_path / "inputs.pt"
    path.write_bytes(attacks["exec"])
    with pytest.raises(UnsafeModelError):
        read_example_inputs(path, Router())
    assert not marker.exists()
    with pytest.raises(ConversionError, match="holds no tensors"):
        read_example_inputs(path, Router(), allow_unsafe=True)  # read, never run: nothing
    assert not marker.exists()
