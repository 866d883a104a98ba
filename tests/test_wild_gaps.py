"""Layouts met in the wild corpus, each built the way its tool writes it and checked against
the tool's own loader: torch.export archives with constants and example inputs, joblib < 0.10
compressed side files, HDF5 filter pipelines (and PyTables' bitfields and blosc), and
whisper.cpp's silero-vad GGML file."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import modelport
from modelport.conversion.converting import convert
from modelport.conversion.options import ConvertOptions
from modelport.errors import NotAModelError
from tests.conftest import digest, torch_digest


# -- torch.export ------------------------------------------------------------------------------
class Lifted(nn.Module):
    """A parameter, a persistent and a non-persistent buffer, a plain tensor attribute (a
    lifted constant), and a keyword input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.register_buffer("scale", torch.full((2,), 0.5))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.offset = torch.arange(3.0)

    def forward(self, x: torch.Tensor, *, bias: torch.Tensor) -> torch.Tensor:
        total = self.conv(x).sum() * self.scale.sum() + self.scratch.sum()
        return total + self.offset.sum() + bias.sum()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "lifted.pt2"
    program = torch.export.export(
        Lifted(), (torch.randn(1, 1, 5, 5),), {"bias": torch.arange(4, dtype=torch.int64)}
    )
    torch.export.save(program, path)
    return path


def test_pt2_names_are_the_programs(exported: Path) -> None:
    program = torch.export.load(exported)
    args, kwargs = program.example_inputs
    expected: dict[str, torch.Tensor] = dict(program.state_dict)
    expected |= {f"constants.{k}": v for k, v in program.constants.items()}
    expected |= {f"example_inputs.args.{i}": v for i, v in enumerate(args)}
    expected |= {f"example_inputs.kwargs.{k}": v for k, v in kwargs.items()}
    with modelport.open(exported) as model:
        assert sorted(model.tensors) == sorted(expected)
        for name, tensor in expected.items():
            assert torch_digest(model.tensors[name].torch()) == torch_digest(tensor), name
    report = modelport.inspect(exported)
    assert [t.name for t in report.tensors][:3] == ["conv.weight", "conv.bias", "scale"]
    assert report.parameters == sum(t.numel() for t in program.state_dict.values())
    assert "constants" in report.weights_note and "example_inputs" in report.weights_note


def test_pt2_weights_are_the_state_dict(exported: Path, tmp_path: Path) -> None:
    program = torch.export.load(exported)
    loaded = modelport.load(exported)
    assert list(loaded) == list(program.state_dict)
    for name, tensor in program.state_dict.items():
        assert torch.equal(loaded[name], tensor), name
    out = tmp_path / "whole.safetensors"
    convert(exported, out, ConvertOptions(take_all=True))
    with modelport.open(out) as written:
        assert {"conv.weight", "constants.offset", "example_inputs.kwargs.bias"} <= set(
            written.tensors
        )


