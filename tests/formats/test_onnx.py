"""ONNX models, with ``onnx.load`` + ``onnx.numpy_helper.to_array`` as the oracle.

Models come from ``torch.onnx.export`` (the dynamo exporter: inline and external data),
``onnx.save_model(..., save_as_external_data=True)``, and ``onnx.helper`` for what exporters
rarely write: Constant nodes, If subgraphs, every dtype, typed fields instead of raw_data.
"""

from __future__ import annotations

import pickle
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save as safetensors_save

import modelport
from modelport import limits
from modelport.errors import ModelportError
from modelport.formats import onnx as onnx_reader
from modelport.formats.protocol import Probe
from modelport.formats.registry import detect
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole, damage

# -- the oracle ------------------------------------------------------------------------------


def _graph_tensors(graph: onnx.GraphProto, base: str, found: dict[str, np.ndarray]) -> None:
    for init in graph.initializer:
        found[init.name] = numpy_helper.to_array(init, base)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _graph_tensors(attr.g, base, found)
            for sub in attr.graphs:
                _graph_tensors(sub, base, found)
            if node.op_type != "Constant":
                continue
            value = helper.get_attribute_value(attr)
            if attr.name == "value":
                found[node.output[0]] = numpy_helper.to_array(value, base)
            elif attr.name in ("value_float", "value_floats"):
                found[node.output[0]] = np.array(value, dtype=np.float32)
            elif attr.name in ("value_int", "value_ints"):
                found[node.output[0]] = np.array(value, dtype=np.int64)


def oracle(path: Path) -> dict[str, np.ndarray]:
    """Every initializer and Constant value, subgraphs included, as onnx reads them."""
    model = onnx.load(str(path), load_external_data=False)
    found: dict[str, np.ndarray] = {}
    _graph_tensors(model.graph, str(path.parent), found)
    return found


def assert_matches_oracle(path: Path) -> dict[str, np.ndarray]:
    expected = oracle(path)
    with modelport.open(path) as model:
        assert model.format.value == "onnx"
        assert set(model.tensors) == set(expected)
        for name, array in expected.items():
            ref = model.tensors[name]
            assert ref.shape == array.shape, name
            assert ref.numpy().dtype == array.dtype, name
            assert digest(ref.numpy()) == digest(array), name
    return expected


def op_counts(graph: onnx.GraphProto) -> Counter[str]:
    counts: Counter[str] = Counter()
    for node in graph.node:
        counts[node.op_type] += 1
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                counts.update(op_counts(sub))
    return counts


