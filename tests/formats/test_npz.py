"""numpy .npz, with numpy.load(allow_pickle=False) as the oracle."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport.errors import CorruptFileError, ModelportError, UnknownFormatError
from modelport.pickles.numpy_types import NumpyArray
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole, damage, zip_pickles_parse


def zoo() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "layer.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "layer.bias": rng.standard_normal(8).astype(np.float16),
        "ids": np.arange(-4, 4, dtype=np.int8),
        "mask": np.array([True, False, True]),
        "spectrum": (rng.standard_normal(3) + 1j).astype(np.complex64),
        "step": np.array(7, dtype=np.int64),
        "empty": np.zeros((2, 0), dtype=np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 4))),
        "big": np.arange(5, dtype=">i2"),
        "nested/name": np.ones(2, dtype=np.uint8),
    }


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_matches_numpy_load(tmp_path: Path, compressed: bool) -> None:
    path = tmp_path / "arrays.npz"
    (np.savez_compressed if compressed else np.savez)(path, **zoo())
    with np.load(path, allow_pickle=False) as reference, modelport.open(path) as model:
        assert model.format == "npz"
        assert list(model.tensors) == reference.files
        for name in reference.files:
            expected = reference[name]
            ref = model.tensors[name]
            assert ref.shape == expected.shape
            assert ref.dtype == str(expected.dtype.newbyteorder("<"))
            assert ref.nbytes == expected.nbytes
            little = expected.astype(expected.dtype.newbyteorder("<"))
            assert digest(ref.numpy()) == digest(little), name
        key = "deflated" if compressed else "stored"
        assert model.details[key] == len(reference.files)
        assert model.warnings == []
    loaded = modelport.load(path)
    for name, array in zoo().items():
        assert np.array_equal(loaded[name].numpy(), array), name


def test_stored_members_are_zero_copy(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    np.savez(path, w=np.arange(64, dtype=np.float32))
    with modelport.open(path) as model:
        ref = model.tensors["w"]
        view = ref.numpy()
        assert isinstance(view.base, np.memmap) or isinstance(view, np.memmap)
        assert ref.storage is not None and ref.storage.reader is None
        assert ref.byte_range() is not None
        start, length = ref.byte_range() or (0, 0)
        assert (
            path.read_bytes()[start : start + length] == np.arange(64, dtype=np.float32).tobytes()
        )


def test_inspect_json_and_torch(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    weights = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
    np.savez_compressed(path, **{k: v.numpy() for k, v in weights.items()})
    report = modelport.inspect(path).to_json()
    assert report["format"] == "npz"
    assert report["parameters"] == 9
    assert report["tensors"] == [
        {"name": "fc.weight", "dtype": "float32", "shape": [3, 2], "nbytes": 24},
        {"name": "fc.bias", "dtype": "float32", "shape": [3], "nbytes": 12},
    ]
    loaded = modelport.load(path)
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor)


def test_renamed_file_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    with open(path, "wb") as handle:
        np.savez(handle, a=np.ones(2))
    with modelport.open(path) as model:
        assert model.format == "npz"
        assert any("suggests torch" in w for w in model.warnings)


def test_torch_archives_and_mixed_zips_are_not_npz(tmp_path: Path) -> None:
    torch_path = tmp_path / "t.pt"
    torch.save({"w": torch.ones(2)}, torch_path)
    assert modelport.inspect(torch_path).format == "torch-zip"
    mixed = tmp_path / "mixed.zip"
    with zipfile.ZipFile(mixed, "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.ones(2))
        archive.writestr("a.npy", buffer.getvalue())
        archive.writestr("readme.txt", "hello")
    with pytest.raises(UnknownFormatError):
        modelport.inspect(mixed)


def test_object_arrays_are_read_without_executing(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez_compressed(path, objects=np.array([{"k": 1}, "x"], dtype=object), w=np.ones(2))
    with modelport.open(path) as model:
        assert list(model.tensors) == ["w"]
        value = model.tree["objects"]
        assert isinstance(value, NumpyArray)
        assert value.objects == [{"k": 1}, "x"]
        assert any("object array: contents are a pickle" in w for w in model.warnings)


def test_duplicate_member_names_last_wins_like_numpy(tmp_path: Path) -> None:
    path = tmp_path / "dup.npz"
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        for value in (1.0, 2.0):
            buffer = io.BytesIO()
            np.save(buffer, np.full(2, value))
            archive.writestr("a.npy", buffer.getvalue())
    with np.load(path) as reference, modelport.open(path) as model:
        assert digest(model.tensors["a"].numpy()) == digest(reference["a"])
        assert any("more than once" in w for w in model.warnings)


# malformed archives ---------------------------------------------------------------------------


def _npz_member(array: np.ndarray, *, extra: bytes = b"", compressed: bool = True) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    out = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        archive.writestr("a.npy", buffer.getvalue() + extra)
    return out.getvalue()


def _set_declared_size(raw: bytes, size: int) -> bytes:
    central = raw.rindex(b"PK\x01\x02")
    return raw[: central + 24] + struct.pack("<I", size) + raw[central + 28 :]


def test_member_inflating_past_its_declared_size_is_stopped(tmp_path: Path) -> None:
    array = np.arange(4, dtype=np.float32)
    raw = _npz_member(array, extra=b"\0" * (1 << 20))  # a 1 MiB tail the header does not declare
    path = tmp_path / "bomb.npz"
    path.write_bytes(raw)
    with pytest.raises(CorruptFileError, match="declares"):
        modelport.inspect(path)
    honest = 128 + array.nbytes  # what the npy header describes
    path.write_bytes(_set_declared_size(raw, honest))
    with pytest.raises(CorruptFileError, match="CRC"), modelport.open(path) as model:
        model.tensors["a"].numpy()  # inflation stopped at the declared size: the CRC fails


def test_declared_size_beyond_deflate_ratio_is_refused(tmp_path: Path) -> None:
    raw = _npz_member(np.zeros(4, np.float32))
    path = tmp_path / "ratio.npz"
    path.write_bytes(_set_declared_size(raw, 1 << 31))
    with pytest.raises(CorruptFileError, match="more than deflate"):
        modelport.inspect(path)


def test_corrupt_deflate_data_and_crc(tmp_path: Path) -> None:
    raw = bytearray(_npz_member(np.arange(256, dtype=np.float32)))
    data_start = 30 + len("a.npy")
    raw[data_start + 60] ^= 0xFF
    path = tmp_path / "crc.npz"
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelportError), modelport.open(path) as model:
        model.tensors["a"].numpy()


def test_stored_member_size_mismatch(tmp_path: Path) -> None:
    raw = _npz_member(np.ones(4, np.float32), extra=b"\0" * 4, compressed=False)
    path = tmp_path / "size.npz"
    path.write_bytes(raw)
    with pytest.raises(CorruptFileError, match="header describes"):
        modelport.inspect(path)


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_at_several_points(tmp_path: Path, compressed: bool) -> None:
    source = tmp_path / "full.npz"
    (np.savez_compressed if compressed else np.savez)(source, **zoo())
    raw = source.read_bytes()
    for cut in (2, 10, 100, len(raw) // 2, len(raw) - 30, len(raw) - 1):
        path = tmp_path / f"cut{cut}.npz"
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelportError):
            modelport.inspect(path)


_VALID: dict[bool, bytes] = {}


def _valid_bytes(compressed: bool) -> bytes:
    if compressed not in _VALID:
        buffer = io.BytesIO()
        arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.int8)}
        (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
        _VALID[compressed] = buffer.getvalue()
    return _VALID[compressed]


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.npz"
    seed = _valid_bytes(data.draw(st.booleans()))
    path.write_bytes(damage(data, seed))
    assert_typed_error_or_whole(path, pickles=zip_pickles_parse, intact=seed)
