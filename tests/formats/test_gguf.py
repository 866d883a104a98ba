"""GGUF, with gguf-py (GGUFWriter writes, GGUFReader is the oracle)."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport import limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole, damage

Q = GGMLQuantizationType
ROW = 256  # a whole number of blocks for every quantized type used here


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, ROW)).astype(np.float32)
    return {
        "token_embd.weight": weight,
        "blk.0.attn_q.weight": weight.astype(np.float16),
        "blk.0.ffn_up.weight": rng.standard_normal((2, 3, 8)).astype(np.float32),
        "blk.0.ffn_norm.weight": rng.standard_normal(ROW).astype(np.float64),
        "int8": np.arange(-8, 8, dtype=np.int8).reshape(4, 4),
        "int16": np.arange(6, dtype=np.int16),
        "int32": np.arange(24, dtype=np.int32).reshape(1, 2, 3, 4),
        "int64": np.arange(5, dtype=np.int64),
    }


QUANTIZED = (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.TQ2_0, Q.MXFP4)


def write_gguf(path: Path, *, vocab: int = 2000, quantized: bool = True) -> dict[str, Any]:
    """A small llama-style file with every value type and several tensor types."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test")
    writer.add_uint32("llama.block_count", 1)
    writer.add_uint8("u8", 7)
    writer.add_int8("i8", -7)
    writer.add_uint16("u16", 700)
    writer.add_int16("i16", -700)
    writer.add_int32("i32", -70000)
    writer.add_float32("f32", 0.5)
    writer.add_uint64("u64", 1 << 40)
    writer.add_int64("i64", -(1 << 40))
    writer.add_float64("f64", 0.25)
    writer.add_bool("flag", True)
    writer.add_string("tokenizer.chat_template", "{{ messages }} ünïcode")
    writer.add_array("small", [1, 2, 3])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(vocab)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(vocab)])
    arrays = _arrays()
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    if quantized:
        base = arrays["token_embd.weight"]
        for qtype in QUANTIZED:
            writer.add_tensor(f"q.{qtype.name}", quantize(base, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arrays


def test_matches_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    arrays = write_gguf(path)
    reference = GGUFReader(str(path))
    with modelport.open(path) as model:
        assert model.format == "gguf"
        assert list(model.tensors) == [t.name for t in reference.tensors]
        for expected in reference.tensors:
            ref = model.tensors[expected.name]
            assert ref.shape == tuple(int(n) for n in reversed(expected.shape))
            assert ref.nbytes == expected.n_bytes
            assert ref.storage is not None and ref.storage.offset == expected.data_offset
            stored = np.asarray(expected.data).reshape(-1).view(np.uint8)
            assert digest(ref.raw_bytes()) == digest(stored), expected.name
            if expected.tensor_type == Q.BF16:
                assert ref.dtype == "bfloat16"
            elif expected.tensor_type in QUANTIZED:
                assert ref.dtype == expected.tensor_type.name
            if expected.name in arrays:
                assert digest(ref.numpy()) == digest(arrays[expected.name]), expected.name
        assert model.details["version"] == 3
        assert model.details["alignment"] == 32
        assert model.details["tensor_count"] == len(reference.tensors)
        assert model.details["kv_count"] == len(model.metadata)
        assert model.details["architecture"] == "llama"
        assert model.details["data_offset"] == reference.data_offset
        for key, field in reference.fields.items():
            if key.startswith("GGUF."):
                continue
            value = model.metadata[key]
            if key.startswith("tokenizer.ggml."):
                assert value["length"] == len(field.data)
                assert value["head"] == field.contents()[:16]
            elif key == "nested":  # gguf-py's contents() flattens nested arrays
                assert value == [[1, 2], [3]]
                assert field.types[:2] == [GGUFValueType.ARRAY, GGUFValueType.ARRAY]
                assert [n for part in value for n in part] == field.contents()
            elif isinstance(value, float):
                assert value == pytest.approx(field.contents())
            else:
                assert value == field.contents(), key


def test_bfloat16_values_and_quantized_blocks(tmp_path: Path) -> None:
    path = tmp_path / "q.gguf"
    arrays = write_gguf(path)
    with modelport.open(path) as model:
        bf16 = model.tensors["q.BF16"].torch()
        expected = torch.from_numpy(arrays["token_embd.weight"]).to(torch.bfloat16)
        assert torch.equal(bf16, expected)
        q4 = model.tensors["q.Q4_0"]
        assert q4.nbytes == 4 * ROW // 32 * 18
        with pytest.raises(UnsupportedDtypeError):
            q4.numpy()
        with pytest.raises(UnsupportedDtypeError):
            q4.torch()
        assert q4.raw_bytes().nbytes == q4.nbytes
    with pytest.raises(UnsupportedDtypeError):
        modelport.load(path)


def test_load_matches_reader_values(tmp_path: Path) -> None:
    path = tmp_path / "plain.gguf"
    arrays = write_gguf(path, quantized=False)
    loaded = modelport.load(path)
    reference = GGUFReader(str(path))
    assert list(loaded) == list(arrays)
    for tensor in reference.tensors:
        expected = torch.from_numpy(np.asarray(tensor.data).copy())
        assert torch.equal(loaded[tensor.name], expected.reshape(loaded[tensor.name].shape))
        assert torch.equal(loaded[tensor.name], torch.from_numpy(arrays[tensor.name]))


def test_inspect_json(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    arrays = write_gguf(path)
    report = modelport.inspect(path).to_json()
    assert report["format"] == "gguf"
    assert report["metadata"]["general.name"] == "tiny-test"
    assert report["metadata"]["nested"] == [[1, 2], [3]]
    assert report["metadata"]["tokenizer.ggml.tokens"]["__array__"] == "string"
    assert report["details"]["architecture"] == "llama"
    first = report["tensors"][0]
    assert first == {
        "name": "token_embd.weight",
        "dtype": "float32",
        "shape": [4, ROW],
        "nbytes": 4 * ROW * 4,
    }
    expected_params = sum(a.size for a in arrays.values()) + len(QUANTIZED) * 4 * ROW
    assert report["parameters"] == expected_params
    assert report["bytes_by_dtype"]["Q8_0"] == 4 * ROW // 32 * 34


def test_large_vocabulary_stays_fast(tmp_path: Path) -> None:
    path = tmp_path / "vocab.gguf"
    write_gguf(path, vocab=150_000, quantized=False)
    started = time.perf_counter()
    report = modelport.inspect(path)
    elapsed = time.perf_counter() - started
    assert report.metadata["tokenizer.ggml.tokens"]["length"] == 150_000
    assert elapsed < 2.0, elapsed


def test_renamed_file_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    write_gguf(path, quantized=False)
    with modelport.open(path) as model:
        assert model.format == "gguf"
        assert any("suggests safetensors" in w for w in model.warnings)


def test_version_1_and_big_endian_are_refused(tmp_path: Path) -> None:
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + struct.pack("<III", 1, 0, 0))
    with pytest.raises(UnsupportedVersionError, match="version 1"):
        modelport.inspect(v1)
    big = tmp_path / "big.gguf"
    writer = GGUFWriter(str(big), "llama", endianess=GGUFEndian.BIG)
    writer.add_tensor("w", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedVersionError, match="big-endian"):
        modelport.inspect(big)


# hand-built files -----------------------------------------------------------------------------


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", kind) + payload


def _info(name: str, dims: tuple[int, ...], ggml: int, offset: int) -> bytes:
    return (
        _str(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml, offset)
    )


def _gguf(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes = b"",
    *,
    counts: tuple[int, int] | None = None,
    alignment: int = 32,
) -> bytes:
    tensors, keys = counts if counts is not None else (len(infos), len(kvs))
    head = b"GGUF" + struct.pack("<IQQ", 3, tensors, keys) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


U32 = int(GGUFValueType.UINT32)
ARRAY = int(GGUFValueType.ARRAY)
F32 = int(Q.F32)


def _nested(depth: int) -> bytes:
    payload = struct.pack("<IQ", U32, 0)
    for _ in range(depth):
        payload = struct.pack("<IQ", ARRAY, 1) + payload
    return payload


MALFORMED: dict[str, tuple[bytes, type[Exception]]] = {
    "tensor-count-2**60": (_gguf([], [], counts=(1 << 60, 0)), TruncatedFileError),
    "kv-count-2**60": (_gguf([], [], counts=(0, 1 << 60)), TruncatedFileError),
    "string-length-lies": (
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"k" * 64,
        LimitExceededError,
    ),
    "string-past-end": (
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 100) + b"k" * 20,
        TruncatedFileError,
    ),
    "unknown-value-type": (_gguf([_kv("k", 99, b"")], []), CorruptFileError),
    "array-count-lies": (
        _gguf([_kv("k", ARRAY, struct.pack("<IQ", U32, 1 << 40))], []),
        TruncatedFileError,
    ),
    "array-nesting-bomb": (_gguf([_kv("k", ARRAY, _nested(50))], []), LimitExceededError),
    "duplicate-key": (
        _gguf([_kv("k", U32, b"\1\0\0\0"), _kv("k", U32, b"\2\0\0\0")], []),
        CorruptFileError,
    ),
    "five-dims": (_gguf([], [_info("t", (1, 1, 1, 1, 1), F32, 0)], b"\0" * 32), CorruptFileError),
    "negative-dim": (_gguf([], [_info("t", (1 << 63,), F32, 0)], b"\0" * 32), CorruptFileError),
    "dims-overflow": (
        _gguf([], [_info("t", (1 << 62, 1 << 62, 1 << 62, 1 << 62), F32, 0)], b"\0" * 32),
        TruncatedFileError,
    ),
    "unknown-ggml-type": (_gguf([], [_info("t", (1,), 4, 0)], b"\0" * 32), UnsupportedDtypeError),
    "misaligned": (_gguf([], [_info("t", (1,), F32, 4)], b"\0" * 64), CorruptFileError),
    "past-end": (_gguf([], [_info("t", (64,), F32, 0)], b"\0" * 32), TruncatedFileError),
    "overlap": (
        _gguf([], [_info("a", (16,), F32, 0), _info("b", (16,), F32, 32)], b"\0" * 96),
        CorruptFileError,
    ),
    "duplicate-tensor": (
        _gguf([], [_info("a", (1,), F32, 0), _info("a", (1,), F32, 32)], b"\0" * 64),
        CorruptFileError,
    ),
    "partial-block": (
        _gguf([], [_info("q", (33,), int(Q.Q4_0), 0)], b"\0" * 64),
        CorruptFileError,
    ),
    "alignment-not-power-of-2": (
        _gguf([_kv("general.alignment", U32, struct.pack("<I", 48))], []),
        CorruptFileError,
    ),
    "alignment-wrong-type": (
        _gguf([_kv("general.alignment", int(GGUFValueType.UINT64), struct.pack("<Q", 32))], []),
        CorruptFileError,
    ),
    "version-99": (b"GGUF" + struct.pack("<IQQ", 99, 0, 0), UnsupportedVersionError),
    "header-cut": (b"GGUF" + struct.pack("<I", 3) + b"\0" * 8, TruncatedFileError),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files(tmp_path: Path, case: str) -> None:
    raw, error = MALFORMED[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    started = time.perf_counter()
    with pytest.raises(error), modelport.open(path) as model:
        for ref in model.tensors.values():
            ref.raw_bytes()
    assert time.perf_counter() - started < 1.0


def test_invalid_utf8_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "names.gguf"
    path.write_bytes(_gguf([], [_info("ok", (1,), F32, 0)], b"\0" * 32).replace(b"ok", b"\xff\xfe"))
    with pytest.raises(CorruptFileError, match="UTF-8"):
        modelport.inspect(path)


def test_empty_and_zero_dim_tensors(tmp_path: Path) -> None:
    raw = _gguf([], [_info("scalar", (), F32, 0), _info("empty", (0, 3), F32, 32)], b"\0" * 32)
    path = tmp_path / "shapes.gguf"
    path.write_bytes(raw[: len(raw) - 32] + struct.pack("<f", 2.5) + b"\0" * 28)
    with modelport.open(path) as model:
        assert model.tensors["scalar"].shape == ()
        assert float(model.tensors["scalar"].numpy()) == 2.5
        assert model.tensors["empty"].shape == (3, 0)
        assert model.tensors["empty"].numpy().shape == (3, 0)


def test_truncated_at_several_points(tmp_path: Path) -> None:
    path = tmp_path / "full.gguf"
    write_gguf(path)
    raw = path.read_bytes()
    data_offset = GGUFReader(str(path)).data_offset
    for cut in (0, 3, 10, 30, 200, data_offset // 2, data_offset - 1, data_offset + 100):
        cut_path = tmp_path / f"cut{cut}.gguf"
        cut_path.write_bytes(raw[:cut])
        with pytest.raises(ModelportError):
            modelport.inspect(cut_path)


_VALID: list[bytes] = []


def _valid_bytes(tmp_path: Path) -> bytes:
    if not _VALID:
        path = tmp_path / "valid.gguf"
        writer = GGUFWriter(str(path), "llama")
        writer.add_array("a", ["x", "yy"])
        writer.add_array("n", [[1], [2, 3]])
        writer.add_float32("f", 1.0)
        writer.add_tensor("w", np.arange(8, dtype=np.float32))
        writer.add_tensor("q", quantize(np.ones((1, 32), np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _VALID.append(path.read_bytes())
    return _VALID[0]


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(damage(data, _valid_bytes(tmp_path), keep=4))
    assert_typed_error_or_whole(path, intact=_valid_bytes(tmp_path))


def test_walk_budget_bounds_huge_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    path = tmp_path / "vocab.gguf"
    write_gguf(path, vocab=3000, quantized=False)
    monkeypatch.setattr(limits, "MAX_GGUF_WALKED", 1000)
    with pytest.raises(LimitExceededError, match="elements"):
        modelport.inspect(path)
