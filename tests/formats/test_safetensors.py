"""safetensors, with the safetensors library as the oracle."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file, save_model

import modelport
from modelport.errors import (
    ConversionError,
    CorruptFileError,
    FormatError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
)
from modelport.formats import safetensors_writer
from modelport.transfer.write_plan import OutputTensor, WritePlan
from tests.conftest import digest, torch_digest
from tests.models import TiedLM, TinyResNet, dtype_zoo
from tests.mutation import assert_typed_error_or_whole, damage


def contiguous_zoo() -> dict[str, torch.Tensor]:
    return {name: t.contiguous().clone() for name, t in dtype_zoo().items()}


def test_matches_safe_open(tmp_path: Path) -> None:
    path = tmp_path / "zoo.safetensors"
    save_file(contiguous_zoo(), path, metadata={"format": "pt", "note": "hi"})
    report = modelport.inspect(path)
    assert report.format == "safetensors"
    assert report.metadata == {"format": "pt", "note": "hi"}
    with safe_open(path, framework="pt") as reference, modelport.open(path) as model:
        assert sorted(model.tensors) == sorted(reference.keys())
        for name in reference.keys():  # noqa: SIM118 - safe_open is not a dict
            expected = reference.get_tensor(name)
            ref = model.tensors[name]
            assert ref.dtype == str(expected.dtype).removeprefix("torch.")
            assert ref.shape == tuple(expected.shape)
            assert torch_digest(ref.torch()) == torch_digest(expected), name
    assert report.parameters == sum(t.numel() for t in contiguous_zoo().values())


def test_numpy_views_are_zero_copy_memory_maps(tmp_path: Path) -> None:
    path = tmp_path / "np.safetensors"
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int16)}
    save_numpy(arrays, path)
    with modelport.open(path) as model:
        view = model.tensors["a"].numpy()
        assert not view.flags.writeable
        assert isinstance(view.base, np.memmap) or isinstance(view, np.memmap)
        assert digest(view) == digest(arrays["a"])


def test_shared_model_weights_round_trip(tmp_path: Path) -> None:
    model = TinyResNet()
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = modelport.load(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_save_model_alias_metadata_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "tied.safetensors"
    save_model(TiedLM(), str(path))
    report = modelport.inspect(path)
    assert report.metadata.get("head.weight") == "embed.weight"


def _write_raw(path: Path, header: object, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "error"),
    [
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            TruncatedFileError,
        ),
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            CorruptFileError,
        ),
        ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, CorruptFileError),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            CorruptFileError,
        ),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4, CorruptFileError),
        ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b"", CorruptFileError),
        ({"__metadata__": {"k": 1}}, b"", CorruptFileError),
        ([1, 2], b"", FormatError),
    ],
    ids=["short-data", "span-mismatch", "bad-dtype", "overlap", "hole", "negative", "meta", "list"],
)
def test_malformed_headers(tmp_path: Path, header: object, data: bytes, error: type) -> None:
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(error):
        modelport.inspect(path)


def test_huge_declared_header_is_refused_before_allocation(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b'{"a": {"dtype": "F32"')
    with pytest.raises((LimitExceededError, ModelportError)):
        modelport.inspect(path)


def test_header_longer_than_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b'{"a": {"dtype": "F32", "shape": [1]')
    with pytest.raises(TruncatedFileError, match="truncated"):
        modelport.inspect(path)


_VALID = None


def _valid_bytes() -> bytes:
    global _VALID
    if _VALID is None:
        import io

        from safetensors.numpy import save

        _VALID = save({"w": np.arange(6, dtype=np.float32), "b": np.ones(2, np.int64)})
        assert isinstance(_VALID, bytes)
        _ = io
    return _VALID


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(damage(data, _valid_bytes()))
    assert_typed_error_or_whole(path, intact=_valid_bytes())


def test_writer_bytes_equal_the_reference_writer(tmp_path: Path) -> None:
    """Given the tensors in the order the reference writer lays them out (by alignment, then
    name), and the same metadata, modelport's writer produces the very same bytes."""
    arrays = {
        "b.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a.bias": np.arange(3, dtype=np.float16),
        "step": np.array(5, dtype=np.int64),
        "empty": np.zeros((0, 4), np.float32),
        "mask": np.array([True, False, True]),
    }
    reference = tmp_path / "reference.safetensors"
    save_numpy(arrays, str(reference), metadata={"format": "pt"})
    ours = tmp_path / "ours.safetensors"
    with modelport.open(reference) as model:  # its tensors, in the file's order
        plan = WritePlan(
            tuple(OutputTensor(name, ref.dtype, ref) for name, ref in model.tensors.items()),
            {"format": "pt"},
        )
        with open(ours, "wb", buffering=0) as handle:
            safetensors_writer.write(handle, plan)
    assert ours.read_bytes() == reference.read_bytes()


def test_bytes_after_the_last_tensor_are_refused_as_safetensors_refuses_them(
    tmp_path: Path,
) -> None:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = tmp_path / "trailing.safetensors"
    save_numpy({"w": np.ones(4, np.float32)}, str(path))
    with open(path, "ab") as handle:
        handle.write(b"appended")
    with pytest.raises(SafetensorError, match="not fully covered"):
        load_file(str(path))  # the reference loader's answer
    with pytest.raises(CorruptFileError, match="8 bytes after the last tensor"):
        modelport.open(path)


def test_complex128_is_refused_both_ways(tmp_path: Path) -> None:
    """safetensors has no complex128 (its Dtype ends at C64): such a header is refused, and a
    complex128 tensor is never written where the reference loader could not read it."""
    header = json.dumps({"z": {"dtype": "C128", "shape": [1], "data_offsets": [0, 16]}}).encode()
    crafted = tmp_path / "c128.safetensors"
    crafted.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CorruptFileError, match="unknown dtype 'C128'"):
        modelport.open(crafted)
    source = tmp_path / "z.npy"
    np.save(source, np.ones(2, np.complex128))
    with pytest.raises(ConversionError, match="complex128"):
        modelport.convert(source, tmp_path / "z.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c128.safetensors", "z.npy"]
