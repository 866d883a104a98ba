"""TFLite flatbuffers, built with the ``tflite`` package's generated builders; that package's
reader (``tflite.Model.GetRootAs`` ... ``DataAsNumpy``) and the arrays written are the oracle.

TensorFlow's converter does not install here and no installed package ships a ``.tflite``
file, so the models are assembled field by field the way the converter lays them out
(buffer 0 empty, 16-byte aligned buffer data, activations without buffers).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flatbuffers
import ml_dtypes
import numpy as np
import pytest
import tflite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import modelport
from modelport.errors import ModelportError
from modelport.formats import tflite as reader
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole, damage

FLOAT32, FLOAT16, INT32, UINT8, INT64, STRING, BOOL, INT16 = 0, 1, 2, 3, 4, 5, 6, 7
INT8, FLOAT64, INT4, BFLOAT16 = 9, 10, 17, 18
NUMPY = {
    FLOAT32: np.float32, FLOAT16: np.float16, INT32: np.int32, UINT8: np.uint8,
    INT64: np.int64, BOOL: np.bool_, INT16: np.int16, INT8: np.int8, FLOAT64: np.float64,
    BFLOAT16: ml_dtypes.bfloat16,
}  # fmt: skip


@dataclass
class Sparse:
    """``SparsityParameters``: levels in traversal order, each (dense_size,) for DENSE or
    (dense_size, segments, indices) for SPARSE_CSR."""

    traversal_order: list[int]
    block_map: list[int]
    levels: list[tuple[int] | tuple[int, list[int], list[int]]]


@dataclass
class Spec:
    name: str
    type: int
    shape: list[int]
    buffer: int = 0
    quant: tuple[list[float], list[int], int] | None = None
    sparse: bool | Sparse = False


@dataclass
class Graph:
    tensors: list[Spec]
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    ops: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    name: str = ""


def _offsets(b: flatbuffers.Builder, start: Any, offsets: list[int]) -> int:
    start(b, len(offsets))
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return int(b.EndVector())


def _ints(b: flatbuffers.Builder, start: Any, values: list[int], prepend: str = "Int32") -> int:
    start(b, len(values))
    for value in reversed(values):
        getattr(b, f"Prepend{prepend}")(value)
    return int(b.EndVector())


def _index_vector(b: flatbuffers.Builder, values: list[int]) -> int:
    vector = _ints(b, tflite.Int32VectorStartValuesVector, values)
    tflite.Int32VectorStart(b)
    tflite.Int32VectorAddValues(b, vector)
    return int(tflite.Int32VectorEnd(b))


def _sparsity(b: flatbuffers.Builder, layout: bool | Sparse) -> int:
    """The schema's SparsityParameters; ``True`` gives an empty (unreadable) table."""
    if not isinstance(layout, Sparse):
        tflite.SparsityParametersStart(b)
        return int(tflite.SparsityParametersEnd(b))
    dims = []
    for level in layout.levels:
        vectors = [_index_vector(b, list(part)) for part in level[1:]]  # type: ignore[arg-type]
        tflite.DimensionMetadataStart(b)
        tflite.DimensionMetadataAddFormat(b, 1 if vectors else 0)
        tflite.DimensionMetadataAddDenseSize(b, level[0])
        if vectors:
            tflite.DimensionMetadataAddArraySegmentsType(b, 1)  # Int32Vector
            tflite.DimensionMetadataAddArraySegments(b, vectors[0])
            tflite.DimensionMetadataAddArrayIndicesType(b, 1)
            tflite.DimensionMetadataAddArrayIndices(b, vectors[1])
        dims.append(tflite.DimensionMetadataEnd(b))
    dim_vector = _offsets(b, tflite.SparsityParametersStartDimMetadataVector, dims)
    order = _ints(b, tflite.SparsityParametersStartTraversalOrderVector, layout.traversal_order)
    blocks = _ints(b, tflite.SparsityParametersStartBlockMapVector, layout.block_map)
    tflite.SparsityParametersStart(b)
    tflite.SparsityParametersAddTraversalOrder(b, order)
    tflite.SparsityParametersAddBlockMap(b, blocks)
    tflite.SparsityParametersAddDimMetadata(b, dim_vector)
    return int(tflite.SparsityParametersEnd(b))


