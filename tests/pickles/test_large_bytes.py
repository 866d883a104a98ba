"""Large bytes an object's state holds (sklearn-crfsuite keeps its whole CRF model file as a
``bytes`` attribute) stay in the file while a pickle is read, and are read only when
``convert --all`` writes them. The oracle is pickle itself, with a harmless stand-in class."""

from __future__ import annotations

import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import modelport
from modelport.pickles.interface import Limits
from modelport.pickles.reading import read_pickle
from modelport.pickles.records import ByteSpan, FileBytes, ObjectRecord

_MODULE = "standin_resources"
_BLOB = bytes(range(256)) * 400  # 100 KiB: past the size a pickle's bytes are copied at


class FileResource:
    """A stand-in for sklearn-crfsuite's ``FileResource``: a model file kept as bytes."""


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    module = types.ModuleType(_MODULE)
    module.FileResource = FileResource  # type: ignore[attr-defined]
    monkeypatch.setattr(FileResource, "__module__", _MODULE)
    monkeypatch.setitem(sys.modules, _MODULE, module)
    yield


def _resource_pickle(weights: np.ndarray) -> bytes:
    resource = FileResource()
    resource.__dict__.update(data=_BLOB, name="model.crfsuite", weights=weights)
    return pickle.dumps({"resource": resource}, 3)


def test_bytes_in_an_objects_state_are_left_in_place(stand_in: None) -> None:
    data = _resource_pickle(np.arange(3.0))
    assert len(_BLOB) > Limits().inline_bytes

    record = read_pickle(data).value["resource"]

    assert isinstance(record, ObjectRecord)
    span = record.state["data"]
    assert isinstance(span, FileBytes) and isinstance(span, ByteSpan)
    assert span.length == len(_BLOB)
    assert data[span.offset : span.offset + span.length] == _BLOB
    assert span.read() == pickle.loads(data)["resource"].data


def test_convert_all_keeps_large_bytes(stand_in: None, tmp_path: Path) -> None:
    weights = np.linspace(0, 1, 5, dtype=np.float32)
    path = tmp_path / "crf.pkl"
    path.write_bytes(_resource_pickle(weights))
    oracle = pickle.loads(path.read_bytes())["resource"].__dict__

    report = modelport.inspect(path)
    options = modelport.ConvertOptions(take_all=True, allow_unsafe=True)
    modelport.convert(path, tmp_path / "crf.safetensors", options)

    assert report.extras["resource"]["data"] == {"__bytes__": len(_BLOB)}
    assert np.array_equal(load_file(tmp_path / "crf.safetensors")["resource.weights"], weights)
    back = modelport.load(tmp_path / "crf.safetensors", weights=False)["resource"]
    assert back.state["data"] == oracle["data"]
    assert back.state["name"] == oracle["name"]
