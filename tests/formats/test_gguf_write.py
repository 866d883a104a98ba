"""Writing GGUF files, with gguf-py (GGUFReader, GGUFWriter, quants.quantize) as the oracle."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import save_file

import modelport
from modelport.errors import ConversionError
from modelport.formats.gguf import reader as gguf_format
from modelport.formats.gguf import writer as _gguf_writer
from modelport.transfer.write_plan import OutputTensor, WritePlan
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole, damage

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def plan_of(path: Path, extra: dict[str, tuple[str, str]] | None = None, **meta: str) -> Any:
    """(plan, open model): every tensor as stored, plus ``extra`` (name -> (source, dtype))."""
    model = modelport.open(path)
    tensors = [OutputTensor(name, ref.dtype, ref) for name, ref in model.tensors.items()]
    for name, (source, dtype) in (extra or {}).items():
        tensors.append(OutputTensor(name, dtype, model.tensors[source]))
    return WritePlan(tuple(tensors), dict(meta)), model


def write(plan: WritePlan, path: Path) -> Path:
    with open(path, "w+b", buffering=0) as handle:
        _gguf_writer.write_gguf(handle, plan)
    return path


def q8_0(array: np.ndarray) -> bytes:
    """gguf-py's Q8_0 (which warns where tiny scales overflow 1/d; the bytes still count)."""
    with np.errstate(all="ignore"):
        return bytes(gguf.quants.quantize(array.astype(np.float32), Q8_0).tobytes())


def source_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 64)).astype(np.float32),
        "f16": rng.standard_normal((2, 3, 5)).astype(np.float16),
        "bf16": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal((2, 2)),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "i16": np.arange(4, dtype=np.int16),
        "i32": np.arange(6, dtype=np.int32).reshape(3, 2),
        "i64": np.arange(4, dtype=np.int64),
        "scalar": np.asarray(np.float32(2.5)),
        "empty": np.zeros((3, 0), dtype=np.float32),
        "cube": rng.standard_normal((2, 3, 96)).astype(np.float16),
        "four_d": rng.standard_normal((1, 2, 3, 4)).astype(np.float32),
    }


