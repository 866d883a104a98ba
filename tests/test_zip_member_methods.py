"""Zip members in bzip2 (method 12) and LZMA (method 14): Python's zipfile reads them, so
``numpy.load`` reads such an ``.npz`` (object arrays and all); torch's reader refuses them.
The scanner and the npz reader inflate them as zipfile does, under the same caps as
deflate."""

from __future__ import annotations

import bz2
import io
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import modelport
from modelport import limits
from modelport.errors import CorruptFileError
from tests.conftest import attack_pickles
from tests.test_compression_bombs import _one_member_zip

METHODS = [pytest.param(zipfile.ZIP_BZIP2, id="bzip2"), pytest.param(zipfile.ZIP_LZMA, id="lzma")]


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def _object_npy(payload: bytes) -> bytes:
    """An object array's .npy whose pickle is ``payload``: numpy.load unpickles it."""
    header = io.BytesIO()
    spec = {"descr": "|O", "fortran_order": False, "shape": (1,)}
    np.lib.format.write_array_header_1_0(header, spec)
    return header.getvalue() + payload


def _zip(path: Path, members: dict[str, bytes], method: int) -> None:
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("method", METHODS)
def test_a_benign_npz_of_compressed_members_is_safe_and_reads_like_numpy(
    tmp_path: Path, method: int
) -> None:
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int64)}
    path = tmp_path / "weights.npz"
    _zip(path, {f"{k}.npy": _npy(v) for k, v in arrays.items()}, method)
    with np.load(path) as loaded:  # the oracle: zipfile inflates them
        expected = {k: loaded[k] for k in loaded.files}
    assert modelport.scan(path).verdict == "safe"
    with modelport.open(path) as model:
        assert set(model.tensors) == set(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(model.tensors[name].numpy(), array)


@pytest.mark.parametrize("method", METHODS)
def test_an_object_array_payload_in_a_compressed_member_is_unsafe(
    tmp_path: Path, marker: Path, method: int
) -> None:
    payload = attack_pickles(marker)["global-reduce"]
    path = tmp_path / "evil.npz"
    _zip(path, {"w.npy": _npy(np.ones(3)), "obj.npy": _object_npy(payload)}, method)
    report = modelport.scan(path)
    assert report.verdict == "unsafe", report.to_json()
    assert any(f.member.endswith("obj.npy") for f in report.files[0].findings)
    assert not marker.exists()
    load = f"import numpy as np; np.load({str(path)!r}, allow_pickle=True)['obj']"
    subprocess.run([sys.executable, "-c", load], capture_output=True, timeout=60)
    assert marker.exists()  # numpy.load ran the payload: the scan judged what it reads


@pytest.mark.parametrize("method", METHODS)
def test_a_torch_archive_with_compressed_members_is_an_error_torch_agrees(
    tmp_path: Path, method: int
) -> None:
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(3)}, buffer)
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            packed = method if info.filename.endswith("data.pkl") else zipfile.ZIP_STORED
            target.writestr(info.filename, source.read(info), compress_type=packed)
    with pytest.raises(RuntimeError, match="unsupported method"):
        torch.load(path, weights_only=True)
    report = modelport.scan(path)
    assert report.verdict == "error", report.to_json()
    assert any("torch.load refuses" in f.message for f in report.files[0].findings)
    with pytest.raises(CorruptFileError, match="torch reads stored and deflated members only"):
        modelport.open(path)  # what torch's reader reads, and no more


def _bz2_member_zip(name: str, data: bytes, compressed: bytes) -> bytes:
    """A zip of one bzip2 member (``compressed``) whose directory declares ``data``."""
    return _one_member_zip(name, compressed, len(data), zlib.crc32(data), method=12, version=46)


def test_a_bzip2_object_array_past_the_inflation_cap_is_not_analysed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object array's member that bzip2 packs a million to one: numpy.load would inflate
    it all; the scan stops at limits.MAX_INFLATION_RATIO times its compressed size (or the
    allowance, lowered here from 64 MiB), and says so, rather than call unseen bytes safe."""
    monkeypatch.setattr(limits, "MIN_INFLATION_ALLOWANCE", 1 << 20)
    data = _object_npy(b"\x80\x04\x95" + bytes(4 << 20))  # a pickle frame of zeros
    path = tmp_path / "big.npz"
    path.write_bytes(_bz2_member_zip("obj.npy", data, bz2.compress(data, 9)))
    with zipfile.ZipFile(path) as archive:  # zipfile reads it back whole
        assert archive.read("obj.npy")[:128] == data[:128]
    report = modelport.scan(path)
    assert report.verdict == "error", report.to_json()
    assert any("MAX_INFLATION_RATIO" in f.message for f in report.files[0].findings)


def test_a_large_bzip2_numeric_member_is_safe(tmp_path: Path) -> None:
    """Zeros pack a million to one in bzip2 too, and numeric data holds no code: only the
    header is inflated, and the deflate bomb rule (1000:1) does not apply."""
    path = tmp_path / "zeros.npz"
    _zip(path, {"z.npy": _npy(np.zeros(17 << 20, np.uint8))}, zipfile.ZIP_BZIP2)
    with np.load(path) as loaded:
        assert not loaded["z"].any() and loaded["z"].size == 17 << 20
    assert modelport.scan(path).verdict == "safe"
