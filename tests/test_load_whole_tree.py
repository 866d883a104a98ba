"""``modelport.load(path, weights=False)``: a whole training checkpoint as torch objects.

The oracle is ``torch.load(weights_only=True)`` on the same file, written by ``torch.save``
from a real training step (a model, an Adam optimizer after one step, the loss, nested
containers): every leaf is compared by type and value, every tensor by dtype, shape, device
and contents, and storages shared in the file stay shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import modelport
from modelport.errors import UsageError
from modelport.pickles.records import ObjectRecord


def _training_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(torch.randn(5, 3)).pow(2).mean()
    loss.backward()
    optimizer.step()
    weights = model.state_dict()
    torch.save(
        {
            "epoch": 7,
            "model_state_dict": weights,
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": loss.detach(),
            "best_loss": 0.25,
            "history": [1, (2.5, "two", None, b"\x00\xff"), {"seen": torch.arange(3)}],
            "flags": {True, 3},
            "dtype": torch.bfloat16,
            "device": torch.device("cpu"),
            "row": weights["0.weight"][1],  # a view sharing the weight's storage
        },
        path,
    )


def _leaves(value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    yield where, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{where}[{index}]")


def _same(ours: Any, theirs: Any, where: str) -> None:
    assert type(ours) is type(theirs), where
    if isinstance(theirs, torch.Tensor):
        assert (ours.dtype, ours.shape, ours.device) == (
            theirs.dtype,
            theirs.shape,
            theirs.device,
        ), where
        assert torch.equal(ours, theirs), where
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs), where
    elif not isinstance(theirs, (list, tuple)):
        assert ours == theirs, where


def test_every_leaf_equals_torch_load(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _training_checkpoint(path)
    expected = torch.load(path, weights_only=True)
    loaded = modelport.load(path, weights=False)
    ours = dict(_leaves(loaded))
    theirs = dict(_leaves(expected))
    assert list(ours) == list(theirs)
    for where, value in theirs.items():
        _same(ours[where], value, where)
    assert loaded["model_state_dict"]._metadata == expected["model_state_dict"]._metadata
    assert loaded["flags"] == expected["flags"] == {True, 3}
    exp_avg = loaded["optimizer_state_dict"]["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, expected["optimizer_state_dict"]["state"][0]["exp_avg"])
    assert loaded["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_tensors_sharing_storage_in_the_file_share_it(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _training_checkpoint(path)
    loaded = modelport.load(path, weights=False)
    weight = loaded["model_state_dict"]["0.weight"]
    assert loaded["row"].untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    weight[1, 0] = 42.0
    assert loaded["row"][0].item() == 42.0


@pytest.mark.parametrize(
    "where",
    ["cpu", torch.device("cpu"), {"cpu": "cpu"}, None, lambda storage, location: storage],
    ids=["string", "device", "dict", "none", "callable"],
)
def test_map_location_forms_place_the_tree_as_torch_load_does(tmp_path: Path, where: Any) -> None:
    path = tmp_path / "checkpoint.pt"
    _training_checkpoint(path)
    expected = torch.load(path, map_location=where, weights_only=True)
    loaded = modelport.load(path, map_location=where, weights=False)
    ours = dict(_leaves(loaded))
    for name, value in _leaves(expected):
        if isinstance(value, torch.Tensor):
            assert ours[name].device == value.device, name
            assert torch.equal(ours[name], value), name


def test_a_callable_map_location_sees_each_storage_once(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _training_checkpoint(path)
    torch_seen: list[str] = []
    ours_seen: list[str] = []

    def remember(seen: list[str]) -> Any:
        def place(storage: Any, location: str) -> Any:
            seen.append(location)
            return storage

        return place

    torch.load(path, map_location=remember(torch_seen), weights_only=True)
    modelport.load(path, map_location=remember(ours_seen), weights=False)
    assert len(ours_seen) == len(torch_seen) > 10
    assert set(ours_seen) == set(torch_seen) == {"cpu"}


def test_a_cycle_in_the_pickle_is_a_cycle_in_the_result(tmp_path: Path) -> None:
    path = tmp_path / "cycle.pt"
    looped: list[Any] = [torch.ones(2)]
    looped.append(looped)
    torch.save({"loop": looped}, path)
    expected = torch.load(path, weights_only=True)
    loaded = modelport.load(path, weights=False)
    assert loaded["loop"][1] is loaded["loop"]
    assert expected["loop"][1] is expected["loop"]
    assert torch.equal(loaded["loop"][0], expected["loop"][0])


def test_objects_outside_the_allowlist_stay_inert_records(tmp_path: Path) -> None:
    """A pickled module: torch.load(weights_only=True) refuses it; modelport gives the inert
    record, its tensors placed, and nothing from the file runs."""
    path = tmp_path / "module.pt"
    torch.save({"model": torch.nn.Linear(2, 3), "step": 1}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    loaded = modelport.load(path, weights=False)
    record = loaded["model"]
    assert isinstance(record, ObjectRecord)
    assert record.class_path == "torch.nn.modules.linear.Linear"
    parameters = record.attributes()["_parameters"]
    assert isinstance(parameters, dict)
    assert isinstance(parameters["weight"], torch.Tensor)
    assert parameters["weight"].shape == (3, 2)
    assert loaded["step"] == 1


def test_a_safetensors_file_is_its_own_tree(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    save_file(tensors, path)
    loaded = modelport.load(path, weights=False)
    assert sorted(loaded) == ["a", "b"]
    assert all(torch.equal(loaded[name], value) for name, value in tensors.items())


@pytest.mark.parametrize(
    "options", [{"strip_prefix": "auto"}, {"strip_prefix": "module."}, {"ema": True}]
)
def test_weight_choices_are_refused_for_the_whole_tree(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    path = tmp_path / "checkpoint.pt"
    _training_checkpoint(path)
    with pytest.raises(UsageError, match="weights=False"):
        modelport.load(path, weights=False, **options)
