"""BUILD on the result of a call modelport does not make (a ``__reduce__`` that returns a
factory function and the object's ``__dict__``): the state stays on the record, its tensors
are listed, loaded and converted. The oracle is pickle itself, loading the same bytes with a
harmless stand-in for the factory."""

from __future__ import annotations

import pickle
import pickletools
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import modelport
from modelport.pickles.reading import read_pickle
from modelport.pickles.records import CallRecord

_MODULE = "standin_factories"


class Holder:
    """What the stand-in factory makes: ``BUILD`` fills its ``__dict__`` as pickle does."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.modules[_MODULE].make_holder, ("tag",), dict(vars(self)))


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``standin_factories.make_holder``, a harmless factory, importable while a test runs."""

    def make_holder(tag: str) -> Holder:
        return Holder()

    make_holder.__module__ = _MODULE
    make_holder.__qualname__ = "make_holder"
    module = types.ModuleType(_MODULE)
    module.make_holder = make_holder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, _MODULE, module)
    yield


def _holder(**attributes: Any) -> Holder:
    made = Holder()
    vars(made).update(attributes)
    return made


def test_build_state_of_a_call_is_kept(stand_in: None) -> None:
    data = pickle.dumps([_holder(weights=np.arange(6, dtype=np.float32), epoch=3)], 2)
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert ops.index("REDUCE") < ops.index("BUILD")  # a call, then its state
    oracle = vars(pickle.loads(data)[0])

    record = read_pickle(data).value[0]

    assert isinstance(record, CallRecord)
    assert record.func.path == f"{_MODULE}.make_holder" and record.args == ("tag",)
    assert sorted(record.attributes()) == sorted(oracle)
    assert record.state["epoch"] == oracle["epoch"]
    np.testing.assert_array_equal(record.state["weights"].tensor.numpy(), oracle["weights"])


def test_tensors_in_a_calls_state_are_listed_loaded_and_converted(
    stand_in: None, tmp_path: Path
) -> None:
    path = tmp_path / "holder.pt"
    torch.save({"h": _holder(weight=torch.arange(4.0), name="x")}, path)
    oracle = torch.load(path, weights_only=False)["h"].__dict__

    report = modelport.inspect(path)
    loaded = modelport.load(path, allow_unsafe=True, weights=False)["h"]
    options = modelport.ConvertOptions(take_all=True, allow_unsafe=True)
    modelport.convert(path, tmp_path / "out.safetensors", options)

    assert [t.name for t in report.tensors] == ["h.weight"]
    assert report.extras == {"h": {"__call__": f"{_MODULE}.make_holder", "name": "x"}}
    assert loaded.state["name"] == oracle["name"]
    assert torch.equal(loaded.state["weight"], oracle["weight"])
    written = load_file(tmp_path / "out.safetensors")
    np.testing.assert_array_equal(written["h.weight"], oracle["weight"].numpy())
    back = modelport.load(tmp_path / "out.safetensors", weights=False)["h"]
    assert isinstance(back, CallRecord) and back.state["name"] == "x"
    assert torch.equal(back.state["weight"], oracle["weight"])