# -- joblib < 0.10 compressed side files ------------------------------------------------------
def dump_joblib_09(value: dict[str, Any], path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``joblib.dump(value, path, compress=3)`` as joblib 0.9 did it: each non-object array
    becomes a ``joblib.numpy_pickle.ZNDArrayWrapper`` whose raw bytes go to ``<path>_NN.npy.z``
    (a z-file), and the pickle itself is a z-file. joblib's own compat module writes both."""
    from joblib import numpy_pickle_compat as compat

    monkeypatch.setattr(compat.ZNDArrayWrapper, "__module__", "joblib.numpy_pickle")
    replaced: dict[str, Any] = {}
    for counter, (key, item) in enumerate(value.items(), start=1):
        if isinstance(item, np.ndarray) and not item.dtype.hasobject:
            side = f"{path.name}_{counter:02d}.npy.z"
            _, init_args, state = item.__reduce__()  # type: ignore[misc]
            with open(path.parent / side, "wb") as handle:
                compat.write_zfile(handle, state[-1], compress=3)
            item = compat.ZNDArrayWrapper(side, init_args, state[:-1])
        replaced[key] = item
    stream = io.BytesIO()
    pickle.Pickler(stream, protocol=3).dump(replaced)
    with open(path, "wb") as handle:
        compat.write_zfile(handle, stream.getvalue(), compress=3)


def test_joblib_compressed_side_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import joblib

    path = tmp_path / "model.pkl"
    value = {
        "coef": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "counts": np.arange(5, dtype=np.int64),
        "name": "estimator",
    }
    dump_joblib_09(value, path, monkeypatch)
    with pytest.warns(DeprecationWarning, match="less than 0.10"):  # joblib: the old format
        reference = joblib.load(path)
    arrays = {k: v for k, v in reference.items() if isinstance(v, np.ndarray)}
    assert len(arrays) == 3
    with modelport.open(path) as model:
        assert sorted(model.tensors) == sorted(arrays)
        for name, array in arrays.items():
            found = model.tensors[name].numpy()
            assert found.dtype == array.dtype and found.shape == array.shape, name
            assert digest(np.ascontiguousarray(found)) == digest(np.ascontiguousarray(array))
    side = tmp_path / "model.pkl_01.npy.z"
    with pytest.raises(NotAModelError, match=r"joblib < 0\.10 compressed array side.*'model\.pkl'"):
        modelport.inspect(side)
    side.unlink()
    report = modelport.inspect(path)
    assert {t.name for t in report.tensors} == {"fortran", "counts"}
    assert any("model.pkl_01.npy.z" in w and "missing" in w for w in report.warnings)


# -- HDF5 filter pipelines --------------------------------------------------------------------
DTYPES = ("uint8", "int16", "uint32", "int64", "float16", "float32", ">f8", "bool")


def test_hdf5_filter_pipelines_decode(tmp_path: Path) -> None:
    path = tmp_path / "filtered.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        for dtype in DTYPES:
            data = (rng.standard_normal((6, 10)) * 50).astype(dtype)
            name = dtype.strip("<>")
            handle.create_dataset(
                f"gzip/{name}", data=data, compression="gzip", shuffle=True, fletcher32=True
            )
            handle.create_dataset(f"lzf/{name}", data=data, compression="lzf", chunks=(3, 5))
        handle.create_dataset("scaleoffset", data=np.arange(40, dtype="i4"), scaleoffset=0)
    expected: dict[str, np.ndarray] = {}

    def collect(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            expected[name] = item[()]

    with h5py.File(path, "r") as reference, modelport.open(path) as model:
        reference.visititems(collect)
        assert len(expected) == 2 * len(DTYPES) + 1
        assert sorted(model.tensors) == sorted(expected)
        for name, array in expected.items():
            found = model.tensors[name].numpy()
            assert found.shape == array.shape and found.dtype == array.dtype.newbyteorder("<")
            assert np.array_equal(found, array), name


def test_pytables_bitfields_and_blosc(tmp_path: Path) -> None:
    tables = pytest.importorskip("tables")
    if h5py.h5z.filter_avail(32001):
        pytest.skip("this h5py decodes blosc (hdf5plugin is loaded)")
    path = tmp_path / "pytables.h5"
    flags = np.array([True, False, True, True])
    with tables.open_file(path, "w") as handle:
        handle.create_array("/", "flags", flags)  # PyTables stores bool as an 8-bit bitfield
        packed = tables.Filters(complib="blosc", complevel=5, shuffle=True)
        handle.create_carray("/", "packed", obj=np.arange(12, dtype="f4"), filters=packed)
        zlib = tables.Filters(complib="zlib", complevel=5, shuffle=True, fletcher32=True)
        handle.create_carray("/", "plain", obj=np.arange(8, dtype="u1"), filters=zlib)
    with h5py.File(path, "r") as reference, modelport.open(path) as model:
        assert sorted(model.tensors) == ["flags", "packed", "plain"]
        for name in ("flags", "plain"):
            assert np.array_equal(model.tensors[name].numpy(), reference[name][()]), name
            assert model.tensors[name].dtype == str(reference[name].dtype)
        with pytest.raises(OSError):
            reference["packed"][()]  # h5py itself cannot decode it
        assert np.array_equal(model.tensors["packed"].numpy(), np.arange(12, dtype="f4"))
        assert "blosc" in model.tensors["packed"].note


# -- whisper.cpp silero-vad GGML --------------------------------------------------------------
def write_silero_ggml(path: Path, state: dict[str, np.ndarray], channels: list[int]) -> None:
    """whisper.cpp's models/convert-silero-vad-to-ggml.py, with small encoder sizes."""
    layers = len(channels) - 1
    out = [struct.pack("i", 0x67676D6C), struct.pack("i", 10), b"silero-16k"]
    out += [struct.pack("iii", 6, 2, 0), struct.pack("ii", 512, 64), struct.pack("i", layers)]
    for index in range(layers):
        out.append(struct.pack("iii", channels[index], channels[index + 1], 3))
    out.append(struct.pack("iiii", channels[-1], channels[-1], channels[-1], 1))
    for key, tensor in state.items():
        if key == "_model.stft.forward_basis_buffer":
            data, shape, conv = tensor, [tensor.shape[2], tensor.shape[1], tensor.shape[0]], True
        else:
            data = tensor.squeeze()
            shape = list(reversed(data.shape))
            conv = "weight" in key and ("encoder" in key or "_model.decoder.decoder.2" in key)
        data = data.astype(np.float16) if conv else data.astype(np.float32)
        name = key.encode()
        out.append(struct.pack("iii", len(shape), len(name), 1 if conv else 0))
        out += [struct.pack("i", size) for size in shape]
        out += [name, data.tobytes()]
    path.write_bytes(b"".join(out))


def test_silero_vad_ggml(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    channels, hidden = [9, 8, 4, 8], 8
    state: dict[str, np.ndarray] = {}
    for index in range(len(channels) - 1):
        prefix = f"_model.encoder.{index}.reparam_conv"
        state[f"{prefix}.weight"] = rng.standard_normal((channels[index + 1], channels[index], 3))
        state[f"{prefix}.bias"] = rng.standard_normal(channels[index + 1])
    for name, shape in (("weight_ih", (4 * hidden, hidden)), ("weight_hh", (4 * hidden, hidden))):
        state[f"_model.decoder.rnn.{name}"] = rng.standard_normal(shape)
    state["_model.decoder.rnn.bias_ih"] = rng.standard_normal(4 * hidden)
    state["_model.decoder.rnn.bias_hh"] = rng.standard_normal(4 * hidden)
    state["_model.decoder.decoder.2.weight"] = rng.standard_normal((1, hidden, 1))
    state["_model.decoder.decoder.2.bias"] = rng.standard_normal(1)
    state["_model.stft.forward_basis_buffer"] = rng.standard_normal((10, 1, 16))
    path = tmp_path / "ggml-silero-v6.2.0.bin"
    write_silero_ggml(path, state, channels)
    report = modelport.inspect(path)
    assert report.details["layout"] == "silero-vad"
    assert report.metadata["model_type"] == "silero-16k"
    assert report.metadata["n_encoder_layers"] == 3 and report.metadata["kernel_size.2"] == 3
    assert report.metadata["encoder_in_channels.1"] == 8 and report.metadata["final_conv_out"] == 1
    with modelport.open(path) as model:
        assert list(model.tensors) == list(state)
        for name, tensor in state.items():
            stored = tensor if name.endswith("forward_basis_buffer") else tensor.squeeze()
            found = model.tensors[name].numpy()
            assert found.shape == stored.shape, name
            assert np.array_equal(found, stored.astype(found.dtype)), name
        assert model.tensors["_model.encoder.0.reparam_conv.weight"].dtype == "float16"
