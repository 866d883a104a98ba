"""complex64 and complex128 tensors, written by the libraries that hold them (h5py, numpy,
torch), read and converted bit for bit; safetensors holds complex64 (``C64``) but has no
complex128, so converting one there is refused and nothing is written."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import modelport
from modelport import ConvertOptions
from modelport.errors import ConversionError


def _complex(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    real, imag = rng.standard_normal((2, *shape))
    return (real + 1j * imag).astype(dtype)


def _h5py_file(path: Path) -> dict[str, np.ndarray]:
    """Like h5py's own compound-dtype-complex.h5: each width in both byte orders (h5py
    stores complex as an {r, i} compound)."""
    arrays = {
        "<c8": _complex("<c8", (10,), 0),
        ">c8": _complex(">c8", (10,), 1),
        "<c16": _complex("<c16", (2, 5), 2),
        ">c16": _complex(">c16", (2, 5), 3),
    }
    with h5py.File(path, "w") as handle:
        for name, array in arrays.items():
            handle.create_dataset(name, data=array)
    with h5py.File(path, "r") as handle:
        return {name: handle[name][()] for name in handle}


def test_hdf5_complex_in_both_byte_orders_reads_as_h5py_does(tmp_path: Path) -> None:
    path = tmp_path / "complex.h5"
    expected = _h5py_file(path)
    with modelport.open(path) as model:
        assert sorted(model.tensors) == sorted(expected)
        for name, array in expected.items():
            assert model.tensors[name].dtype == f"complex{array.dtype.itemsize * 8}"
            found = model.tensors[name].numpy()
            assert found.dtype == array.dtype.newbyteorder("<")
            assert np.array_equal(found, array), name


@pytest.mark.parametrize("to", ["torch", "npz"])
def test_complex_converts_whole_to_targets_that_hold_it(tmp_path: Path, to: str) -> None:
    path = tmp_path / "complex.h5"
    expected = _h5py_file(path)
    target = tmp_path / f"out.{to}"
    report = modelport.convert(path, target, ConvertOptions(to=to))
    assert report.verified and len(report.tensors) == len(expected)
    if to == "torch":
        loaded = {k: v.numpy() for k, v in torch.load(target, weights_only=True).items()}
    else:
        with np.load(target) as archive:
            loaded = {k: archive[k] for k in archive.files}
    assert sorted(loaded) == sorted(expected)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype.newbyteorder("<")
        assert np.array_equal(loaded[name], array), name


def test_safetensors_holds_complex64_and_refuses_complex128(tmp_path: Path) -> None:
    path = tmp_path / "complex.h5"
    expected = _h5py_file(path)
    target = tmp_path / "out.safetensors"
    with pytest.raises(ConversionError, match=r"cannot hold .*\(complex128\).*nothing was written"):
        modelport.convert(path, target)
    assert not target.exists()
    modelport.convert(path, target, ConvertOptions(exclude=("*c16",)))
    loaded = load_file(str(target))  # the reference reader: its C64 is complex64
    assert sorted(loaded) == ["<c8", ">c8"]
    for name in loaded:
        assert loaded[name].dtype == np.complex64
        assert np.array_equal(loaded[name], expected[name]), name


@pytest.mark.parametrize("writer", ["torch.save", "np.savez", "np.save"])
def test_complex_tensors_of_torch_and_numpy_files(tmp_path: Path, writer: str) -> None:
    tensors = {
        "a": torch.from_numpy(_complex("<c8", (3, 4), 4)),
        "b": torch.from_numpy(_complex("<c16", (5,), 5)),
    }
    path = tmp_path / "complex.bin"
    if writer == "torch.save":
        torch.save(tensors, path)
    elif writer == "np.savez":
        with open(path, "wb") as handle:
            np.savez(handle, **{k: v.numpy() for k, v in tensors.items()})
    else:
        tensors = {"b": tensors["b"]}
        with open(path, "wb") as handle:
            np.save(handle, tensors["b"].numpy().astype(">c16"))
    with modelport.open(path) as model:
        found = {name: ref.numpy() for name, ref in model.tensors.items()}
    assert len(found) == len(tensors)
    for name, tensor in tensors.items():
        key = name if name in found else next(iter(found))
        assert found[key].dtype == tensor.numpy().dtype
        assert np.array_equal(found[key], tensor.numpy()), name
