"""Writing .npz archives, with numpy.load as the oracle; bfloat16 and float8 round-trip
through modelport's dtype map."""

from __future__ import annotations

import hashlib
import io
import json
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import modelport
from modelport import dtypes
from modelport.errors import ConversionError, CorruptFileError
from modelport.formats import _zip_writer, npz
from modelport.transfer.write_plan import OutputTensor, WritePlan
from tests.conftest import digest
from tests.models import dtype_zoo
from tests.mutation import assert_typed_error_or_whole, damage, zip_pickles_parse

MAP = "__modelport_dtypes__"


def raw_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def plan_of(path: Path, casts: dict[str, tuple[str, str]] | None = None) -> Any:
    """(plan, open model): every tensor as stored, plus ``casts`` (name -> (source, dtype))."""
    model = modelport.open(path)
    tensors = [OutputTensor(name, ref.dtype, ref) for name, ref in model.tensors.items()]
    for name, (source, dtype) in (casts or {}).items():
        tensors.append(OutputTensor(name, dtype, model.tensors[source]))
    return WritePlan(tuple(tensors), {"source": path.name}), model


def write(plan: WritePlan, path: Path) -> Path:
    with open(path, "w+b", buffering=0) as handle:
        npz.write(handle, plan)
    return path


def test_numpy_load_reads_every_tensor(tmp_path: Path) -> None:
    tensors = dtype_zoo()
    source = tmp_path / "zoo.pt"
    torch.save(tensors, source)
    casts = {"f32_as_f16": ("f32", "float16"), "f32_as_bf16": ("f32", "bfloat16")}
    plan, model = plan_of(source, casts)
    with model:
        out = write(plan, tmp_path / "zoo.npz")
    expected = dict(tensors)
    expected["f32_as_f16"] = tensors["f32"].half()
    expected["f32_as_bf16"] = tensors["f32"].bfloat16()
    viewed = {"bf16", "fp8", "fp8_e5m2", "f32_as_bf16"}
    with np.load(out, allow_pickle=False) as arrays:
        assert arrays.files == [*expected, MAP]
        assert json.loads(arrays[MAP].tobytes()) == {
            "bf16": "bfloat16",
            "fp8": "float8_e4m3fn",
            "fp8_e5m2": "float8_e5m2",
            "f32_as_bf16": "bfloat16",
        }
        for name, tensor in expected.items():
            array = arrays[name]
            assert array.shape == tuple(tensor.shape), name
            assert (
                array.tobytes()
                == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )
            if name in viewed:
                assert array.dtype.kind == "u" and array.itemsize == tensor.element_size()
            else:
                assert digest(array) == digest(tensor.contiguous().numpy()), name
                # the .npy header is the one numpy itself writes
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, array)
                assert zipfile.ZipFile(out).read(f"{name}.npy") == buffer.getvalue(), name
    assert zipfile.ZipFile(out).testzip() is None


def test_modelport_restores_bfloat16_and_float8(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16),
        "fp8": rng.standard_normal(16).astype(ml_dtypes.float8_e4m3fn),
        "e8m0": np.arange(4, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu),
        "ids": np.arange(5, dtype=np.int32),
        "flag": np.array(True),
        "empty": np.zeros((0, 3), dtype=np.float16),
    }
    source = tmp_path / "src.safetensors"
    save_file(arrays, source)
    plan, model = plan_of(source, {"w32": ("w", "float32")})
    with model:
        out = write(plan, tmp_path / "model.bin")  # a misleading extension
    with modelport.open(out) as written:
        assert written.format == "npz"
        assert written.details["restored_dtypes"] == 3
        assert list(written.tensors) == [t.name for t in plan.tensors]
        for tensor in plan.tensors:
            ref = written.tensors[tensor.name]
            assert ref.dtype == tensor.dtype and ref.shape == tensor.shape
            source_array = arrays.get(tensor.name, arrays["w"].astype(np.float32))
            assert digest(ref.numpy()) == digest(source_array), tensor.name
        storage = written.tensors["w"].storage
        assert storage is not None and storage.offset % 64 == 0
    report = modelport.inspect(out).to_json()
    assert report["format"] == "npz"
    assert report["parameters"] == 32 + 16 + 4 + 5 + 1 + 0 + 32
    rows = {t["name"]: (t["dtype"], t["shape"], t["nbytes"]) for t in report["tensors"]}
    assert rows["w"] == ("bfloat16", [4, 8], 64)
    assert rows["fp8"] == ("float8_e4m3fn", [16], 16)
    assert rows["flag"] == ("bool", [], 1)
    assert MAP not in rows
    assert any(".bin" in w for w in report["warnings"])
    assert report["safety"]["verdict"] == "safe"


