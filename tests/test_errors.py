"""The error tree carries what a caller needs: the path, the findings, the missing name."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import modelport
from modelport.errors import (
    CodeExecutionWarning,
    ModelFileNotFoundError,
    ModelportError,
    ModelportWarning,
    SuspiciousModelWarning,
    TensorNotFoundError,
    UnsafeModelError,
    UsageError,
)


def test_not_found_sets_filename_like_open(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as builtin:
        missing.read_bytes()
    with pytest.raises(ModelFileNotFoundError) as ours:
        modelport.open(missing)
    assert ours.value.filename == builtin.value.filename == str(missing)
    assert ours.value.errno == builtin.value.errno == errno.ENOENT
    assert ours.value.path == missing


def test_unsafe_model_error_carries_the_findings(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(Vtrue\ntR.")
    with pytest.raises(UnsafeModelError) as refused:
        modelport.load(evil)
    calls = [(f.global_name, f.usage) for f in refused.value.findings]
    assert refused.value.path == evil
    assert ("os.system", "called") in calls
    assert {f.severity for f in refused.value.findings} <= {"critical", "high", "medium"}
    assert refused.value.findings == modelport.scan(evil).serious


def test_tensor_not_found_names_close_matches(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"fc.weight": np.ones((2, 2), np.float32)}, str(path))
    with modelport.open(path) as model:
        assert model.tensor("fc.weight").shape == (2, 2)
        with pytest.raises(KeyError, match=r"no tensor 'fc.weigth'.*did you mean 'fc.weight'"):
            model.tensor("fc.weigth")
        with pytest.raises(TensorNotFoundError):
            model.tensor("head.bias")


def test_usage_error_is_a_value_error_and_not_a_conversion_failure(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(path))
    with pytest.raises(UsageError, match="--dtype must be one of") as bad:
        modelport.convert(path, tmp_path / "o.safetensors", modelport.ConvertOptions(dtype="fp7"))
    assert isinstance(bad.value, ValueError) and isinstance(bad.value, ModelportError)
    assert not (tmp_path / "o.safetensors").exists()


def test_warnings_share_one_base() -> None:
    assert issubclass(SuspiciousModelWarning, ModelportWarning)
    assert issubclass(CodeExecutionWarning, ModelportWarning)
    assert issubclass(ModelportWarning, UserWarning)


def test_a_string_with_an_invalid_escape_reads_as_cpython_reads_it(tmp_path: Path) -> None:
    import pickle
    import warnings

    data = b"(dS'w'\nS'a\\o'\ns."  # protocol 0: a dict whose STRING value escapes 'o'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = pickle.loads(data)
    path = tmp_path / "old.pkl"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # modelport itself must not warn
        with modelport.open(path) as opened:
            assert opened.tree == expected == {"w": "a\\o"}


def test_errors_from_deep_in_a_format_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a")  # no STOP
    with pytest.raises(modelport.errors.FormatError) as raised:
        modelport.open(path)
    assert raised.value.path == path
    assert str(raised.value).startswith(f"{path}: ")
    assert str(raised.value).count(str(path)) == 1  # named once, however deep it was raised


def test_special_files_get_a_typed_error_at_once(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "model.bin"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(modelport.errors.NotAModelError, match="named pipe") as raised:
        modelport.open(fifo)
    assert raised.value.kind == "special-file" and raised.value.path == fifo
    report = modelport.scan(fifo)
    assert report.verdict == "error"
    assert "named pipe" in report.files[0].findings[0].message
    device = Path("/dev/urandom")  # endless: read whole, it would never finish
    with pytest.raises(modelport.errors.NotAModelError, match="character device"):
        modelport.hash(device)


def test_a_deeply_nested_safetensors_header_is_a_corrupt_file(tmp_path: Path) -> None:
    import json
    import struct

    header = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(RecursionError):
        json.loads(header)  # the stdlib's own parser gives up on it
    with pytest.raises(modelport.errors.CorruptFileError, match="not valid JSON"):
        modelport.open(path)
    report = modelport.scan(path)
    assert report.verdict == "error"
    assert "not valid JSON" in report.files[0].findings[0].message