def _bytes(b: flatbuffers.Builder, raw: bytes) -> int:
    b.StartVector(1, len(raw), 16)
    b.head = b.head - len(raw)
    b.Bytes[b.head : b.head + len(raw)] = raw
    return int(b.EndVector())


def build(
    graphs: list[Graph],
    buffers: list[bytes | tuple[int, int]],
    *,
    opcodes: list[int | str] = (),  # type: ignore[assignment]
    description: str = "built by modelport tests",
    metadata: dict[str, int] | None = None,
    signature: tuple[str, dict[str, int], dict[str, int]] | None = None,
) -> bytes:
    """A .tflite flatbuffer; ``buffers[i]`` is data bytes or (offset, size) past the buffer."""
    b = flatbuffers.Builder(1024)
    buffer_tables = []
    for entry in [b"", *list(buffers)]:
        data = _bytes(b, entry) if isinstance(entry, bytes) and entry else None
        tflite.BufferStart(b)
        if data is not None:
            tflite.BufferAddData(b, data)
        if isinstance(entry, tuple):
            tflite.BufferAddOffset(b, entry[0])
            tflite.BufferAddSize(b, entry[1])
        buffer_tables.append(tflite.BufferEnd(b))
    subgraphs = []
    for graph in graphs:
        tensors = []
        for spec in graph.tensors:
            name = b.CreateString(spec.name)
            shape = _ints(b, tflite.TensorStartShapeVector, spec.shape)
            quant = None
            if spec.quant is not None:
                scales, zeros, axis = spec.quant
                scale_vec = _ints(
                    b, tflite.QuantizationParametersStartScaleVector, scales, "Float32"
                )  # type: ignore[arg-type]
                zero_vec = _ints(
                    b, tflite.QuantizationParametersStartZeroPointVector, zeros, "Int64"
                )
                tflite.QuantizationParametersStart(b)
                tflite.QuantizationParametersAddScale(b, scale_vec)
                tflite.QuantizationParametersAddZeroPoint(b, zero_vec)
                tflite.QuantizationParametersAddQuantizedDimension(b, axis)
                quant = tflite.QuantizationParametersEnd(b)
            sparsity = None
            if spec.sparse:
                sparsity = _sparsity(b, spec.sparse)
            tflite.TensorStart(b)
            tflite.TensorAddShape(b, shape)
            tflite.TensorAddType(b, spec.type)
            tflite.TensorAddBuffer(b, spec.buffer)
            tflite.TensorAddName(b, name)
            if quant is not None:
                tflite.TensorAddQuantization(b, quant)
            if sparsity is not None:
                tflite.TensorAddSparsity(b, sparsity)
            tensors.append(tflite.TensorEnd(b))
        operators = []
        for code, ins, outs in graph.ops:
            in_vec = _ints(b, tflite.OperatorStartInputsVector, ins)
            out_vec = _ints(b, tflite.OperatorStartOutputsVector, outs)
            tflite.OperatorStart(b)
            tflite.OperatorAddOpcodeIndex(b, code)
            tflite.OperatorAddInputs(b, in_vec)
            tflite.OperatorAddOutputs(b, out_vec)
            operators.append(tflite.OperatorEnd(b))
        tensor_vec = _offsets(b, tflite.SubGraphStartTensorsVector, tensors)
        inputs = _ints(b, tflite.SubGraphStartInputsVector, graph.inputs)
        outputs = _ints(b, tflite.SubGraphStartOutputsVector, graph.outputs)
        op_vec = _offsets(b, tflite.SubGraphStartOperatorsVector, operators)
        name = b.CreateString(graph.name)
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensor_vec)
        tflite.SubGraphAddInputs(b, inputs)
        tflite.SubGraphAddOutputs(b, outputs)
        tflite.SubGraphAddOperators(b, op_vec)
        tflite.SubGraphAddName(b, name)
        subgraphs.append(tflite.SubGraphEnd(b))
    codes = []
    for code in opcodes:
        custom = b.CreateString(code) if isinstance(code, str) else None
        tflite.OperatorCodeStart(b)
        number = 32 if isinstance(code, str) else code
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(number, 127))
        tflite.OperatorCodeAddBuiltinCode(b, number)
        tflite.OperatorCodeAddVersion(b, 1 if number != 3 else 3)
        if custom is not None:
            tflite.OperatorCodeAddCustomCode(b, custom)
        codes.append(tflite.OperatorCodeEnd(b))
    metas = []
    for key, index in (metadata or {}).items():
        meta_name = b.CreateString(key)
        tflite.MetadataStart(b)
        tflite.MetadataAddName(b, meta_name)
        tflite.MetadataAddBuffer(b, index)
        metas.append(tflite.MetadataEnd(b))
    signatures = []
    if signature is not None:
        key, ins, outs = signature
        maps = []
        for mapping in (ins, outs):
            entries = []
            for tensor_name, index in mapping.items():
                text = b.CreateString(tensor_name)
                tflite.TensorMapStart(b)
                tflite.TensorMapAddName(b, text)
                tflite.TensorMapAddTensorIndex(b, index)
                entries.append(tflite.TensorMapEnd(b))
            maps.append(_offsets(b, tflite.SignatureDefStartInputsVector, entries))
        sig_key = b.CreateString(key)
        tflite.SignatureDefStart(b)
        tflite.SignatureDefAddInputs(b, maps[0])
        tflite.SignatureDefAddOutputs(b, maps[1])
        tflite.SignatureDefAddSignatureKey(b, sig_key)
        signatures.append(tflite.SignatureDefEnd(b))
    code_vec = _offsets(b, tflite.ModelStartOperatorCodesVector, codes)
    graph_vec = _offsets(b, tflite.ModelStartSubgraphsVector, subgraphs)
    buffer_vec = _offsets(b, tflite.ModelStartBuffersVector, buffer_tables)
    meta_vec = _offsets(b, tflite.ModelStartMetadataVector, metas)
    sig_vec = _offsets(b, tflite.ModelStartSignatureDefsVector, signatures)
    text = b.CreateString(description)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, code_vec)
    tflite.ModelAddSubgraphs(b, graph_vec)
    tflite.ModelAddDescription(b, text)
    tflite.ModelAddBuffers(b, buffer_vec)
    tflite.ModelAddMetadata(b, meta_vec)
    tflite.ModelAddSignatureDefs(b, sig_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def oracle(path: Path) -> dict[str, np.ndarray]:
    """Every constant tensor of subgraph 0 as the tflite package reads it."""
    raw = path.read_bytes()
    model = tflite.Model.GetRootAs(raw, 0)
    graph = model.Subgraphs(0)
    found = {}
    for index in range(graph.TensorsLength()):
        tensor = graph.Tensors(index)
        buffer = model.Buffers(tensor.Buffer())
        if buffer.DataLength():
            data = buffer.DataAsNumpy().tobytes()
        elif buffer.Offset() > 1:
            data = raw[buffer.Offset() : buffer.Offset() + buffer.Size()]
        else:
            continue
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        dtype = NUMPY[tensor.Type()]
        found[tensor.Name().decode()] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return found


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv/kernel": rng.standard_normal((4, 3, 3, 2)).astype(np.float32),
        "conv/bias": rng.standard_normal(4).astype(np.float32),
        "dense/kernel_q": rng.integers(-128, 127, (8, 16), dtype=np.int8),
        "dense/half": rng.standard_normal((3, 5)).astype(np.float16),
        "dense/bias_i32": rng.integers(-1000, 1000, 8, dtype=np.int32),
        "ids": np.arange(6, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "double": rng.standard_normal(3),
        "bf16": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
        "scale_0d": np.array(0.5, dtype=np.float32),
    }


CODES = {
    np.dtype(np.float32): FLOAT32, np.dtype(np.float16): FLOAT16, np.dtype(np.int32): INT32,
    np.dtype(np.int8): INT8, np.dtype(np.int64): INT64, np.dtype(np.bool_): BOOL,
    np.dtype(np.float64): FLOAT64, np.dtype(ml_dtypes.bfloat16): BFLOAT16,
}  # fmt: skip


def small_model(path: Path) -> dict[str, np.ndarray]:
    arrays = weights()
    specs = [Spec("input", FLOAT32, [1, 8, 8, 3])]
    for index, (name, array) in enumerate(arrays.items()):
        quant = ([0.02], [0], 0) if name == "dense/kernel_q" else None
        specs.append(Spec(name, CODES[array.dtype], list(array.shape), index + 1, quant))
    specs.append(Spec("output", FLOAT32, [1, 4]))
    graph = Graph(specs, [0], [len(specs) - 1], [(0, [0, 1, 2], [len(specs) - 1])], "main")
    buffers = [a.tobytes() for a in arrays.values()] + [b"1.14.0\x00"]
    metadata = {"min_runtime_version": len(arrays) + 1}
    path.write_bytes(build([graph], buffers, opcodes=[3, 9], metadata=metadata))
    return arrays


def test_tensors_match_the_tflite_reader(tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    arrays = small_model(path)
    expected = oracle(path)
    assert set(expected) == set(arrays)
    raw = path.read_bytes()
    with modelport.open(path) as model:
        assert model.format.value == "tflite"
        assert list(model.tensors) == list(arrays)  # activations (no buffer) are not listed
        for name, array in expected.items():
            ref = model.tensors[name]
            assert ref.shape == array.shape, name
            assert ref.numpy().dtype == array.dtype, name
            assert digest(ref.numpy()) == digest(array) == digest(arrays[name]), name
            offset, length = ref.byte_range() or (0, -1)
            assert raw[offset : offset + length] == array.tobytes(), name  # zero-copy range
        assert model.tensors["ids"].dtype == "int64"
        assert model.tensors["bf16"].dtype == "bfloat16"
        assert model.tensors["scale_0d"].shape == ()
        assert model.tensors["dense/kernel_q"].note == "quantized: scale=0.02, zero_point=0"
        loaded = modelport.load(path)
        assert loaded["conv/kernel"].numpy().tobytes() == arrays["conv/kernel"].tobytes()


def test_inspect_json(tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    arrays = small_model(path)
    report = modelport.inspect(path).to_json()
    assert report["format"] == "tflite"
    assert report["parameters"] == sum(a.size for a in arrays.values())
    assert report["tensors"][0] == {
        "name": "conv/kernel",
        "dtype": "float32",
        "shape": [4, 3, 3, 2],
        "nbytes": arrays["conv/kernel"].nbytes,
    }
    assert report["metadata"] == {"min_runtime_version": "1.14.0"}
    details = report["details"]
    assert details["version"] == 3
    assert details["description"] == "built by modelport tests"
    assert details["operator_codes"] == ["CONV_2D/v3", "FULLY_CONNECTED"]
    assert details["op_counts"] == {"CONV_2D": 1}
    assert details["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 8, 8, 3]}]
    assert details["outputs"] == [{"name": "output", "dtype": "float32", "shape": [1, 4]}]
    assert details["subgraph_count"] == 1


def test_shared_buffers_subgraphs_signatures_and_custom_ops(tmp_path: Path) -> None:
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    main = Graph(
        [
            Spec("x", FLOAT32, [3]),
            Spec("w", FLOAT32, [3, 4], 1),
            Spec("w_tied", FLOAT32, [3, 4], 1),
        ],
        [0],
        [0],
        [(0, [0, 1], [0]), (1, [0], [0])],
    )
    body = Graph([Spec("w", FLOAT32, [12], 1), Spec("", INT32, [2], 2)], name="while_body")
    path = tmp_path / "m.tflite"
    path.write_bytes(
        build(
            [main, body],
            [w.tobytes(), np.array([1, 2], np.int32).tobytes()],
            opcodes=[9, "MyCustomOp"],
            signature=("serving_default", {"x": 0}, {"y": 0}),
        )
    )
    with modelport.open(path) as model:
        assert list(model.tensors) == ["w", "w_tied", "while_body/w", "while_body/tensor_1"]
        assert model.tensors["while_body/w"].shape == (12,)
        assert digest(model.tensors["while_body/tensor_1"].numpy()) == digest(
            np.array([1, 2], np.int32)
        )
        details = model.details
        assert details["operator_codes"] == ["FULLY_CONNECTED", "CUSTOM:MyCustomOp"]
        assert details["op_counts"] == {"FULLY_CONNECTED": 1, "CUSTOM:MyCustomOp": 1}
        assert details["signatures"] == [
            {"key": "serving_default", "subgraph": 0, "inputs": {"x": 0}, "outputs": {"y": 0}}
        ]
        assert [s["name"] for s in details["subgraphs"]] == ["", "while_body"]
    report = modelport.inspect(path)
    assert ("w", "w_tied", "while_body/w") in report.aliases


def test_buffers_past_the_flatbuffer_use_offset_and_size(tmp_path: Path) -> None:
    """Models over 2 GiB keep buffers after the flatbuffer (Buffer.offset/size)."""
    big = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)
    small = np.arange(5, dtype=np.int16)
    graph = Graph([Spec("big", FLOAT32, [16, 16], 1), Spec("small", INT16, [5], 2)])
    probe = build([graph], [(1 << 40, big.nbytes), (1 << 40, small.nbytes)])
    base = (len(probe) + 15) // 16 * 16
    offsets = [(base, big.nbytes), (base + big.nbytes, small.nbytes)]
    head = build([graph], offsets)  # type: ignore[arg-type]
    assert len(head) == len(probe)
    path = tmp_path / "large.tflite"
    path.write_bytes(head.ljust(base, b"\0") + big.tobytes() + small.tobytes())
    expected = oracle(path)
    with modelport.open(path) as model:
        assert model.tensors["big"].byte_range() == (base, big.nbytes)
        assert digest(model.tensors["big"].numpy()) == digest(expected["big"]) == digest(big)
        assert digest(model.tensors["small"].numpy()) == digest(small)
    path.write_bytes(head.ljust(base, b"\0") + big.tobytes())  # the tail went missing
    with pytest.raises(modelport.errors.TruncatedFileError, match="buffer 2"):
        modelport.open(path)


def test_strings_int4_and_sparse_tensors_are_reported_not_listed(tmp_path: Path) -> None:
    graph = Graph(
        [
            Spec("vocab", STRING, [2], 1),
            Spec("packed", INT4, [4], 2),
            Spec("sparse", FLOAT32, [4], 3, sparse=True),
            Spec("dense", FLOAT32, [1], 4),
        ]
    )
    path = tmp_path / "m.tflite"
    buffers = [b"\x02\x00\x00\x00abc", b"\x12\x34", np.ones(2, np.float32).tobytes()]
    path.write_bytes(build([graph], [*buffers, np.ones(1, np.float32).tobytes()]))
    with modelport.open(path) as model:
        assert list(model.tensors) == ["dense"]
        assert model.details["skipped_tensors"] == {
            "vocab": "string",
            "packed": "int4",
            "sparse": "sparse (unreadable parameters)",
        }
        assert any("int4" in w for w in model.warnings)
    report = modelport.convert(path, tmp_path / "m.safetensors")
    assert [t[0] for t in report.tensors] == ["dense"]
    assert (
        "not in the output: 3 tensors of the file that modelport does not read "
        "(1 string, 1 int4, 1 sparse); inspect lists them under details"
    ) in report.notes


def test_renamed_file_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    small_model(path)
    with modelport.open(path) as model:
        assert model.format.value == "tflite"
        assert any(".onnx" in w and "tflite" in w for w in model.warnings)


def test_other_bytes_do_not_sniff_as_tflite(tmp_path: Path) -> None:
    from modelport.formats.protocol import Probe

    for content in (b"\x10\x00\x00\x00TFL2" + bytes(16), b"TFL3" + bytes(16), b"\xff" * 20):
        path = tmp_path / "x.tflite"
        path.write_bytes(content)
        assert not reader.sniff(Probe.of(path))
    path.write_bytes(b"\xff\xff\xff\x7fTFL3" + bytes(8))  # root offset past the end
    assert reader.sniff(Probe.of(path))  # a truncated TFLite file, said so when read
    with pytest.raises(modelport.errors.TruncatedFileError):
        modelport.open(path)


def _valid() -> bytes:
    graph = Graph(
        [Spec("w", FLOAT32, [2, 3], 1), Spec("b", INT8, [3], 2, ([0.5], [1], 0))], [0], [1]
    )
    return build(
        [graph],
        [np.ones((2, 3), np.float32).tobytes(), b"\x01\x02\x03"],
        opcodes=[9],
        metadata={"note": 2},
    )


def test_malformed_files_raise_modelport_errors(tmp_path: Path) -> None:
    good = _valid()
    path = tmp_path / "bad.tflite"
    cases: list[bytes] = [good[:cut] for cut in (8, 12, 16, 40, len(good) // 2, len(good) - 4)]
    root = struct.unpack_from("<I", good)[0]
    cases.append(struct.pack("<I", len(good) - 6) + good[4:])  # root near the end
    cases.append(good[:root] + struct.pack("<i", -(1 << 30)) + good[root + 4 :])  # vtable away
    data_at = good.find(np.ones((2, 3), np.float32).tobytes())
    lying = good[: data_at - 4] + struct.pack("<I", 1 << 30) + good[data_at:]  # vector length
    cases.append(lying)
    short = good[: data_at - 4] + struct.pack("<I", 20) + good[data_at:]  # 20 != 2*3*4 bytes
    cases.append(short)
    for content in cases:
        path.write_bytes(content)
        with pytest.raises(ModelportError), modelport.open(path) as model:
            for ref in model.tensors.values():
                ref.numpy()


def test_bad_buffer_and_tensor_indices(tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(build([Graph([Spec("w", FLOAT32, [1], 7)])], [b"\0\0\0\0"]))
    with pytest.raises(modelport.errors.CorruptFileError, match="buffer 7"):
        modelport.open(path)
    path.write_bytes(build([Graph([Spec("w", FLOAT32, [-1], 1)])], [b"\0\0\0\0"]))
    with pytest.raises(modelport.errors.CorruptFileError, match="negative"):
        modelport.open(path)
    path.write_bytes(build([Graph([Spec("x", FLOAT32, [1])], inputs=[5])], []))
    with pytest.raises(modelport.errors.CorruptFileError, match="tensor 5"):
        modelport.open(path)
    graph = Graph([Spec("x", FLOAT32, [1])], ops=[(4, [0], [0])])
    path.write_bytes(build([graph], [], opcodes=[0]))
    with pytest.raises(modelport.errors.CorruptFileError, match="opcode 4"):
        modelport.open(path)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(damage(data, _valid()))
    assert_typed_error_or_whole(path, inspect=True, intact=_valid())


CSR = Sparse([0, 1], [], [(4,), (4, [0, 2, 3, 3, 5], [0, 3, 2, 0, 1])])
CSR_DENSE = [[1, 0, 0, 2], [0, 0, 3, 0], [0, 0, 0, 0], [4, 5, 0, 0]]
BLOCKS = Sparse([0, 1, 2, 3], [0, 1], [(2,), (2, [0, 1, 2], [0, 1]), (2,), (2,)])
BLOCKS_DENSE = [[1, 2, 0, 0], [3, 4, 0, 0], [0, 0, 5, 6], [0, 0, 7, 8]]


@pytest.mark.parametrize(
    ("layout", "values", "dense"),
    [(CSR, [1, 2, 3, 4, 5], CSR_DENSE), (BLOCKS, [1, 2, 3, 4, 5, 6, 7, 8], BLOCKS_DENSE)],
    ids=["csr", "2x2-blocks"],
)
def test_sparse_constants_read_dense(
    tmp_path: Path, layout: Sparse, values: list[int], dense: list[list[int]]
) -> None:
    """The schema's own encodings (a CSR matrix; 2x2 blocks, CSR over block columns), the
    dense matrix they stand for the oracle; converted whole, bit for bit."""
    graph = Graph([Spec("w", FLOAT32, [4, 4], 1, sparse=layout)])
    path = tmp_path / "sparse.tflite"
    path.write_bytes(build([graph], [np.array(values, np.float32).tobytes()]))
    expected = np.array(dense, np.float32)
    with modelport.open(path) as model:
        assert np.array_equal(model.tensors["w"].numpy(), expected)
    modelport.convert(path, tmp_path / "dense.safetensors")
    with safe_open(str(tmp_path / "dense.safetensors"), "np") as written:
        assert np.array_equal(written.get_tensor("w"), expected)