def test_plain_dtypes_need_no_dtype_map(tmp_path: Path) -> None:
    source = tmp_path / "src.safetensors"
    save_file({"a": np.ones(3, np.float32), "b": np.arange(4, dtype=np.int64)}, source)
    plan, model = plan_of(source)
    with model:
        out = write(plan, tmp_path / "out.npz")
    with np.load(out) as arrays:
        assert sorted(arrays.files) == ["a", "b"]


def test_the_descr_table_is_what_numpy_writes() -> None:
    """``NATIVE`` is spelled out (so that writing an .npz header needs no numpy import):
    each entry is numpy's own ``descr`` for the dtype, and the carriers are as wide."""
    for name, descr in npz.NATIVE.items():
        assert descr == np.dtype(dtypes.to_numpy(name)).str, name
    for name, carrier in npz.VIEWED.items():
        assert np.dtype(carrier).itemsize == dtypes.dtype(name).itemsize == int(carrier[2:])


def dtype_map(mapping: dict[str, str]) -> np.ndarray:
    return np.frombuffer(json.dumps(mapping).encode(), dtype=np.uint8)


def test_a_dtype_map_written_by_numpy_is_honoured(tmp_path: Path) -> None:
    """The map is plain numpy: np.savez can write one, and odd entries only warn."""
    path = tmp_path / "m.npz"
    bits = np.array([0x3F80, 0xC000], dtype=np.uint16)  # 1.0 and -2.0 in bfloat16
    mapping = {"x": "bfloat16", "y": "bfloat16", "gone": "bfloat16", "z": "int4"}
    np.savez(path, x=bits, y=np.zeros(2, np.uint8), z=bits, **{MAP: dtype_map(mapping)})
    with modelport.open(path) as model:
        assert model.tensors["x"].dtype == "bfloat16"
        assert model.tensors["x"].numpy().astype(np.float32).tolist() == [1.0, -2.0]
        assert model.tensors["y"].dtype == "uint8"  # 1-byte carrier: not a bfloat16
        assert model.tensors["z"].dtype == "uint16"
        assert MAP not in model.tensors
        assert sum("dtype map" in w for w in model.warnings) == 3
    assert modelport.inspect(path).safety["verdict"] == "safe"


@pytest.mark.parametrize(
    "member",
    [np.arange(3), np.frombuffer(b"not json", np.uint8), dtype_map({"x": "bfloat16"})[None]],
    ids=["int64", "not-json", "2-d"],
)
def test_other_members_of_that_name_stay_tensors(tmp_path: Path, member: np.ndarray) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, x=np.zeros(2, np.uint16), **{MAP: member})
    with modelport.open(path) as model:
        assert list(model.tensors) == ["x", MAP]
        assert model.tensors["x"].dtype == "uint16"


def test_a_dtype_map_that_lies_about_its_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, x=np.zeros(2, np.uint16), **{MAP: dtype_map({"x": "bfloat16"})})
    raw = path.read_bytes()
    good = b"'shape': (17,)"
    assert raw.count(good) == 1
    for lie in (b"'shape': (99,)", b"'shape': (16,)"):
        path.write_bytes(raw.replace(good, lie))
        with pytest.raises(CorruptFileError, match="declares"):
            modelport.open(path)


