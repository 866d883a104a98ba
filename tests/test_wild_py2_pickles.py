"""Python 2 era pickles met in the wild: text-protocol (protocol 0) pickles, which open like
text and keep whole model files as one escaped STRING line (pyvi's ``pyvi.pkl``), and
``.npy`` object arrays whose pickle is followed by bytes ``np.load`` never reads (numpy's
own ``py2-np0-objarr.npy``). The oracles are ``pickle.loads`` and ``np.load``, run only on
plain data and on classes defined here."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import modelport
from modelport.conversion.converting import convert
from modelport.conversion.options import ConvertOptions
from modelport.errors import ModelportError, UnsafeModelError
from modelport.formats import pickle_file
from modelport.formats.protocol import Probe
from modelport.pickles.records import ObjectRecord
from tests.conftest import Reduces


class Tagger:
    """A harmless class standing in for a Python 2 model object (sklearn_crfsuite's CRF)."""

    def __init__(self, c1: float, blob: bytes) -> None:
        self.c1, self.algorithm, self.blob = c1, "lbfgs", blob


def _rules(path: Path) -> set[str]:
    return {f.rule for f in modelport.scan(path).files[0].findings}


def test_protocol0_array_longer_than_a_megabyte_line_is_read(tmp_path: Path) -> None:
    """Protocol 0 writes an array's bytes as one escaped STRING line of megabytes."""
    array = np.arange(300_000, dtype=np.float32).reshape(600, 500)
    raw = pickle.dumps({"w": array, "lr": 0.1}, protocol=0)
    assert max(len(line) for line in raw.split(b"\n")) > 1 << 20
    path = tmp_path / "weights.pkl"
    path.write_bytes(raw)
    report = modelport.scan(path)
    assert (report.verdict, report.files[0].format) == ("safe", "pickle")
    with modelport.open(path) as model:
        assert np.array_equal(model.tensors["w"].numpy(), pickle.loads(raw)["w"])
    assert modelport.inspect(path).format == "pickle"


@pytest.mark.parametrize(
    "value",
    [
        {"verbose": False, "c2": 0.1, "layers": [1, 2, (3, "x")], "name": None},
        [{"a": 1}, "\u00e9t\u00e9", 2**70, -1.5],
        ("only", "a", "tuple"),
        {"blob": b"\x00\xff" * 40_000},
    ],
    ids=["dict", "list", "tuple", "bytes"],
)
def test_protocol0_plain_data_reads_as_pickle_loads_reads_it(tmp_path: Path, value: object) -> None:
    raw = pickle.dumps(value, protocol=0)
    path = tmp_path / "data.pkl"
    path.write_bytes(raw)
    probe = Probe.of(path)
    assert pickle_file.sniff(probe)
    assert pickle_file.read(path, probe).tree == pickle.loads(raw)
    assert modelport.scan(path).verdict == "safe"


def test_protocol0_object_is_a_custom_class_with_its_state(tmp_path: Path) -> None:
    """A class pickled the Python 2 way (``copy_reg._reconstructor`` then BUILD)."""
    obj = Tagger(0.25, b"CRF model bytes")
    raw = pickle.dumps(obj, protocol=0)
    assert raw.startswith(b"ccopy_reg\n_reconstructor\n")
    path = tmp_path / "tagger.pkl"
    path.write_bytes(raw)
    report = modelport.scan(path)
    assert report.verdict == "suspicious"
    assert _rules(path) == {"custom-class"}
    value = pickle_file.read(path, Probe.of(path)).tree
    assert isinstance(value, ObjectRecord)
    assert value.cls.path == f"{Tagger.__module__}.Tagger"
    assert value.state == vars(pickle.loads(raw))


def test_protocol0_attack_is_unsafe_and_never_runs(tmp_path: Path, marker: Path) -> None:
    raw = pickle.dumps(Reduces(os.system, f"touch {marker}"), protocol=0)
    assert raw.startswith((b"cposix\nsystem\n", b"cos\nsystem\n"))
    path = tmp_path / "pyvi.pkl"
    path.write_bytes(raw)
    assert modelport.scan(path).verdict == "unsafe"
    with pytest.raises(UnsafeModelError):
        modelport.load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("README.md", "checkpoint files for the model\n\nSee the paper.\n"),
        ("notes.txt", "(c) 2020 The Authors\nI think this works\n"),
        ("config.py", "class Config:\n    c1 = 0.1\n"),
        ("words.txt", "cat\ndog\nS'quoted'\n"),
    ],
)
def test_text_files_are_not_pickles(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert not pickle_file.sniff(Probe.of(path))
    with pytest.raises(ModelportError):
        modelport.inspect(path)
    assert modelport.scan(path).verdict != "safe"


@pytest.mark.parametrize("text", ['{"c1": 0.1}\n', "checkpoint files for the model\n\nSee.\n"])
def test_text_files_scan_as_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_text(text)
    assert modelport.scan(path).files[0].format == "text"


# -- .npy object arrays and the bytes after their pickle -----------------------------------
def _object_array() -> np.ndarray:
    return np.array([None, 1, "x", b"y"], dtype=object)


def test_py2_style_object_array_with_a_newline_after_its_pickle_is_safe(tmp_path: Path) -> None:
    """numpy's ``py2-np0-objarr.npy``: a '|O8' header, a protocol 2 pickle, then ``\\n``."""
    buffer = io.BytesIO()
    header = {"descr": "|O8", "fortran_order": False, "shape": (4,)}
    np.lib.format.write_array_header_1_0(buffer, header)
    pickle.dump(_object_array(), buffer, protocol=2)
    buffer.write(b"\n")
    path = tmp_path / "py2-np0-objarr.npy"
    path.write_bytes(buffer.getvalue())
    loaded = np.load(path, allow_pickle=True)  # the loader stops at STOP
    assert list(loaded) == list(_object_array())
    report = modelport.scan(path)
    assert report.verdict == "safe", report.to_json()
    assert "unread-bytes" in _rules(path)


def test_bytes_after_an_object_arrays_pickle_are_only_noted(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, _object_array(), allow_pickle=True)
    path.write_bytes(path.read_bytes() + b"\x00junk that no loader reads")
    assert list(np.load(path, allow_pickle=True)) == list(_object_array())
    assert modelport.scan(path).verdict == "safe"
    assert "trailing-data" not in _rules(path)


def test_a_pickle_after_an_object_arrays_pickle_is_scanned(tmp_path: Path, marker: Path) -> None:
    """``np.load`` of the same handle again unpickles what follows."""
    path = tmp_path / "objects.npy"
    np.save(path, _object_array(), allow_pickle=True)
    attack = pickle.dumps(Reduces(os.system, f"touch {marker}"))
    path.write_bytes(path.read_bytes() + attack)
    assert modelport.scan(path).verdict == "unsafe"
    assert not marker.exists()


def test_an_array_saved_after_an_object_array_is_scanned(tmp_path: Path, marker: Path) -> None:
    """``np.save`` twice to one handle; two ``np.load`` calls read both arrays."""
    path = tmp_path / "two.npy"
    payload = np.array([Reduces(os.system, f"touch {marker}")], dtype=object)
    with open(path, "wb") as handle:
        np.save(handle, _object_array(), allow_pickle=True)
        np.save(handle, payload, allow_pickle=True)
    assert modelport.scan(path).verdict == "unsafe"
    assert not marker.exists()


def test_bytes_after_a_plain_pickle_stay_suspicious(tmp_path: Path, marker: Path) -> None:
    """A loader may call ``pickle.load`` on the same file again: bytes after the first
    pickle are its to read, so they are reported, and a pickle there is scanned."""
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"a": 1}) + b"\n")
    assert modelport.scan(path).verdict == "suspicious"
    assert "trailing-data" in _rules(path)
    attack = pickle.dumps(Reduces(os.system, f"touch {marker}"))
    path.write_bytes(pickle.dumps({"a": 1}) + attack)
    assert modelport.scan(path).verdict == "unsafe"
    assert not marker.exists()


