"""joblib tests the object a BUILD fills with isinstance, so its array wrappers count
however the pickle made them (copyreg's reconstructors too); and a real joblib file with
an object array is clean in both readings the scan makes of it. The oracles are
joblib.load and joblib.dump."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import joblib
import numpy as np
import pytest

from modelport.pickles import judging


def _global(module: str, name: str) -> bytes:
    return _text(module) + _text(name) + b"\x93"


def _text(value: str) -> bytes:
    raw = value.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _by_reconstructor(wrapper: str) -> bytes:
    return (
        _global("copyreg", "_reconstructor")
        + _global("joblib.numpy_pickle", wrapper)
        + _global("builtins", "object")
        + b"N\x87R"
    )


_HIDDEN = _global("builtins", "print") + _text("hidden call ran") + b"\x85R"
_DTYPE = (
    _global("numpy", "dtype")
    + _text("u1")
    + b"\x89\x88\x87R(K\x03"
    + _text("|")
    + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
)
_STATE = (
    b"}("
    + _text("subclass")
    + _global("numpy", "ndarray")
    + _text("shape")
    + b"K\x05\x85"
    + _text("order")
    + _text("C")
    + _text("dtype")
    + _DTYPE
    + _text("allow_mmap")
    + b"\x89u"
)
# joblib.load reads the 5 array bytes (a BINBYTES header over the call) and runs the call.
ARRAY = (
    b"\x80\x04}"
    + _text("a")
    + _by_reconstructor("NumpyArrayWrapper")
    + _STATE
    + b"bB"
    + struct.pack("<I", len(_HIDDEN))
    + _HIDDEN
    + b"\x86s."
)


def _side_file(path: str) -> bytes:
    state = b"}(" + _text("filename") + _text(path) + _text("allow_mmap") + b"\x89u"
    return b"\x80\x04" + _by_reconstructor("NDArrayWrapper") + state + b"b."


def test_a_wrapper_made_by_copyreg_is_read_as_joblib_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.joblib"
    path.write_bytes(ARRAY)
    joblib.load(path)
    assert "hidden call ran" in capsys.readouterr().out
    rules = {(f.rule, f.global_name) for f in judging.scan_pickle(ARRAY).findings}
    assert ("stdlib-call", "builtins.print") in rules


def test_a_side_file_wrapper_made_by_copyreg_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere" / "array.npy"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"\x80\x04" + _HIDDEN + b".")
    data = _side_file(str(elsewhere))
    (tmp_path / "model.pkl").write_bytes(data)
    with pytest.raises(AttributeError):  # the side file unpickled, then joblib fails
        joblib.load(tmp_path / "model.pkl")
    assert "hidden call ran" in capsys.readouterr().out
    rules = [f.rule for f in judging.scan_pickle(data).findings]
    assert "reaches-outside" in rules


def test_a_joblib_object_array_is_clean_in_both_readings() -> None:
    buffer = io.BytesIO()
    joblib.dump({"o": np.array(["a", 1, None], dtype=object), "z": np.zeros(100)}, buffer)
    assert judging.scan_pickle(buffer.getvalue()).findings == []
