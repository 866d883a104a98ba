"""numpy .npy, with numpy.load(allow_pickle=False) as the oracle."""

from __future__ import annotations

import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from modelport.pickles.numpy_types import NumpyArray
from modelport.pickles.records import CallRecord
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole, npy_pickle_parses


def zoo() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "float32": rng.standard_normal((3, 4)).astype(np.float32),
        "float16": rng.standard_normal(7).astype(np.float16),
        "float64": rng.standard_normal((2, 2, 2)),
        "int8": np.arange(-5, 5, dtype=np.int8),
        "int64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "uint8": np.arange(250, 256, dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "complex64": (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.int32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 5)).astype(np.float32)),
        "fortran3d": np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)),
        "bigendian": np.arange(6, dtype=">f4").reshape(2, 3),
        "bigendian_c8": np.array([1 + 2j, 3 - 4j], dtype=">c8"),
    }


@pytest.mark.parametrize("name", sorted(zoo()))
def test_matches_numpy_load(tmp_path: Path, name: str) -> None:
    array = zoo()[name]
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    expected = np.load(path, allow_pickle=False)
    with modelport.open(path) as model:
        assert model.format == "npy"
        assert list(model.tensors) == [name]
        ref = model.tensors[name]
        assert ref.shape == expected.shape
        assert ref.dtype == str(expected.dtype.newbyteorder("<"))
        view = ref.numpy()
        assert digest(view) == digest(expected.astype(expected.dtype.newbyteorder("<")))
        assert ref.nbytes == expected.nbytes
        fortran = expected.flags.f_contiguous and not expected.flags.c_contiguous
        assert model.details["fortran_order"] == fortran
        assert model.warnings == []
    loaded = modelport.load(path)[name]
    assert np.array_equal(loaded.numpy(), expected)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_header_versions(tmp_path: Path, version: tuple[int, int]) -> None:
    array = np.arange(10, dtype=np.float32).reshape(2, 5)
    path = tmp_path / "v.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array(handle, array, version=version)
    with modelport.open(path) as model:
        assert model.details["version"] == f"{version[0]}.{version[1]}"
        assert digest(model.tensors["v"].numpy()) == digest(np.load(path))


def test_views_are_zero_copy_memory_maps(tmp_path: Path) -> None:
    path = tmp_path / "weights.npy"
    np.save(path, np.arange(12, dtype=np.float32))
    with modelport.open(path) as model:
        view = model.tensors["weights"].numpy()
        assert not view.flags.writeable
        assert isinstance(view.base, np.memmap) or isinstance(view, np.memmap)


def test_inspect_json(tmp_path: Path) -> None:
    path = tmp_path / "embeddings.npy"
    np.save(path, np.ones((4, 8), dtype=np.float16))
    report = modelport.inspect(path).to_json()
    assert report["format"] == "npy"
    assert report["parameters"] == 32
    assert report["metadata"] == {}
    assert report["tensors"] == [
        {"name": "embeddings", "dtype": "float16", "shape": [4, 8], "nbytes": 64}
    ]
    assert report["details"]["descr"] == "<f2"


def test_bfloat16_from_ml_dtypes_is_raw_uint16(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)
    path = tmp_path / "bf.npy"
    np.save(path, array)
    with modelport.open(path) as model:
        ref = model.tensors["bf"]
        assert ref.dtype == "uint16"
        assert digest(ref.numpy()) == digest(array.view(np.uint16))
        assert any("bfloat16" in w and "uint16" in w for w in model.warnings)


def test_renamed_file_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    np.save(tmp_path / "x.npy", np.ones(3))
    path.write_bytes((tmp_path / "x.npy").read_bytes())
    with modelport.open(path) as model:
        assert model.format == "npy"
        assert list(model.tensors) == ["model"]
        assert any("suggests safetensors" in w for w in model.warnings)


def test_object_array_is_read_without_executing(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([1, "two", None], dtype=object), allow_pickle=True)
    with modelport.open(path) as model:
        assert model.tensors == {}
        value = model.tree["objects"]
        assert isinstance(value, NumpyArray)
        assert value.objects == [1, "two", None]
        assert any("object array: contents are a pickle" in w for w in model.warnings)


def _npy_header(descr: str, shape: tuple[int, ...], fortran: bool = False) -> bytes:
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin-1")