def test_gguf_reader_reads_every_type(tmp_path: Path) -> None:
    arrays = source_arrays()
    source = tmp_path / "src.safetensors"
    save_file(arrays, source)
    extra = {
        "f32.q8": ("f32", "Q8_0"),
        "cube.q8": ("cube", "Q8_0"),
        "f32.half": ("f32", "float16"),
        "f32.bf16": ("f32", "bfloat16"),
    }
    plan, model = plan_of(
        source, extra, **{"modelport.source": "src", "general.architecture": "llama"}
    )
    with model:
        out = write(plan, tmp_path / "out.pt")  # a misleading extension
    reader = gguf.GGUFReader(out)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys == ["general.architecture", "general.alignment", "modelport.source"]
    field = reader.fields["modelport.source"]
    assert bytes(field.parts[field.data[0]]).decode() == "src"
    assert int(reader.fields["general.alignment"].parts[-1][0]) == 32
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == [t.name for t in plan.tensors]
    expected = {
        **arrays,
        "f32.half": arrays["f32"].astype(np.float16),
        "f32.bf16": arrays["f32"].astype(ml_dtypes.bfloat16),
    }
    for name, array in expected.items():
        tensor = tensors[name]
        assert tensor.shape.tolist() == list(reversed(array.shape)), name
        assert tensor.data.tobytes() == array.tobytes(), name
        assert tensor.data_offset % 32 == 0
    assert tensors["bf16"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert tensors["f64"].tensor_type == gguf.GGMLQuantizationType.F64
    for name, source_name in (("f32.q8", "f32"), ("cube.q8", "cube")):
        assert tensors[name].tensor_type == Q8_0
        assert tensors[name].data.tobytes() == q8_0(arrays[source_name])
    with modelport.open(out) as written:
        assert written.format == "gguf"
        for tensor in plan.tensors:
            ref = written.tensors[tensor.name]
            assert ref.dtype == tensor.dtype and ref.shape == tensor.shape
        for name, array in expected.items():
            assert digest(written.tensors[name].numpy()) == digest(array), name
        assert written.tensors["cube.q8"].raw_bytes().tobytes() == q8_0(arrays["cube"])
    report = modelport.inspect(out).to_json()
    assert report["format"] == "gguf"
    assert report["metadata"]["general.alignment"] == 32
    assert report["metadata"]["modelport.source"] == "src"
    rows = {t["name"]: (t["dtype"], t["shape"], t["nbytes"]) for t in report["tensors"]}
    assert rows["cube.q8"] == ("Q8_0", [2, 3, 96], 6 * 3 * 34)
    assert rows["scalar"] == ("float32", [], 4)
    assert rows["empty"] == ("float32", [3, 0], 0)
    assert any(".pt" in w for w in report["warnings"])
    assert report["safety"]["verdict"] == "safe"


def test_same_bytes_as_gguf_writer(tmp_path: Path) -> None:
    """gguf-py's own writer, given the same tensors and keys, writes the identical file."""
    rng = np.random.default_rng(3)
    arrays = {
        "token_embd.weight": rng.standard_normal((8, 32)).astype(np.float32),
        "norm.weight": rng.standard_normal(5).astype(np.float16),
        "pos": np.arange(3, dtype=np.int32),
    }
    source = tmp_path / "src.safetensors"
    save_file(arrays, source)
    plan, model = plan_of(source, {"q": ("token_embd.weight", "Q8_0")})
    plan = WritePlan(plan.tensors, {"general.architecture": "llama", "general.name": "tiny"})
    with model:
        ours = write(plan, tmp_path / "ours.gguf")
    reference = tmp_path / "reference.gguf"
    writer = gguf.GGUFWriter(reference, "llama")
    writer.add_custom_alignment(32)
    writer.add_name("tiny")
    for tensor in plan.tensors:
        array = arrays["token_embd.weight" if tensor.name == "q" else tensor.name]
        if tensor.name == "q":
            writer.add_tensor("q", gguf.quants.quantize(array, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(tensor.name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert ours.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize(
    ("shape", "dtype", "source_dtype", "message"),
    [
        ((1, 1, 1, 1, 2), "float32", "float32", "at most 4"),
        ((0, 3), "float32", "float32", "zero dim"),
        ((2, 31), "Q8_0", "float32", "multiple of 32"),
        ((), "Q8_0", "float32", "multiple of 32"),
        ((32,), "Q8_0", "int32", "floating"),
        ((2,), "bool", "bool", "cannot hold"),
        ((2,), "uint8", "uint8", "cannot hold"),
    ],
)
def test_refusals_come_before_any_byte(
    tmp_path: Path, shape: tuple[int, ...], dtype: str, source_dtype: str, message: str
) -> None:
    source = tmp_path / "src.safetensors"
    numpy_dtype = np.bool_ if source_dtype == "bool" else source_dtype
    save_file({"x": np.zeros(shape, dtype=numpy_dtype)}, source)
    with modelport.open(source) as model:
        plan = WritePlan((OutputTensor("x", dtype, model.tensors["x"]),), {})
        with pytest.raises(ConversionError, match=message):
            write(plan, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").stat().st_size == 0


def test_quantized_tensors_are_copied_from_a_gguf_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    weights = rng.standard_normal((4, 64)).astype(np.float32)
    source = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    for code in (gguf.GGMLQuantizationType.Q4_0, Q8_0):
        writer.add_tensor(code.name, gguf.quants.quantize(weights, code), raw_dtype=code)
    writer.add_tensor("norm", weights[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    plan, model = plan_of(source, {"norm.q8": ("norm", "Q8_0")}, **{"general.name": "q"})
    with model:
        out = write(plan, tmp_path / "copy.gguf")
        refused = WritePlan((OutputTensor("x", "Q4_K", model.tensors["norm"]),), {})
        with pytest.raises(ConversionError, match="Q4_K blocks can only be copied"):
            write(refused, tmp_path / "refused.gguf")
    before = {t.name: t for t in gguf.GGUFReader(source).tensors}
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name in ("Q4_0", "Q8_0", "norm"):
        assert after[name].tensor_type == before[name].tensor_type
        assert after[name].data.tobytes() == before[name].data.tobytes()
    assert after["norm.q8"].data.tobytes() == q8_0(weights[0])
    with modelport.open(out) as written:
        assert written.tensors["Q4_0"].dtype == "Q4_0"
        assert written.tensors["Q4_0"].shape == (4, 64)


def test_long_names_and_holds(tmp_path: Path) -> None:
    source = tmp_path / "src.safetensors"
    save_file({"x" * 64: np.zeros(2, np.float32), "y" * 63: np.ones(2, np.float32)}, source)
    with modelport.open(source) as model:
        fine = WritePlan((OutputTensor("y" * 63, "float32", model.tensors["y" * 63]),), {})
        write(fine, tmp_path / "fine.gguf")
        long = WritePlan((OutputTensor("x" * 64, "float32", model.tensors["x" * 64]),), {})
        with pytest.raises(ConversionError, match="63 bytes"):
            write(long, tmp_path / "long.gguf")
    for dtype in ("float32", "float16", "bfloat16", "float64", "int8", "int64", "Q8_0", "Q4_K"):
        assert gguf_format.holds(dtype)  # block types other than Q8_0: copied, never cast
    for dtype in ("bool", "uint8", "float8_e4m3fn", "complex64", "qint8", "uint16"):
        assert not gguf_format.holds(dtype)


def test_large_tensor_quantizes_in_bounded_memory(tmp_path: Path) -> None:
    big = np.random.default_rng(2).standard_normal((500, 32_000), dtype=np.float32)  # 64 MB
    source = tmp_path / "big.safetensors"
    save_file({"big": big}, source)
    plan, model = plan_of(source, {"big.q8": ("big", "Q8_0"), "big.half": ("big", "float16")})
    with model:
        tracemalloc.start()
        try:
            out = write(plan, tmp_path / "big.gguf")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 48 << 20  # chunks and their quantization: never a whole tensor
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert digest(tensors["big"].data) == digest(big)
    assert digest(tensors["big.half"].data) == digest(big.astype(np.float16))
    assert tensors["big.q8"].data.tobytes() == q8_0(big)


@settings(max_examples=50, deadline=None)
@given(
    values=hnp.arrays(
        np.float32,
        st.integers(1, 6).map(lambda n: n * 32),
        elements=st.floats(-1e6, 1e6, width=32) | st.just(0.0),
    )
)
def test_q8_0_matches_gguf_quantize(values: np.ndarray) -> None:
    blocks = _gguf_writer.quantize_q8_0(values.reshape(-1, 32))
    assert blocks.tobytes() == q8_0(values)


DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64"]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(1, 5), max_size=4)),
        min_size=1,
        max_size=5,
    ),
    quantize=st.booleans(),
)
def test_round_trip_random_tensors(
    tmp_path: Path, specs: list[tuple[str, list[int]]], quantize: bool
) -> None:
    rng = np.random.default_rng(len(specs))
    arrays = {
        f"t{i}": np.asarray(rng.standard_normal(shape) * 50).astype(
            getattr(ml_dtypes, d, None) or d
        )
        for i, (d, shape) in enumerate(specs)
    }
    if quantize:
        arrays["q"] = rng.standard_normal((2, 64)).astype(np.float32)
    source = tmp_path / "src.safetensors"
    save_file(arrays, source)
    plan, model = plan_of(source, {"q.q8": ("q", "Q8_0")} if quantize else None)
    with model:
        out = write(plan, tmp_path / "out.gguf")
    # gguf-py's reader indexes shape[-1] of BF16 tensors: it cannot read 0-d ones (llama.cpp
    # can; gguf-py's own writer writes them the same way, with n_dims 0)
    readable = not any(a.ndim == 0 and a.dtype == ml_dtypes.bfloat16 for a in arrays.values())
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors} if readable else {}
    with modelport.open(out) as written:
        for name, array in arrays.items():
            if readable:
                assert tensors[name].data.tobytes() == array.tobytes()
            assert written.tensors[name].dtype == str(array.dtype)
            assert digest(written.tensors[name].numpy()) == digest(array)
    if quantize and readable:
        assert tensors["q.q8"].data.tobytes() == q8_0(arrays["q"])


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_damaged_written_files_raise_only_modelport_errors(
    tmp_path: Path, data: st.DataObject
) -> None:
    clean = tmp_path / "clean.gguf"
    if not clean.exists():
        source = tmp_path / "src.safetensors"
        save_file({"w": np.ones((4, 32), np.float32), "b": np.arange(3)}, source)
        plan, model = plan_of(source, {"q": ("w", "Q8_0")}, note="x")
        with model:
            write(plan, clean)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(damage(data, clean.read_bytes()))
    assert_typed_error_or_whole(damaged, intact=clean.read_bytes())
