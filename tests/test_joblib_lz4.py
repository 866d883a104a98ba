"""joblib's lz4 files (``joblib.dump(obj, f, compress="lz4")``): one LZ4 frame around the
pickle stream, read through the ``lz4`` package as joblib itself reads it. Without that
package the scan says what to install; it never calls the unseen bytes safe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

import modelport
from modelport.errors import MissingDependencyError
from tests.conftest import attack_pickles

LZ4_MAGIC = b"\x04\x22\x4d\x18"


def _lz4_frame() -> Any:
    return pytest.importorskip(
        "lz4.frame",
        reason="lz4 is not installed: add it to the test extra (modelport[lz4]) to run this",
    )


def test_a_joblib_lz4_dump_reads_like_joblib_and_scans_safe(tmp_path: Path) -> None:
    _lz4_frame()
    arrays = {"w": np.arange(20_000, dtype=np.float32).reshape(100, 200), "b": np.ones(7)}
    path = tmp_path / "model.joblib"
    joblib.dump(arrays, path, compress="lz4")
    assert path.read_bytes()[:4] == LZ4_MAGIC
    expected = joblib.load(path)  # the oracle
    assert modelport.scan(path).verdict == "safe"
    with modelport.open(path) as model:
        assert model.details["compression"] == "lz4"
        assert set(model.tensors) == set(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(model.tensors[name].numpy(), array)


def test_a_payload_in_an_lz4_frame_is_unsafe(tmp_path: Path, marker: Path) -> None:
    frame = _lz4_frame()
    path = tmp_path / "evil.joblib"
    path.write_bytes(frame.compress(attack_pickles(marker)["global-reduce"]))
    report = modelport.scan(path)
    assert report.verdict == "unsafe", report.to_json()
    assert not marker.exists()
    load = f"import joblib; joblib.load({str(path)!r})"
    subprocess.run([sys.executable, "-c", load], capture_output=True, timeout=60)
    assert marker.exists()  # joblib.load ran it: the scan judged what joblib reads


def test_without_lz4_an_lz4_frame_is_an_error_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The frame's bytes (here any: a frame header then data) cannot be seen without the
    package; the scan reports an error that names it, the reader raises."""
    path = tmp_path / "model.joblib"
    path.write_bytes(LZ4_MAGIC + bytes(range(64)))
    monkeypatch.setitem(sys.modules, "lz4", None)
    monkeypatch.setitem(sys.modules, "lz4.frame", None)
    report = modelport.scan(path)
    assert report.verdict == "error", report.to_json()
    assert any("modelport[lz4]" in f.message for f in report.files[0].findings)
    with pytest.raises(MissingDependencyError, match="lz4"):
        modelport.open(path)
