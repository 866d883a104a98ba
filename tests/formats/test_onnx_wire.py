"""ONNX initializers as the wire format allows them, checked against ``onnx.load`` and
``numpy_helper.to_array``: fields in any order, repeated (the last one wins), non-minimal
varints, long names and payloads, unknown fields, and graphs of many initializers. The
reader decodes the common tensor in a tight loop and everything else field by field; both
must give what onnx gives, and the same typed errors on damaged input.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import modelport
from modelport import limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
)

MASK64 = (1 << 64) - 1
# data_type -> the numpy dtype of its raw_data
RAW_TYPES = {
    TensorProto.FLOAT: np.dtype("<f4"),
    TensorProto.UINT8: np.dtype("u1"),
    TensorProto.INT64: np.dtype("<i8"),
    TensorProto.FLOAT16: np.dtype("<f2"),
    TensorProto.DOUBLE: np.dtype("<f8"),
    TensorProto.BOOL: np.dtype("?"),
}


def varint(value: int, padding: int = 0) -> bytes:
    """``value`` as a varint, with ``padding`` redundant zero groups (still valid protobuf)."""
    value &= MASK64
    groups = []
    while True:
        groups.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    groups += [0] * padding
    assert len(groups) <= 10
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


def field(number: int, wire: int, payload: bytes, tag_pad: int = 0, len_pad: int = 0) -> bytes:
    tag = varint(number << 3 | wire, tag_pad)
    return tag + (varint(len(payload), len_pad) + payload if wire == 2 else payload)


def model_bytes(initializers: list[bytes], graph_tag_pad: int = 0) -> bytes:
    """A ModelProto (ir_version 8, opset 17) whose graph holds these TensorProto bytes."""
    graph = field(2, 2, b"g") + b"".join(field(5, 2, t, graph_tag_pad) for t in initializers)
    return field(1, 0, varint(8)) + field(7, 2, graph) + field(8, 2, field(2, 0, varint(17)))


def onnx_arrays(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_as_onnx(path: Path) -> dict[str, np.ndarray]:
    expected = onnx_arrays(path)
    with modelport.open(path) as model:
        assert set(model.tensors) == set(expected)
        for name, array in expected.items():
            ref = model.tensors[name]
            assert ref.shape == array.shape, name
            assert ref.numpy().dtype == array.dtype, name
            assert ref.numpy().tobytes() == array.tobytes(), name
    return expected


@st.composite
def tensor_fields(draw: st.DrawFn) -> tuple[str, int, list[bytes]]:
    """A TensorProto as a list of encoded fields, to be shuffled, padded and repeated; with
    its name and the raw_data size its shape needs."""
    code = draw(st.sampled_from(sorted(RAW_TYPES)))
    dtype = RAW_TYPES[code]
    dims = draw(st.lists(st.integers(0, 3), max_size=3))
    if draw(st.booleans()):
        dims.insert(0, draw(st.integers(100, 140)))  # two-byte dims and raw lengths
    numel = int(np.prod(dims)) if dims else 1
    name = draw(st.text("abcxyz._/0123456789", min_size=1, max_size=160))
    if dtype == np.bool_:
        raw = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
        data = np.array(raw, dtype=np.bool_).tobytes()
    else:
        data = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    pad = st.integers(0, 2)
    if draw(st.booleans()):
        dim_fields = [field(1, 0, varint(d, draw(pad)), draw(pad)) for d in dims]
    else:
        dim_fields = [field(1, 2, b"".join(varint(d) for d in dims), draw(pad), draw(pad))]
    fields = [
        *dim_fields,
        field(2, 0, varint(code, draw(pad)), draw(pad)),
        field(8, 2, name.encode(), draw(pad), draw(pad)),
        field(9, 2, data, draw(pad), draw(pad)),
    ]
    if draw(st.booleans()):  # an earlier name and raw_data that the last ones replace
        fields[:0] = [field(8, 2, b"decoy"), field(9, 2, bytes(3))]
    if draw(st.booleans()):  # doc_string (12): known to onnx, unused by the reader
        fields.append(field(12, 2, b"a tensor"))
    return name, len(data), fields


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tensor=tensor_fields(), data=st.data())
def test_any_field_order_and_encoding_reads_as_onnx_does(
    tmp_path: Path, tensor: tuple[str, int, list[bytes]], data: st.DataObject
) -> None:
    name, _, fields = tensor
    decoys = fields[:2] if fields[0] == field(8, 2, b"decoy") else []
    body = decoys + data.draw(st.permutations(fields[len(decoys) :]))
    plain = numpy_helper.from_array(np.arange(3, dtype=np.float32), "plain")
    pad = data.draw(st.integers(0, 1))
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes([plain.SerializeToString(), b"".join(body)], pad))
    expected = assert_same_as_onnx(path)
    assert name in expected and "decoy" not in expected


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tensor=tensor_fields(), cut=st.integers(1, 8))
def test_raw_data_of_the_wrong_size_fails_as_in_onnx(
    tmp_path: Path, tensor: tuple[str, int, list[bytes]], cut: int
) -> None:
    """A last raw_data ``cut`` bytes longer than the shape needs: to_array refuses it, and
    modelport says so with a typed error."""
    _, nbytes, fields = tensor
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes([b"".join([*fields, field(9, 2, bytes(nbytes + cut))])]))
    with pytest.raises(ValueError):
        onnx_arrays(path)
    with pytest.raises(CorruptFileError, match="raw_data holds"):
        modelport.open(path)


def test_every_storage_form_in_one_graph(tmp_path: Path) -> None:
    """raw_data, typed fields (int64_data, int32_data bit patterns, double_data), external
    data and a string tensor, between plain initializers."""
    rng = np.random.default_rng(3)
    tensors = [
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"p{i}")
        for i in range(3)
    ]
    typed = helper.make_tensor("typed_i64", TensorProto.INT64, [2, 2], [1, -2, 3, 1 << 40])
    halves = helper.make_tensor(
        "typed_f16", TensorProto.FLOAT16, [3], np.array([1, -2, 0.5], np.float16)
    )
    doubles = helper.make_tensor("typed_f64", TensorProto.DOUBLE, [2], [0.25, -8.0])
    big = numpy_helper.from_array(rng.standard_normal((40, 10)).astype(np.float32), "external")
    strings = helper.make_tensor("strings", TensorProto.STRING, [2], [b"a", b"bc"])
    tensors[1:1] = [typed, halves, doubles, big, strings]
    graph = helper.make_graph([], "g", [], [], initializer=tensors)
    path = tmp_path / "forms.onnx"
    onnx.save_model(
        helper.make_model(graph),
        str(path),
        save_as_external_data=True,
        location="forms.bin",
        size_threshold=1024,
    )
    expected = onnx.load(str(path))
    arrays = {
        t.name: numpy_helper.to_array(t)
        for t in expected.graph.initializer
        if t.data_type != TensorProto.STRING
    }
    with modelport.open(path) as model:
        assert set(model.tensors) == set(arrays)
        for name, array in arrays.items():
            assert model.tensors[name].numpy().tobytes() == array.tobytes(), name
            assert model.tensors[name].shape == array.shape, name
        assert model.tensors["external"].storage.path == tmp_path / "forms.bin"
        assert model.details["external_data"] == ["forms.bin"]
        assert model.details["string_tensors"] == {"strings": [2]}


def plain_tensor(name: str, dims: list[int], raw: bytes, code: int = TensorProto.FLOAT) -> bytes:
    fields = [field(1, 0, varint(d)) for d in dims]
    return b"".join(
        [*fields, field(2, 0, varint(code)), field(8, 2, name.encode()), field(9, 2, raw)]
    )


def test_many_initializers_match_onnx(tmp_path: Path) -> None:
    count = 20_000
    tensors = [plain_tensor(f"w.{i}", [1], struct.pack("<f", i)) for i in range(count)]
    path = tmp_path / "many.onnx"
    path.write_bytes(model_bytes(tensors))
    with modelport.open(path) as model:
        assert list(model.tensors) == [f"w.{i}" for i in range(count)]
        assert model.tensors["w.12345"].numpy().tolist() == [12345.0]
        assert model.tensors["w.7"].byte_range() is not None
    sample = onnx.load(str(path)).graph.initializer
    assert len(sample) == count and sample[12345].name == "w.12345"


def test_damaged_plain_tensors_raise_typed_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    cases: list[tuple[bytes, type[ModelportError], str]] = [
        (plain_tensor("neg", [2, -1], b""), CorruptFileError, r"negative dimension in \[2, -1\]"),
        (plain_tensor("deep", [1] * (limits.MAX_RANK + 1), b"\0" * 4), LimitExceededError, "rank"),
        (plain_tensor("short", [2], b"\0" * 4), CorruptFileError, "raw_data holds 4"),
        (plain_tensor("t", [1], b"\0" * 4)[:-2], TruncatedFileError, "needs 4 bytes"),
        (plain_tensor("u", [1], b"\0" * 4, TensorProto.UNDEFINED), CorruptFileError, "UNDEFINED"),
    ]
    for tensor, error, message in cases:
        path.write_bytes(model_bytes([plain_tensor("ok", [1], b"\0" * 4), tensor]))
        with pytest.raises(error, match=message):
            modelport.open(path)
    tensor = plain_tensor("over", [1], b"\0" * 4)
    initializer = b"\x2a" + varint(len(tensor) + 10) + tensor  # claims 10 more
    graph = field(2, 2, b"g") + field(5, 2, plain_tensor("ok", [1], b"\0" * 4)) + initializer
    path.write_bytes(field(1, 0, varint(8)) + field(7, 2, graph))
    with pytest.raises(TruncatedFileError, match=f"needs {len(tensor) + 10} bytes"):
        modelport.open(path)


def test_field_budget_covers_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes([plain_tensor(f"w{i}", [1], b"\0" * 4) for i in range(50)]))
    with modelport.open(path) as model:
        assert len(model.tensors) == 50
    monkeypatch.setattr(limits, "MAX_ONNX_FIELDS", 120)
    with pytest.raises(LimitExceededError, match="protobuf fields"):
        modelport.open(path)