# -- exported models -------------------------------------------------------------------------


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An MLP exported with external data (the default) and a conv net with data inline."""
    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    paths = {"mlp": folder / "mlp.onnx", "conv": folder / "conv.onnx"}
    torch.onnx.export(MLP().eval(), (torch.randn(2, 8),), paths["mlp"], dynamo=True)
    torch.onnx.export(
        ConvNet().eval(),
        (torch.randn(1, 3, 8, 8),),
        paths["conv"],
        dynamo=True,
        external_data=False,
    )
    return paths


def test_dynamo_exports_match_onnx(exported: dict[str, Path]) -> None:
    for path in exported.values():
        assert_matches_oracle(path)
    mlp = exported["mlp"]
    assert (mlp.parent / "mlp.onnx.data").exists()  # the exporter put data outside
    with modelport.open(mlp) as model:
        assert set(MLP().state_dict()) <= set(model.tensors)  # parameter names survive
        places = {ref.storage.path for ref in model.tensors.values() if ref.storage}
        assert places == {mlp, mlp.parent / "mlp.onnx.data"}  # inline and external tensors
        assert model.details["external_data"] == ["mlp.onnx.data"]
    conv_raw = exported["conv"].read_bytes()
    with modelport.open(exported["conv"]) as model:
        for name, ref in model.tensors.items():
            span = ref.byte_range()  # raw_data is a zero-copy byte range of the .onnx file
            assert span is not None, name
            assert conv_raw[span[0] : span[0] + span[1]] == ref.numpy().tobytes(), name


def test_inspect_json_and_details(exported: dict[str, Path]) -> None:
    path = exported["conv"]
    proto = onnx.load(str(path))
    expected = oracle(path)
    report = modelport.inspect(path).to_json()
    assert report["format"] == "onnx"
    assert report["parameters"] == sum(a.size for a in expected.values())
    assert {t["name"]: (t["dtype"], t["shape"], t["nbytes"]) for t in report["tensors"]} == {
        name: (modelport.dtypes.from_numpy(a.dtype), list(a.shape), a.nbytes)
        for name, a in expected.items()
    }
    details = report["details"]
    assert details["ir_version"] == proto.ir_version
    assert details["opset"] == {(o.domain or "ai.onnx"): o.version for o in proto.opset_import}
    assert details["producer"] == proto.producer_name == "pytorch"
    assert details["graph_name"] == proto.graph.name
    assert details["op_counts"] == dict(op_counts(proto.graph))
    assert details["node_count"] == len(proto.graph.node)
    assert details["inputs"] == [
        {
            "name": proto.graph.input[0].name,
            "type": "tensor",
            "dtype": "float32",
            "shape": [1, 3, 8, 8],
        }
    ]
    assert details["outputs"][0]["shape"] == [1, 5]
    assert report["warnings"] == []


def test_save_as_external_data_in_one_file(exported: dict[str, Path], tmp_path: Path) -> None:
    model = onnx.load(str(exported["conv"]))
    path = tmp_path / "external.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert_matches_oracle(path)
    with modelport.open(path) as opened:
        assert {ref.storage.path for ref in opened.tensors.values() if ref.storage} == {
            tmp_path / "weights.bin"
        }
        assert opened.details["external_data"] == ["weights.bin"]
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(modelport.errors.ModelFileNotFoundError, match=r"weights\.bin"):
        modelport.open(path)


def test_external_data_in_a_file_per_tensor(exported: dict[str, Path], tmp_path: Path) -> None:
    model = onnx.load(str(exported["mlp"]))
    path = tmp_path / "sub" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(path.parent.iterdir())) > 2
    assert_matches_oracle(path)


# -- models built with onnx.helper -----------------------------------------------------------


def dtype_zoo() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((2, 3)).astype(np.float16),
        "bf16": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal(3),
        "i64": rng.integers(-(1 << 40), 1 << 40, 4),
        "i32": rng.integers(-1000, 1000, 4).astype(np.int32),
        "i16": np.array([-3, 2, 30000], dtype=np.int16),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
        "u8": np.array([0, 200, 255], dtype=np.uint8),
        "u16": np.array([0, 65535], dtype=np.uint16),
        "u32": np.array([0, 4_000_000_000], dtype=np.uint32),
        "u64": np.array([0, (1 << 64) - 1], dtype=np.uint64),
        "bool": np.array([True, False, True]),
        "c64": np.array([1 + 2j, -3.5j], dtype=np.complex64),
        "f8": np.array([0.5, -2, 448], dtype=ml_dtypes.float8_e4m3fn),
        "scalar": np.array(7.25, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def _typed(name: str, array: np.ndarray) -> TensorProto:
    """A tensor with its values in the typed field (float_data, int32_data...), not raw_data."""
    code = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor = TensorProto(name=name, data_type=code, dims=array.shape)
    flat = array.reshape(-1)
    if array.dtype in (np.float32, np.complex64):
        tensor.float_data.extend(flat.view(np.float32).tolist())
    elif array.dtype == np.float64:
        tensor.double_data.extend(flat.tolist())
    elif array.dtype == np.int64:
        tensor.int64_data.extend(flat.tolist())
    elif array.dtype in (np.uint32, np.uint64):
        tensor.uint64_data.extend(flat.tolist())
    elif array.dtype.kind == "V" or array.dtype == np.float16:  # bit patterns
        tensor.int32_data.extend(flat.view(f"u{array.dtype.itemsize}").tolist())
    else:
        tensor.int32_data.extend(flat.astype(np.int32).tolist())
    return tensor


def zoo_model(path: Path) -> dict[str, np.ndarray]:
    """Initializers raw and typed, Constant nodes of every kind, If branches with constants."""
    zoo = dtype_zoo()
    inits = [numpy_helper.from_array(a, f"raw_{k}") for k, a in zoo.items()]
    inits += [_typed(f"typed_{k}", a) for k, a in zoo.items()]
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["then_c"], value=numpy_helper.from_array(zoo["f16"]))],
        "then",
        [],
        [helper.make_tensor_value_info("then_c", TensorProto.FLOAT16, [2, 3])],
    )

    def inner(tag: str, values: list[int]) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"deep_{tag}"], value_ints=values)],
            f"inner_{tag}",
            [],
            [helper.make_tensor_value_info(f"deep_{tag}", TensorProto.INT64, [3])],
            initializer=[numpy_helper.from_array(np.arange(3, dtype=np.int8), f"init_{tag}")],
        )

    nested_if = helper.make_node(
        "If", ["cond"], ["deep"], then_branch=inner("a", [4, 5, 6]), else_branch=inner("b", [7])
    )
    else_branch = helper.make_graph(
        [nested_if], "else", [], [helper.make_tensor_value_info("deep", TensorProto.INT64, [3])]
    )
    nodes = [
        helper.make_node("Constant", [], ["c_tensor"], value=numpy_helper.from_array(zoo["i64"])),
        helper.make_node("Constant", [], ["c_float"], value_float=1.5),
        helper.make_node("Constant", [], ["c_floats"], value_floats=[1.0, 2.0, -3.0]),
        helper.make_node("Constant", [], ["c_int"], value_int=-7),
        helper.make_node("Constant", [], ["c_ints"], value_ints=[1, -2, 1 << 40]),
        helper.make_node("Constant", [], ["c_str"], value_string="hello"),
        helper.make_node("If", ["cond"], ["out"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes,
        "zoo",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["batch", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, producer_name="modelport-tests", model_version=3)
    model.doc_string = "a zoo of tensors"
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    onnx.save_model(model, str(path))
    return zoo


def test_every_dtype_raw_and_typed_constants_and_subgraphs(tmp_path: Path) -> None:
    path = tmp_path / "zoo.onnx"
    zoo = zoo_model(path)
    expected = assert_matches_oracle(path)
    for key, array in zoo.items():
        for prefix in ("raw_", "typed_"):
            assert digest(expected[prefix + key]) == digest(array)
    with modelport.open(path) as model:
        tensors = model.tensors
        assert tensors["raw_bf16"].dtype == "bfloat16"
        assert tensors["raw_f8"].dtype == "float8_e4m3fn"
        assert tensors["raw_scalar"].shape == ()
        assert tensors["typed_empty"].shape == (0, 3)
        assert tensors["c_float"].shape == () and float(tensors["c_float"].numpy()) == 1.5
        assert tensors["c_int"].numpy().tolist() == -7
        assert tensors["deep_a"].numpy().tolist() == [4, 5, 6]
        assert tensors["deep_b"].numpy().tolist() == [7]
        assert tensors["init_b"].dtype == "int8"
        assert tensors["then_c"].dtype == "float16"
        assert tensors["typed_f32"].byte_range() is not None  # one packed run: in place
        assert tensors["typed_f16"].byte_range() is None  # int32_data: decoded on read
        assert model.metadata == {"author": "tests", "license": "MIT"}
        details = model.details
        assert details["string_tensors"] == {"c_str": []}
        assert details["op_counts"] == {"Constant": 9, "If": 2}
        assert details["op_counts"] == dict(op_counts(onnx.load(str(path)).graph))
        assert details["node_count"] == 11
        assert model.warnings == []
        assert details["subgraphs"] == 4
        assert details["model_version"] == 3
        assert details["doc_string"] == "a zoo of tensors"
        assert details["outputs"] == [
            {"name": "out", "type": "tensor", "dtype": "float16", "shape": ["batch", 3]}
        ]
        loaded = modelport.load(path)
        assert loaded["raw_bf16"].dtype == torch.bfloat16


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    """One protobuf field: tag, then the payload (length-prefixed for wire type 2)."""
    tag = _varint(number << 3 | wire)
    return tag + (_varint(len(payload)) + payload if wire == 2 else payload)


def hand_made_model(tensors: list[bytes]) -> bytes:
    """ModelProto bytes with these serialized TensorProtos as initializers."""
    graph = b"".join(_field(5, 2, t) for t in tensors) + _field(2, 2, b"g")
    opset = _field(2, 0, _varint(17))
    return _field(1, 0, _varint(8)) + _field(7, 2, graph) + _field(8, 2, opset)


def test_unpacked_and_split_typed_fields(tmp_path: Path) -> None:
    """Repeated scalars written one field per element, or packed in several runs."""
    floats = [1.5, -2.0, 3.25]
    unpacked_floats = b"".join(_field(4, 5, struct.pack("<f", v)) for v in floats)
    split_ints = _field(7, 2, _varint(5) + _varint(-6)) + _field(7, 2, _varint(7))
    unpacked_f16 = b"".join(
        _field(5, 0, _varint(int(v))) for v in np.array([1, -2], np.float16).view(np.uint16)
    )
    tensors = [
        _field(1, 0, _varint(3)) + _field(2, 0, _varint(1)) + unpacked_floats + _field(8, 2, b"uf"),
        _field(1, 2, _varint(3)) + _field(2, 0, _varint(7)) + split_ints + _field(8, 2, b"si"),
        _field(1, 0, _varint(2)) + _field(2, 0, _varint(10)) + unpacked_f16 + _field(8, 2, b"h"),
    ]
    path = tmp_path / "hand.onnx"
    path.write_bytes(hand_made_model(tensors))
    expected = assert_matches_oracle(path)
    assert expected["uf"].tolist() == floats
    assert expected["si"].tolist() == [5, -6, 7]


def test_duplicate_names_list_the_initializer(tmp_path: Path) -> None:
    first = numpy_helper.from_array(np.ones(2, np.float32), "w")
    second = helper.make_node("Constant", [], ["w"], value_floats=[5.0])
    graph = helper.make_graph([second], "g", [], [], initializer=[first])
    path = tmp_path / "dup.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    with modelport.open(path) as model:
        assert model.tensors["w"].numpy().tolist() == [1.0, 1.0]
        assert model.warnings == ["constant 'w' has an initializer's name; listed the initializer"]


def test_local_functions_are_listed_apart(tmp_path: Path) -> None:
    one = numpy_helper.from_array(np.array(1.0, np.float32))
    body = [
        helper.make_node("Constant", [], ["one"], value=one),
        helper.make_node("Add", ["x", "one"], ["y"]),
    ]
    function = helper.make_function(
        "custom.ns", "AddOne", ["x"], ["y"], body, [helper.make_opsetid("", 18)]
    )
    graph = helper.make_graph(
        [helper.make_node("AddOne", ["a"], ["b"], domain="custom.ns")],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("custom.ns", 1)]
    model = helper.make_model(graph, functions=[function], opset_imports=opsets)
    onnx.checker.check_model(model)
    path = tmp_path / "functions.onnx"
    onnx.save_model(model, str(path))
    with modelport.open(path) as opened:
        assert list(opened.tensors) == ["custom.ns.AddOne/one"]
        assert opened.tensors["custom.ns.AddOne/one"].numpy().tolist() == 1.0
        assert opened.details["functions"] == ["custom.ns.AddOne"]
        assert opened.details["op_counts"] == {"custom.ns.AddOne": 1}  # bodies not counted
        assert opened.details["opset"] == {"ai.onnx": 18, "custom.ns": 1}


def test_sparse_initializers_and_unsupported_types(tmp_path: Path) -> None:
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([1, 5], np.int64), "sp_idx")
    sparse = helper.make_sparse_tensor(values, indices, [8])
    int4 = helper.make_tensor("packed4", TensorProto.INT4, [4], [1, -2, 3, -4])
    graph = helper.make_graph([], "g", [], [], initializer=[int4], sparse_initializer=[sparse])
    path = tmp_path / "sparse.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    with modelport.open(path) as model:
        assert list(model.tensors) == ["sp.values", "sp.indices"]
        assert digest(model.tensors["sp.indices"].numpy()) == digest(np.array([1, 5]))
        assert model.details["sparse_tensors"] == {"sp": [8]}
        assert model.details["unsupported_tensors"] == {"packed4": "int4"}
        assert any("packed4" in w and "int4" in w for w in model.warnings)


# -- safety ----------------------------------------------------------------------------------


def _external_model(path: Path, location: str, **entries: str) -> None:
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        tensor.external_data.add(key=key, value=value)
    onnx.save_model(helper.make_model(helper.make_graph([], "g", [], [], [tensor])), str(path))


@pytest.mark.parametrize(
    "location",
    ["../../etc/passwd", "/etc/passwd", "data/../../secret.bin", "..\\..\\secret", "C:\\x.bin"],
)
def test_external_locations_outside_the_folder_are_refused(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(bytes(16))
    path = folder / "m.onnx"
    _external_model(path, location)
    with pytest.raises(modelport.errors.CorruptFileError, match="outside the model's folder"):
        modelport.open(path)


@pytest.mark.parametrize("link", ["w.bin", "sub"])
def test_external_data_through_a_symbolic_link_is_refused(tmp_path: Path, link: str) -> None:
    """A link named like a data file (or a linked folder) would read any file of the
    machine into the weights; onnx.load refuses such links, and so does modelport."""
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRETSECRETSECR")
    if link == "sub":
        (folder / "sub").symlink_to(tmp_path, target_is_directory=True)
        location = "sub/secret.bin"
    else:
        (folder / "w.bin").symlink_to(secret)
        location = "w.bin"
    _external_model(folder / "m.onnx", location)
    with pytest.raises(modelport.errors.CorruptFileError, match="symbolic link"):
        modelport.open(folder / "m.onnx")
    assert modelport.scan(folder / "m.onnx").verdict == "unsafe"


def test_external_sizes_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    (tmp_path / "w.bin").write_bytes(bytes(24))
    _external_model(path, "w.bin", offset="8")
    with modelport.open(path) as model:
        assert model.tensors["w"].byte_range() == (8, 16)
    _external_model(path, "w.bin", offset="8", length="12")
    with pytest.raises(modelport.errors.CorruptFileError, match="needs 16"):
        modelport.open(path)
    _external_model(path, "w.bin", offset="16")
    with pytest.raises(modelport.errors.TruncatedFileError):
        modelport.open(path)
    _external_model(path, "w.bin", offset="eight")
    with pytest.raises(modelport.errors.CorruptFileError, match="not integers"):
        modelport.open(path)
    _external_model(path, "missing.bin")
    with pytest.raises(modelport.errors.ModelFileNotFoundError, match=r"missing\.bin"):
        modelport.open(path)


def _not_onnx(tmp_path: Path) -> dict[str, bytes]:
    tensor = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "t")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [], [])
    rng = np.random.default_rng(5)
    found = {
        "tensor_proto": tensor.SerializeToString(),
        "scalar_tensor": numpy_helper.from_array(np.array(1.0, np.float32)).SerializeToString(),
        "graph_proto": graph.SerializeToString(),
        "node_proto": helper.make_node("Relu", ["x"], ["y"]).SerializeToString(),
        "model_without_graph": onnx.ModelProto(ir_version=8).SerializeToString() + b"\x12\x01a",
        "pickle": pickle.dumps({"w": [1.0, 2.0]}),
        "safetensors": safetensors_save({"w": np.ones(3, np.float32)}),
        "text": b"\x08hello world, not a model at all",
    }
    for index in range(20):
        found[f"random_{index}"] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
        found[f"random_tagged_{index}"] = b"\x08\x08" + found[f"random_{index}"]
    return found


def test_other_protobufs_and_random_bytes_are_not_onnx(tmp_path: Path) -> None:
    for name, content in _not_onnx(tmp_path).items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(content)
        assert not onnx_reader.sniff(Probe.of(path)), name
        try:
            reader, _, _ = detect(path)
        except ModelportError:
            continue
        assert reader.format.value != "onnx", name


def test_renamed_file_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    zoo_model(path)
    with modelport.open(path) as model:
        assert model.format.value == "onnx"
        assert any(".safetensors" in w and "onnx" in w for w in model.warnings)


def _small_valid(tmp_path: Path) -> bytes:
    path = tmp_path / "small.onnx"
    inner = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0])], "in", [], []
    )
    graph = helper.make_graph(
        [
            helper.make_node("If", ["c"], ["o"], then_branch=inner, else_branch=inner),
            helper.make_node("Constant", [], ["v"], value=_typed("v", np.ones(3, np.int64))),
        ],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])],
        initializer=[
            numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w"),
            _typed("h", np.ones(2, np.float16)),
        ],
    )
    onnx.save_model(helper.make_model(graph), str(path))
    return path.read_bytes()


def test_malformed_files_raise_modelport_errors(tmp_path: Path) -> None:
    good = _small_valid(tmp_path)
    path = tmp_path / "bad.onnx"
    cases = [good[:cut] for cut in (1, 3, 10, 30, len(good) // 2, len(good) - 1)]
    raw_at = good.find(np.arange(6, dtype=np.float32).tobytes())
    cases.append(good[: raw_at - 1] + b"\x7f" + good[raw_at:])  # raw_data length lies
    cases.append(good + b"\x0f\xff")  # invalid wire type after the model
    for content in cases:
        path.write_bytes(content)
        with pytest.raises(ModelportError), modelport.open(path) as model:
            for ref in model.tensors.values():
                ref.numpy()
    bad = TensorProto(name="x", data_type=TensorProto.FLOAT, dims=[4])
    bad.float_data.extend([1.0, 2.0, 3.0])  # 3 values for 4 elements
    negative = TensorProto(name="n", data_type=TensorProto.FLOAT, dims=[-1], raw_data=b"")
    undefined = TensorProto(name="u", dims=[1], raw_data=b"\0\0\0\0")
    wrong_field = TensorProto(name="w", data_type=TensorProto.INT64, dims=[2])
    wrong_field.float_data.extend([1.0, 2.0])
    for tensor, message in (
        (bad, "needs 4 values"),
        (negative, "negative"),
        (undefined, "UNDEFINED"),
        (wrong_field, "field 4"),
    ):
        path.write_bytes(hand_made_model([tensor.SerializeToString()]))
        with pytest.raises(modelport.errors.CorruptFileError, match=message):
            modelport.open(path)


def test_deep_subgraph_nesting_is_bounded(tmp_path: Path) -> None:
    """Loop bodies inside each other past the depth limit (protobuf's own parsers stop near
    100 messages deep, so the bytes are written by hand)."""
    graph = _field(2, 2, b"leaf")
    for _ in range(limits.MAX_DEPTH + 5):
        attribute = _field(1, 2, b"body") + _field(6, 2, graph) + _field(20, 0, _varint(5))
        graph = _field(1, 2, _field(4, 2, b"Loop") + _field(5, 2, attribute))
    path = tmp_path / "deep.onnx"
    path.write_bytes(_field(1, 0, _varint(8)) + _field(7, 2, graph))
    with pytest.raises(modelport.errors.LimitExceededError, match="nesting depth"):
        modelport.open(path)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(damage(data, _valid_bytes(tmp_path)))
    assert_typed_error_or_whole(path, inspect=True, intact=_valid_bytes(tmp_path))


_VALID: dict[str, Any] = {}


def _valid_bytes(tmp_path: Path) -> bytes:
    if "bytes" not in _VALID:
        _VALID["bytes"] = _small_valid(tmp_path)
    data: bytes = _VALID["bytes"]
    return data