# -- large bytes held in plain containers --------------------------------------------------
def test_convert_all_keeps_large_bytes_in_any_container(tmp_path: Path) -> None:
    """Bytes above the inline size stay in the file while reading; ``convert --all`` reads
    them wherever they sit, not only in an object's state."""
    import torch

    big = bytes(range(256)) * 400
    value = {"w": np.ones(3, np.float32), "blob": big, "in_list": [big, 1], "in_tuple": (big,)}
    source, out = tmp_path / "data.pkl", tmp_path / "out.pt"
    source.write_bytes(pickle.dumps(value, protocol=4))
    assert convert(source, out, ConvertOptions(take_all=True)).verified
    copied = torch.load(out, weights_only=True)  # the oracle: torch reads what was written
    expected = pickle.loads(source.read_bytes())
    assert (copied["blob"], copied["in_list"], copied["in_tuple"]) == (
        expected["blob"],
        expected["in_list"],
        expected["in_tuple"],
    )
    assert np.array_equal(copied["w"].numpy(), expected["w"])


def test_plain_arrays_saved_one_after_another_are_stepped_over(tmp_path: Path) -> None:
    """``np.save`` many times to one handle: each ``np.load`` reads the next array; none is
    a container inside another, however many there are."""
    path = tmp_path / "many.npy"
    arrays = [np.arange(n, dtype=np.float32) for n in range(1, 12)]
    with open(path, "wb") as handle:
        for array in arrays:
            np.save(handle, array)
    with open(path, "rb") as handle:
        assert all(np.array_equal(np.load(handle), array) for array in arrays)
    report = modelport.scan(path)
    assert report.verdict == "safe", report.to_json()
    assert _rules(path) == set()


def test_an_object_array_after_plain_arrays_is_scanned(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "mixed.npy"
    payload = np.array([Reduces(os.system, f"touch {marker}")], dtype=object)
    with open(path, "wb") as handle:
        np.save(handle, np.ones(3))
        np.save(handle, np.zeros(2))
        np.save(handle, payload, allow_pickle=True)
    assert modelport.scan(path).verdict == "unsafe"
    assert not marker.exists()


def test_bytes_after_a_plain_array_are_only_noted(tmp_path: Path) -> None:
    path = tmp_path / "padded.npy"
    np.save(path, np.ones(3))
    path.write_bytes(path.read_bytes() + b"\x00\x00 not an array, not a pickle")
    assert modelport.scan(path).verdict == "safe"
    assert _rules(path) == {"unread-bytes"}