def test_zip64_records_load_in_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_zip_writer, "ZIP64_LIMIT", 8)
    source = tmp_path / "src.safetensors"
    arrays = {"a": np.arange(50, dtype=np.float32), "b": np.ones(2, ml_dtypes.bfloat16)}
    save_file(arrays, source)
    plan, model = plan_of(source)
    with model:
        out = write(plan, tmp_path / "out.npz")
    with np.load(out) as loaded:
        assert digest(loaded["a"]) == digest(arrays["a"])
    with modelport.open(out) as written:
        for name, array in arrays.items():
            assert digest(written.tensors[name].numpy()) == digest(array)


def test_large_cast_streams_in_bounded_memory(tmp_path: Path) -> None:
    big = np.random.default_rng(1).standard_normal(16_000_000, dtype=np.float32)  # 64 MB
    source = tmp_path / "big.safetensors"
    save_file({"big": big}, source)
    plan, model = plan_of(source, {"half": ("big", "float16")})
    with model:
        tracemalloc.start()
        try:
            out = write(plan, tmp_path / "big.npz")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 48 << 20  # a chunk, its cast and the next chunk: never a whole tensor
    with np.load(out) as loaded:
        assert digest(loaded["big"]) == digest(big)
        assert digest(loaded["half"]) == digest(big.astype(np.float16))


def test_holds_and_refusals(tmp_path: Path) -> None:
    for dtype in ("float64", "bfloat16", "float8_e5m2", "complex64", "bool", "uint64"):
        assert npz.holds(dtype)
    for dtype in ("complex32", "Q4_0", "qint8", "float4_e2m1fn_x2"):
        assert not npz.holds(dtype)
    source = tmp_path / "src.safetensors"
    save_file({"a": np.ones(2, np.float32)}, source)
    plan, model = plan_of(source, {MAP: ("a", "bfloat16")})
    with model, pytest.raises(ConversionError, match="reserved"):
        write(plan, tmp_path / "out.npz")


@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_crc32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    combined = _zip_writer.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b))
    assert combined == zlib.crc32(a + b)


DTYPES = ["float32", "float16", "float64", "bfloat16", "float8_e4m3fn", "int8", "uint16", "bool"]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
        min_size=1,
        max_size=5,
    )
)
def test_round_trip_random_arrays(tmp_path: Path, specs: list[tuple[str, list[int]]]) -> None:
    rng = np.random.default_rng(len(specs))
    arrays = {
        f"t{i}": np.asarray(rng.standard_normal(shape) * 8).astype(getattr(ml_dtypes, d, None) or d)
        for i, (d, shape) in enumerate(specs)
    }
    source = tmp_path / "src.safetensors"
    save_file(arrays, source)
    plan, model = plan_of(source)
    with model:
        out = write(plan, tmp_path / "out.npz")
    with np.load(out) as loaded, modelport.open(out) as written:
        for name, array in arrays.items():
            assert loaded[name].tobytes() == array.tobytes()
            assert written.tensors[name].dtype == str(array.dtype)
            assert digest(written.tensors[name].numpy()) == digest(array)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_damaged_written_archives_raise_only_modelport_errors(
    tmp_path: Path, data: st.DataObject
) -> None:
    clean = tmp_path / "clean.npz"
    if not clean.exists():
        source = tmp_path / "src.safetensors"
        save_file({"w": np.ones((4, 4), ml_dtypes.bfloat16), "b": np.arange(3)}, source)
        plan, model = plan_of(source)
        with model:
            write(plan, clean)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(damage(data, clean.read_bytes()))
    assert_typed_error_or_whole(damaged, pickles=zip_pickles_parse, intact=clean.read_bytes())