def test_malicious_object_array_never_runs(tmp_path: Path, marker: Path) -> None:
    payload = (
        b"\x80\x02cos\nsystem\n(V"
        + f"touch {marker}".encode()
        + b"\ntR"
        + b"cbuiltins\nexec\n(V"
        + f"open({str(marker)!r}, 'w').write('x')".encode()
        + b"\ntR"
        + b"\x86."  # TUPLE2, STOP
    )
    path = tmp_path / "evil.npy"
    path.write_bytes(_npy_header("|O", (2,)) + payload)
    with modelport.open(path) as model:
        value = model.tree["evil"]
        assert isinstance(value, tuple)
        assert all(isinstance(v, CallRecord) for v in value)
        assert any("pickle" in w for w in model.warnings)
    modelport.inspect(path).to_json()
    assert not marker.exists()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\x93NUMPY\x09\x00" + b"\0" * 10, UnsupportedVersionError),
        (b"\x93NUMPY\x01\x00\xff\xff{", TruncatedFileError),
        (b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 30) + b"{", LimitExceededError),
        (_npy_header("<f4", (4,)) + b"\0" * 8, TruncatedFileError),
        (_npy_header("<f4", (-1,)), CorruptFileError),
        (_npy_header("<f4", (True,)), CorruptFileError),
        (_npy_header("<f4", tuple(range(1, 80))), CorruptFileError),
        (_npy_header("<U1", (1,)) + b"\xff" * 4, CorruptFileError),
        (_npy_header("<M8[ns]", (1,)) + b"\0" * 8, UnsupportedDtypeError),
        (_npy_header("|V3", (1,)) + b"\0" * 3, UnsupportedDtypeError),
        (_npy_header("<f16", (1,)) + b"\0" * 16, UnsupportedDtypeError),
        (_npy_header("<i3", (1,)) + b"\0" * 3, CorruptFileError),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}", CorruptFileError),
        (b"\x93NUMPY\x01\x00\x10\x00__import__('os')", CorruptFileError),
        (b"\x93NUMPY\x01\x00\x10\x00" + b"(" * 16, CorruptFileError),
        (b"\x93NUMPY\x01", TruncatedFileError),
        (_npy_header("|O", (1,)) + b"\x80\x02", ModelportError),
    ],
    ids=[
        "version",
        "header-past-end",
        "huge-header",
        "data-short",
        "negative-dim",
        "bool-dim",
        "too-many-dims",
        "text-past-unicode",
        "datetime",
        "void3",
        "float128",
        "bad-descr",
        "missing-keys",
        "not-a-literal",
        "nesting",
        "magic-cut",
        "pickle-cut",
    ],
)
def test_malformed_files(tmp_path: Path, raw: bytes, error: type[Exception]) -> None:
    path = tmp_path / "bad.npy"
    path.write_bytes(raw)
    with pytest.raises(error), modelport.open(path) as model:
        for ref in model.tensors.values():
            ref.numpy()


def test_trailing_bytes_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.ones(4, np.float32))
    path.write_bytes(path.read_bytes() + b"junk")
    with modelport.open(path) as model:
        assert digest(model.tensors["t"].numpy()) == digest(np.ones(4, np.float32))
        assert any("4 bytes after" in w for w in model.warnings)


def test_big_endian_loads_into_torch(tmp_path: Path) -> None:
    path = tmp_path / "be.npy"
    np.save(path, np.arange(6, dtype=">i4").reshape(3, 2))
    assert torch.equal(modelport.load(path)["be"], torch.arange(6, dtype=torch.int32).view(3, 2))


def test_truncated_at_several_points(tmp_path: Path) -> None:
    source = tmp_path / "full.npy"
    np.save(source, np.arange(100, dtype=np.float64))
    raw = source.read_bytes()
    for cut in (1, 6, 9, 50, 127, 128, 500):
        path = tmp_path / f"cut{cut}.npy"
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelportError):
            modelport.inspect(path)


def _valid_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.npy"
    np.save(path, np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)))
    return path.read_bytes()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(_valid_bytes(tmp_path))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(6, 80))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw))) if data.draw(st.booleans()) else len(raw)
    path = tmp_path / "m.npy"
    path.write_bytes(bytes(raw[:cut]))
    assert_typed_error_or_whole(path, pickles=npy_pickle_parses, intact=_valid_bytes(tmp_path))


def test_python2_headers_spell_longs_with_an_l(tmp_path: Path) -> None:
    """Python 2 wrote ``'shape': (2L, 3L)``; numpy still reads such files, and so must this."""
    values = np.arange(6, dtype="<f4")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }"
    header += b" " * (64 - (10 + len(header) + 1) % 64) + b"\n"
    path = tmp_path / "py2.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)
    with open(path, "ab") as handle:
        handle.write(values.tobytes())
    with pytest.warns(UserWarning, match="created on Python 2"):
        expected = np.load(path)  # the reference reader, which warns about the old header
    with modelport.open(path) as model:
        (tensor,) = model.tensors.values()
        assert tensor.shape == expected.shape == (2, 3)
        assert np.array_equal(tensor.numpy(), expected)
    assert modelport.scan(path).verdict == "safe"
    broken = tmp_path / "broken.npy"
    broken.write_bytes(path.read_bytes().replace(b"(2L, 3L)", b"(2L, 3X)"))
    with pytest.raises(modelport.errors.CorruptFileError, match="not a Python literal"):
        modelport.open(broken)


def test_a_dict_of_arrays_saved_with_np_save_lists_its_arrays(tmp_path: Path) -> None:
    """``np.save(path, state_dict)`` stores a 0-d object array; ``np.load(...).item()`` is the
    dict, and its arrays are the file's tensors, under their own names."""
    state = {"conv.weight": np.ones((2, 3), np.float32), "fc.bias": np.arange(4.0)}
    path = tmp_path / "weights.npy"
    np.save(path, state, allow_pickle=True)  # type: ignore[arg-type]
    expected = np.load(path, allow_pickle=True).item()  # the reference reader
    with modelport.open(path) as model:
        assert list(model.tensors) == list(expected)
        for name, tensor in model.tensors.items():
            assert np.array_equal(tensor.numpy(), expected[name])
    archive = tmp_path / "weights.npz"
    np.savez(archive, weights=np.array(state, dtype=object))
    with np.load(archive, allow_pickle=True) as npz:
        in_archive = npz["weights"].item()
    with modelport.open(archive) as model:
        assert sorted(model.tensors) == sorted(f"weights.{name}" for name in in_archive)
        for name, array in in_archive.items():
            assert np.array_equal(model.tensors[f"weights.{name}"].numpy(), array)
