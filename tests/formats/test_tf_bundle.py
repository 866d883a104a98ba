"""TensorFlow checkpoints (tensor bundles) and SavedModel folders, read without TensorFlow.

Default tests build bundles in ``tmp_path`` by the documented layout: protobuf messages
encoded by the ``protobuf`` library from descriptors declared here with TensorFlow's field
numbers (tensor_bundle.proto, tensor_shape.proto, saved_model.proto, Keras 2's
saved_metadata.proto), inside a LevelDB table written by this file's own small writer
(leveldb ``table_format.md``), its checksums from a bitwise crc32c checked against the
standard check value. numpy gives the expected tensor bytes.

Tests marked ``heavy`` save real checkpoints and SavedModels with TensorFlow
(``tf.train.Checkpoint``, ``tf.saved_model.save``, a TF1 ``Saver`` with a partitioned
variable, Keras 3's ``model.export``) and compare every tensor with
``tf.train.load_checkpoint(...).get_tensor``.
"""

from __future__ import annotations

import base64
import json
import marshal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import ml_dtypes
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from modelport.formats import _sstable, tf_bundle
from tests.conftest import Cli, attack_pickles, digest
from tests.mutation import assert_typed_error_or_whole, damage

MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)
DTYPE_CODES = {
    np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3,
    np.dtype(np.uint8): 4, np.dtype(np.int16): 5, np.dtype(np.int8): 6,
    np.dtype(np.complex64): 8, np.dtype(np.int64): 9, np.dtype(np.bool_): 10,
    np.dtype(ml_dtypes.bfloat16): 14, np.dtype(np.uint16): 17, np.dtype(np.complex128): 18,
    np.dtype(np.float16): 19, np.dtype(np.uint32): 22, np.dtype(np.uint64): 23,
    np.dtype(ml_dtypes.float8_e5m2): 24, np.dtype(ml_dtypes.float8_e4m3fn): 25,
}  # fmt: skip
STRING, RESOURCE = 7, 20


# -- protobuf messages, declared with TensorFlow's field numbers ---------------------------------
def _messages() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto(name="tf_bundle_test.proto", package="t")
    proto.syntax = "proto3"
    F = descriptor_pb2.FieldDescriptorProto
    types = {"i32": F.TYPE_INT32, "i64": F.TYPE_INT64, "str": F.TYPE_STRING, "f32": F.TYPE_FIXED32}
    types |= {"bool": F.TYPE_BOOL, "bytes": F.TYPE_BYTES}
    layout: dict[str, list[tuple[str, int, str, bool]]] = {
        "VersionDef": [("producer", 1, "i32", False), ("min_consumer", 2, "i32", False)],
        "Dim": [("size", 1, "i64", False), ("name", 2, "str", False)],
        "TensorShapeProto": [("dim", 2, "Dim", True), ("unknown_rank", 3, "bool", False)],
        "Extent": [("start", 1, "i64", False), ("length", 2, "i64", False)],
        "TensorSliceProto": [("extent", 1, "Extent", True)],
        "BundleHeaderProto": [
            ("num_shards", 1, "i32", False),
            ("endianness", 2, "i32", False),
            ("version", 3, "VersionDef", False),
        ],
        "BundleEntryProto": [
            ("dtype", 1, "i32", False),
            ("shape", 2, "TensorShapeProto", False),
            ("shard_id", 3, "i32", False),
            ("offset", 4, "i64", False),
            ("size", 5, "i64", False),
            ("crc32c", 6, "f32", False),
            ("slices", 7, "TensorSliceProto", True),
        ],
        "SerializedTensor": [
            ("name", 1, "str", False),
            ("full_name", 2, "str", False),
            ("checkpoint_key", 3, "str", False),
        ],
        "TrackableObject": [("attributes", 2, "SerializedTensor", True)],
        "TrackableObjectGraph": [("nodes", 1, "TrackableObject", True)],
        "KerasObject": [
            ("node_id", 2, "i32", False),
            ("node_path", 3, "str", False),
            ("identifier", 4, "str", False),
            ("metadata", 5, "str", False),
        ],
        "SavedMetadata": [("nodes", 1, "KerasObject", True)],
        "MetaInfoDef": [
            ("meta_graph_version", 1, "str", False),
            ("tags", 4, "str", True),
            ("tensorflow_version", 5, "str", False),
        ],
        "ListValue": [("s", 2, "bytes", True)],
        "AttrValue": [("list", 1, "ListValue", False), ("s", 2, "bytes", False)],
        "AttrEntry": [("key", 1, "str", False), ("value", 2, "AttrValue", False)],  # map entry
        "NodeDef": [
            ("name", 1, "str", False),
            ("op", 2, "str", False),
            ("attr", 5, "AttrEntry", True),
        ],
        "FunctionDef": [("node_def", 3, "NodeDef", True)],
        "FunctionDefLibrary": [("function", 1, "FunctionDef", True)],
        "GraphDef": [("node", 1, "NodeDef", True), ("library", 2, "FunctionDefLibrary", False)],
        "SignatureEntry": [("key", 1, "str", False), ("value", 2, "bytes", False)],
        "MetaGraphDef": [
            ("meta_info_def", 1, "MetaInfoDef", False),
            ("graph_def", 2, "GraphDef", False),
            ("signature_def", 5, "SignatureEntry", True),
        ],
        "SavedModel": [
            ("saved_model_schema_version", 1, "i64", False),
            ("meta_graphs", 2, "MetaGraphDef", True),
        ],
    }
    for name, fields in layout.items():
        message = proto.message_type.add(name=name)
        for field_name, number, kind, repeated in fields:
            field = message.field.add(name=field_name, number=number)
            field.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
            if kind in types:
                field.type = types[kind]
            else:
                field.type = F.TYPE_MESSAGE
                field.type_name = f".t.{kind}"
    pool = descriptor_pool.DescriptorPool()
    described = pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(described.message_types_by_name[name])
        for name in layout
    }


PB = _messages()


# -- a LevelDB table writer (table_format.md), with its own crc32c ---------------------------------
def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        if value < 0x80:
            return bytes(out) + bytes([value])
        out.append(value & 0x7F | 0x80)
        value >>= 7


def block(entries: list[tuple[bytes, bytes]], restart_every: int = 2) -> bytes:
    """Entries with shared key prefixes, a restart point every ``restart_every`` entries."""
    out = bytearray()
    restarts: list[int] = []
    previous = b""
    for position, (key, value) in enumerate(entries):
        shared = 0
        if position % restart_every == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value))
        out += key[shared:] + value
        previous = key
    restarts = restarts or [0]
    out += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def snappy_literals(data: bytes) -> bytes:
    """Valid raw snappy holding only literal elements (at most 60 bytes each)."""
    out = bytearray(varint(len(data)))
    for start in range(0, len(data), 60):
        chunk = data[start : start + 60]
        out += bytes([(len(chunk) - 1) << 2]) + chunk
    return bytes(out)


def table(entries: list[tuple[bytes, bytes]], per_block: int = 3, kind: int = 0) -> bytes:
    out = bytearray()

    def put(contents: bytes) -> bytes:
        stored = snappy_literals(contents) if kind == 1 else contents
        handle = varint(len(out)) + varint(len(stored))
        out.extend(
            stored + bytes([kind]) + struct.pack("<I", masked(crc32c(stored + bytes([kind]))))
        )
        return handle

    index: list[tuple[bytes, bytes]] = []
    for start in range(0, len(entries), per_block):
        chunk = entries[start : start + per_block]
        index.append((chunk[-1][0], put(block(chunk))))
    metaindex = put(block([]))
    index_handle = put(block(index, restart_every=1))
    footer = (metaindex + index_handle).ljust(40, b"\0") + MAGIC
    return bytes(out) + footer


# -- bundles --------------------------------------------------------------------------------
def string_tensor(values: list[bytes]) -> bytes:
    lengths = b"".join(varint(len(v)) for v in values)
    return lengths + struct.pack("<I", 0) + b"".join(values)


def write_bundle(
    prefix: Path,
    tensors: dict[str, np.ndarray | list[bytes]],
    *,
    shards: int = 1,
    kind: int = 0,
    per_block: int = 3,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """``prefix.index`` and its shards, tensors dealt round-robin over the shards."""
    data = [bytearray() for _ in range(shards)]
    entries: list[tuple[bytes, bytes]] = list(extra)
    for position, (name, value) in enumerate(sorted(tensors.items())):
        shard = position % shards
        entry = PB["BundleEntryProto"](shard_id=shard, offset=len(data[shard]))
        if isinstance(value, list):
            raw, entry.dtype = string_tensor(value), STRING
            entry.shape.dim.add(size=len(value))
        else:
            raw, entry.dtype = value.tobytes(), DTYPE_CODES[value.dtype]
            for size in value.shape:
                entry.shape.dim.add(size=size)
        entry.size = len(raw)
        entry.crc32c = masked(crc32c(raw))
        data[shard] += raw
        entries.append((name.encode(), entry.SerializeToString()))
    header = PB["BundleHeaderProto"](num_shards=shards, version=PB["VersionDef"](producer=1))
    entries.append((b"", header.SerializeToString()))
    entries.sort()
    prefix.with_name(prefix.name + ".index").write_bytes(table(entries, per_block, kind))
    for shard, raw in enumerate(data):
        prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{shards:05d}").write_bytes(raw)


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "dense/kernel/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal((3, 4)).astype(np.float32),
        "dense/bias/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal(4).astype(np.float16),
        "embedding/embeddings/.ATTRIBUTES/VARIABLE_VALUE": rng.standard_normal((5, 2)).astype(
            ml_dtypes.bfloat16
        ),
        "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE": np.array(12, dtype=np.int64),
        "flags": np.array([True, False, True]),
        "complex": np.array([1 + 2j, 3 - 1j], dtype=np.complex128),
        "bytes": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "f8": np.array([0.5, -2.0], dtype=ml_dtypes.float8_e4m3fn),
        "empty": np.zeros((0, 3), np.float64),
    }


def assert_tensors(model: Any, expected: dict[str, np.ndarray]) -> None:
    assert set(model.tensors) == set(expected)
    for name, array in expected.items():
        ref = model.tensors[name]
        assert ref.shape == array.shape, name
        assert ref.numpy().dtype == array.dtype, name
        assert digest(ref.numpy()) == digest(array), name


# -- default tests ---------------------------------------------------------------------------
def test_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the test writer's own crc
    assert _sstable.crc32c(b"123456789") == 0xE3069283
    assert _sstable.masked_crc32c(b"abc") == masked(crc32c(b"abc"))


def test_snappy_literals_and_overlapping_copies() -> None:
    # "abcd" literal, then copy-1 (offset 4, length 8: overlapping), then copy-2 (offset 2,
    # length 3), per google/snappy's format_description.txt
    encoded = varint(15) + bytes([3 << 2]) + b"abcd" + bytes([(4 << 2) | 1, 4])
    encoded += bytes([(2 << 2) | 2]) + struct.pack("<H", 2)
    assert _sstable.snappy_decompress(encoded, 1 << 20) == b"abcdabcdabcdcdc"
    long_literal = varint(70) + bytes([60 << 2, 69]) + bytes(range(70))
    assert _sstable.snappy_decompress(long_literal, 1 << 20) == bytes(range(70))
    with pytest.raises(CorruptFileError):
        _sstable.snappy_decompress(varint(4) + bytes([(4 << 2) | 1, 9]), 1 << 20)  # no history
    with pytest.raises(LimitExceededError):
        _sstable.snappy_decompress(varint(1 << 30), 1 << 20)


@pytest.mark.parametrize("kind", [0, 1], ids=["uncompressed", "snappy"])
def test_checkpoint_tensors_by_key(tmp_path: Path, kind: int) -> None:
    expected = sample_tensors()
    tensors: dict[str, np.ndarray | list[bytes]] = dict(expected)
    tensors["names/.ATTRIBUTES/VARIABLE_VALUE"] = [b"alpha", b"", b"gamma"]
    write_bundle(tmp_path / "ckpt-1", tensors, kind=kind)
    with modelport.open(tmp_path / "ckpt-1.index") as model:
        assert model.format.value == "tf-checkpoint"
        assert_tensors(model, expected)
        assert model.details["skipped_tensors"] == {
            "names/.ATTRIBUTES/VARIABLE_VALUE": "string [3]"
        }
        assert model.details["external_data"] == ["ckpt-1.data-00000-of-00001"]
        kernel_name = "dense/kernel/.ATTRIBUTES/VARIABLE_VALUE"
        kernel = model.tensors[kernel_name]
        offset, length = kernel.byte_range() or (0, -1)
        raw = (tmp_path / "ckpt-1.data-00000-of-00001").read_bytes()
        assert raw[offset : offset + length] == expected[kernel_name].tobytes()
    with modelport.open(tmp_path) as folder:
        assert folder.format.value == "tf-checkpoint"
        assert folder.details["checkpoint"] == "ckpt-1"
        assert_tensors(folder, expected)


def test_shards_and_the_latest_checkpoint_of_a_folder(tmp_path: Path) -> None:
    expected = sample_tensors()
    write_bundle(tmp_path / "ckpt-1", {"old": np.zeros(2, np.float32)})
    write_bundle(tmp_path / "ckpt-2", dict(expected), shards=3, per_block=2)
    assert len(list(tmp_path.glob("ckpt-2.data-*-of-00003"))) == 3
    with modelport.open(tmp_path) as model:  # no state file: the highest step, with a warning
        assert model.details["checkpoint"] == "ckpt-2"
        assert any("ckpt-1.index" in w for w in model.warnings)
        assert_tensors(model, expected)
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n'
    )
    with modelport.open(tmp_path) as model:
        assert model.details["checkpoint"] == "ckpt-1"
        assert list(model.tensors) == ["old"]


def test_object_graph_names_partitions_and_resources(tmp_path: Path) -> None:
    graph = PB["TrackableObjectGraph"]()
    node = graph.nodes.add()
    node.attributes.add(name="VARIABLE_VALUE", full_name="dense/kernel", checkpoint_key="k")
    entry = PB["BundleEntryProto"](dtype=1, size=0)
    entry.shape.dim.add(size=4)
    entry.slices.add().extent.add(start=0, length=2)
    entry.slices.add().extent.add(start=2, length=2)
    part = PB["BundleEntryProto"](dtype=1, size=8)
    part.shape.dim.add(size=2)
    handle = PB["BundleEntryProto"](dtype=RESOURCE)
    extra = [
        (b"parted", entry.SerializeToString()),
        (b"\x00\x00parted\x00\x01\x01", part.SerializeToString()),
        (b"handle", handle.SerializeToString()),
    ]
    tensors: dict[str, np.ndarray | list[bytes]] = {
        "k": np.ones(2, np.float32),
        tf_bundle.OBJECT_GRAPH_KEY: [graph.SerializeToString()],
    }
    write_bundle(tmp_path / "model.ckpt", tensors, extra=tuple(extra))
    with modelport.open(tmp_path / "model.ckpt.index") as model:
        assert list(model.tensors) == ["k"]
        skipped = model.details["skipped_tensors"]
        assert skipped["parted"] == "float32 [4] partitioned into 2 slices"
        assert skipped["handle"] == "resource []"
        assert model.details["slice_entries"] == 1
        assert any("parted" in w for w in model.warnings)


def test_object_graph_gives_variable_names(tmp_path: Path) -> None:
    graph = PB["TrackableObjectGraph"]()
    graph.nodes.add()
    graph.nodes.add().attributes.add(
        name="VARIABLE_VALUE", full_name="dense/kernel", checkpoint_key="a/.ATTRIBUTES/VALUE"
    )
    scalar = graph.SerializeToString()
    tensors: dict[str, np.ndarray | list[bytes]] = {"a/.ATTRIBUTES/VALUE": np.ones(1, np.int32)}
    write_bundle(tmp_path / "c", tensors)
    # the object graph is a scalar string: its shape has no dims
    index = tmp_path / "c.index"
    data = tmp_path / "c.data-00000-of-00001"
    offset = data.stat().st_size
    raw = string_tensor([scalar])
    data.write_bytes(data.read_bytes() + raw)
    entry = PB["BundleEntryProto"](dtype=STRING, offset=offset, size=len(raw))
    entry.shape.SetInParent()
    write_entries = [
        (b"", PB["BundleHeaderProto"](num_shards=1).SerializeToString()),
        (tf_bundle.OBJECT_GRAPH_KEY.encode(), entry.SerializeToString()),
    ]
    first = PB["BundleEntryProto"](dtype=3, offset=0, size=4)
    first.shape.dim.add(size=1)
    write_entries.append((b"a/.ATTRIBUTES/VALUE", first.SerializeToString()))
    index.write_bytes(table(write_entries))
    with modelport.open(index) as model:
        assert model.details["variable_names"] == {"a/.ATTRIBUTES/VALUE": "dense/kernel"}


def test_damaged_bundles_raise_typed_errors(tmp_path: Path) -> None:
    write_bundle(tmp_path / "m", {"w": np.ones((2, 2), np.float32)})
    index = tmp_path / "m.index"
    good = index.read_bytes()
    index.write_bytes(bytes([good[0], good[1], good[2] ^ 0xFF]) + good[3:])
    with pytest.raises(CorruptFileError, match="checksum"):
        modelport.open(index)
    index.write_bytes(good)
    (tmp_path / "m.data-00000-of-00001").write_bytes(b"\0" * 8)
    with pytest.raises(TruncatedFileError, match="runs past"):
        modelport.open(index)
    entry = PB["BundleEntryProto"](dtype=1, size=12)
    entry.shape.dim.add(size=4)
    header = PB["BundleHeaderProto"](num_shards=1)
    index.write_bytes(table([(b"", header.SerializeToString()), (b"w", entry.SerializeToString())]))
    with pytest.raises(CorruptFileError, match="needs 16 bytes"):
        modelport.open(index)
    disordered = [(b"w", entry.SerializeToString()), (b"v", entry.SerializeToString())]
    index.write_bytes(table([(b"", header.SerializeToString()), *disordered]))
    with pytest.raises(CorruptFileError, match="out of order"):
        modelport.open(index)
    big = PB["BundleHeaderProto"](num_shards=1, endianness=1)
    index.write_bytes(table([(b"", big.SerializeToString())]))
    with pytest.raises(UnsupportedVersionError, match="big-endian"):
        modelport.open(index)
    index.write_bytes(table([(b"", header.SerializeToString())], kind=2))
    with pytest.raises(UnsupportedVersionError, match="compression type 2"):
        modelport.open(index)


def test_missing_shard_lists_tensors_and_reading_says_why(tmp_path: Path) -> None:
    write_bundle(tmp_path / "m", {"w": np.ones(3, np.float32)})
    (tmp_path / "m.data-00000-of-00001").unlink()
    with modelport.open(tmp_path / "m.index") as model:
        assert model.tensors["w"].shape == (3,)
        assert any("missing" in w for w in model.warnings)
        with pytest.raises(FileNotFoundError, match="data shard"):
            model.tensors["w"].numpy()


def test_other_tables_and_protobufs_are_not_bundles(tmp_path: Path) -> None:
    path = tmp_path / "x.index"
    path.write_bytes(table([(b"a", b"1")]))  # a LevelDB table without the bundle header
    with pytest.raises(modelport.errors.UnknownFormatError):
        modelport.open(path)
    path.write_bytes(b"\0\0" + b"\1" * 100)
    with pytest.raises(modelport.errors.UnknownFormatError):
        modelport.open(path)


def test_scan_checkpoint_files_and_shards(tmp_path: Path, cli: Cli) -> None:
    write_bundle(tmp_path / "ckpt-1", dict(sample_tensors()), shards=2)
    report = modelport.scan(tmp_path)
    assert report.verdict == "safe"
    formats = {Path(f.path).name: f.format for f in report.files}
    assert formats["ckpt-1.index"] == "tf-checkpoint"
    assert formats["ckpt-1.data-00001-of-00002"] == "tensor-data"
    shard = tmp_path / "ckpt-1.data-00000-of-00002"
    result = cli("scan", shard, "--json")
    assert result.code == 0 and result.json["verdict"] == "safe"
    (tmp_path / "ckpt-1.index").unlink()  # a shard no index names: unrecognised bytes
    assert modelport.scan(shard).verdict == "error"


def test_shard_bytes_like_a_cut_pickle_are_data_a_whole_pickle_is_judged(
    tmp_path: Path, marker: Path
) -> None:
    cut = np.frombuffer(b"B\xff\xff\xff\x7f" + bytes(11), np.uint8)  # BINBYTES of 2 GiB
    write_bundle(tmp_path / "a", {"w": cut})
    (report,) = modelport.scan(tmp_path / "a.data-00000-of-00001").files
    assert (report.format, report.verdict) == ("tensor-data", "safe")
    payload = attack_pickles(marker)["global-reduce"]
    write_bundle(tmp_path / "b", {"w": np.frombuffer(payload, np.uint8)})
    assert modelport.scan(tmp_path / "b.data-00000-of-00001").verdict == "unsafe"
    assert not marker.exists()


def _saved_model_bytes(ops: list[str]) -> bytes:
    meta = PB["MetaGraphDef"]()
    meta.meta_info_def.tags.append("serve")
    meta.meta_info_def.tensorflow_version = "2.15.0"
    for position, op in enumerate(ops):
        meta.graph_def.node.add(name=f"n{position}", op=op)
    meta.signature_def.add(key="serving_default", value=b"")
    return bytes(
        PB["SavedModel"](saved_model_schema_version=1, meta_graphs=[meta]).SerializeToString()
    )


def _keras_lambda_metadata() -> bytes:
    """Keras 2's keras_metadata.pb for a Sequential with a Lambda layer: the layer's config
    holds ``func_dump``'s output, base64 of marshalled bytecode."""
    code = base64.b64encode(marshal.dumps((lambda x: x * 2).__code__)).decode()
    lambda_config = {
        "name": "double",
        "function": [code, None, None],
        "function_type": "lambda",
        "module": "__main__",
    }
    lambda_layer = {"class_name": "Lambda", "config": lambda_config}
    model = {"name": "seq", "class_name": "Sequential", "config": {"layers": [lambda_layer]}}
    graph = PB["SavedMetadata"]()
    graph.nodes.add(node_id=0, node_path="root", identifier="_tf_keras_sequential",
                    metadata=json.dumps(model))  # fmt: skip
    graph.nodes.add(node_id=1, node_path="root.layer-0", identifier="_tf_keras_layer",
                    metadata=json.dumps({"name": "double", **lambda_layer}))  # fmt: skip
    return bytes(graph.SerializeToString())


def test_saved_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "sm"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(_saved_model_bytes(["Const", "MatMul", "ReadFile"]))
    expected = sample_tensors()
    write_bundle(folder / "variables" / "variables", dict(expected))
    for path in (folder, folder / "saved_model.pb"):
        with modelport.open(path) as model:
            assert model.format.value == "tf-savedmodel"
            assert_tensors(model, expected)
            (meta,) = model.details["meta_graphs"]
            assert meta["tags"] == ["serve"] and meta["signatures"] == ["serving_default"]
            assert meta["op_counts"] == {"Const": 1, "MatMul": 1, "ReadFile": 1}
            assert meta["file_ops"] == ["ReadFile"]
    assert modelport.scan(folder).verdict == "suspicious"  # a function reads files


@pytest.mark.parametrize(("op", "verdict"), [("ReadFile", "suspicious"), ("WriteFile", "unsafe")])
def test_a_graph_that_touches_files_is_a_finding(tmp_path: Path, op: str, verdict: str) -> None:
    """tf.saved_model.load runs resource initializers as it loads (a red-team audit's
    WriteFile in a TrackableResource's _initialize wrote its marker): writing files is code
    reaching the machine, reading them is what some serving graphs do by design."""
    folder = tmp_path / "sm"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(_saved_model_bytes(["Const", op]))
    write_bundle(folder / "variables" / "variables", dict(sample_tensors()))
    report = modelport.scan(folder)
    assert report.verdict == verdict
    (graph,) = [f for f in report.files if Path(f.path).name == "saved_model.pb"]
    assert [(f.rule, f.member) for f in graph.findings] == [("tf-file-access", op)]


def _attr_node(op: str, **attrs: bytes | list[bytes]) -> Any:
    node = PB["NodeDef"](name=f"{op}_1", op=op)
    for key, value in attrs.items():
        if isinstance(value, list):
            node.attr.add(key=key, value=PB["AttrValue"](list=PB["ListValue"](s=value)))
        else:
            node.attr.add(key=key, value=PB["AttrValue"](s=value))
    return node


def _saved_model_with_function(nodes: list[Any]) -> bytes:
    """A SavedModel whose one library function holds ``nodes``, as tf.function traces them."""
    meta = PB["MetaGraphDef"]()
    meta.meta_info_def.tags.append("serve")
    meta.graph_def.node.add(name="saver_filename", op="Placeholder")
    meta.graph_def.library.function.add(node_def=[PB["NodeDef"](name="x", op="Const"), *nodes])
    meta.signature_def.add(key="serving_default", value=b"")
    return bytes(
        PB["SavedModel"](saved_model_schema_version=1, meta_graphs=[meta]).SerializeToString()
    )


_PRINT_TO: Final = "file:///tmp/printed.txt"
_WRITERS: Final = [
    pytest.param([_attr_node("PrintV2", output_stream=_PRINT_TO.encode())], _PRINT_TO, id="print"),
    pytest.param(
        [_attr_node("DebugIdentity", debug_urls=[b"file:///tmp/dump"])],
        "file:///tmp/dump",
        id="debug",
    ),
    pytest.param(
        [_attr_node("DebugIdentityV2", debug_urls=[b"grpc://host:1"])], "grpc://host:1", id="grpc"
    ),
    pytest.param(
        [_attr_node("Copy", debug_ops_spec=[b"DebugIdentity;file:///tmp/c;0"])],
        "file:///tmp/c",
        id="copy-debug-spec",
    ),
    pytest.param([_attr_node("CreateSummaryFileWriter")], "", id="summary-writer"),
    pytest.param([_attr_node("SnapshotDatasetV2")], "", id="snapshot"),
    pytest.param([_attr_node("PrintV2", output_stream=b"stderr")], None, id="print-stderr"),
    pytest.param([_attr_node("PrintV2")], None, id="print-default"),
    pytest.param(
        [_attr_node("PrintV2", output_stream=b"log(warning)"), _attr_node("RestoreV2")],
        None,
        id="log-and-restore",
    ),
]


@pytest.mark.parametrize(("nodes", "target"), _WRITERS)
def test_ops_that_write_by_attribute_or_input_are_unsafe(
    tmp_path: Path, nodes: list[Any], target: str | None
) -> None:
    """tf.print(..., output_stream="file://...") appends to that file each time its function
    runs, debug ops dump tensors to their debug_urls and a summary writer creates its logdir
    (TensorFlow did all three when a loaded SavedModel's function ran:
    test_a_printing_saved_model_writes_its_file_when_called); the process's own streams and
    the saver's SaveV2 (in every SavedModel) write nothing of the model's choosing."""
    folder = tmp_path / "sm"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(_saved_model_with_function(nodes))
    report = modelport.scan(folder)
    (graph,) = [f for f in report.files if Path(f.path).name == "saved_model.pb"]
    if target is None:
        assert report.verdict == "safe", report.to_json()
        return
    assert report.verdict == "unsafe"
    assert [(f.rule, f.member) for f in graph.findings] == [("tf-file-access", nodes[-1].op)]
    assert (target or "where its inputs say") in graph.findings[0].message
    with modelport.open(folder) as model:
        (meta,) = model.details["meta_graphs"]
        assert meta["file_writes"] == [{"op": nodes[-1].op, "to": target}]


def test_keras_lambda_in_a_saved_model_is_a_finding(tmp_path: Path, cli: Cli) -> None:
    folder = tmp_path / "keras_sm"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(_saved_model_bytes(["Const"]))
    (folder / "keras_metadata.pb").write_bytes(_keras_lambda_metadata())
    with modelport.open(folder) as model:
        assert model.details["lambda_layers"] == ["double"]
        assert any("Lambda" in w for w in model.warnings)
    report = modelport.scan(folder)
    assert report.verdict == "unsafe"
    rules = {Path(f.path).name: {x.rule for x in f.findings} for f in report.files}
    assert "keras-lambda" in rules["keras_metadata.pb"]
    assert "keras-lambda" in rules["saved_model.pb"]  # what loading the folder runs
    result = cli("scan", folder / "keras_metadata.pb", "--json")
    assert result.json["verdict"] == "unsafe"
    broken = PB["SavedMetadata"]()
    broken.nodes.add(node_id=0, identifier="_tf_keras_layer", metadata='{"class_name": "Lam')
    (folder / "keras_metadata.pb").write_bytes(broken.SerializeToString())
    assert modelport.scan(folder / "keras_metadata.pb").verdict == "error"  # never "safe"


def test_saved_model_sniff_rejects_other_protobufs(tmp_path: Path) -> None:
    path = tmp_path / "other.pb"
    path.write_bytes(
        bytes(PB["GraphDef"](node=[PB["NodeDef"](name="a", op="Const")]).SerializeToString())
    )
    with pytest.raises(modelport.errors.UnknownFormatError):
        modelport.open(path)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_indexes_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    write_bundle(folder / "m", {"a": np.arange(6, dtype=np.float32), "b": np.ones(2, np.int64)})
    index = folder / "m.index"
    index.write_bytes(damage(data, index.read_bytes()))
    assert_typed_error_or_whole(folder)


# -- heavy: TensorFlow writes, TensorFlow reads back ------------------------------------------
def _tf() -> Any:
    tf = pytest.importorskip("tensorflow")
    return tf


def _assert_like_tensorflow(model: Any, prefix: Path) -> None:
    tf = _tf()
    reader = tf.train.load_checkpoint(str(prefix))
    dtypes = reader.get_variable_to_dtype_map()
    numeric = {k for k, d in dtypes.items() if d not in (tf.string, tf.resource, tf.variant)}
    assert set(model.tensors) == numeric
    for name in numeric:
        expected = reader.get_tensor(name)
        ref = model.tensors[name]
        assert ref.shape == tuple(expected.shape), name
        assert ref.dtype == dtypes[name].name, name
        assert digest(ref.numpy()) == digest(np.asarray(expected)), name
    skipped = model.details.get("skipped_tensors", {})
    assert set(skipped) == set(dtypes) - numeric


class _Module:
    @staticmethod
    def build(tf: Any) -> Any:
        module = tf.Module()
        module.w = tf.Variable(tf.reshape(tf.range(6, dtype=tf.float32), (2, 3)))
        module.ids = tf.Variable(tf.constant([1, 2, 3], dtype=tf.int64))
        module.half = tf.Variable(tf.constant([1.5, -2.5], dtype=tf.float16))
        module.bf16 = tf.Variable(tf.constant([0.25, 8.0], dtype=tf.bfloat16))
        module.flag = tf.Variable(tf.constant([True, False]))
        module.scalar = tf.Variable(3.0, dtype=tf.float64)
        module.cplx = tf.Variable(tf.constant([1 + 2j], dtype=tf.complex64))
        module.u8 = tf.Variable(tf.constant([[1, 255]], dtype=tf.uint8))
        module.words = tf.Variable(tf.constant(["hello", "world"]))
        module.empty = tf.Variable(tf.zeros((0, 4)))

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def call(x: Any) -> Any:
            return tf.matmul(x, tf.transpose(module.w))

        module.call = call
        return module


@pytest.mark.heavy
def test_tf_checkpoint_write_and_save(tmp_path: Path) -> None:
    tf = _tf()
    module = _Module.build(tf)
    written = tf.train.Checkpoint(model=module).write(str(tmp_path / "w" / "ckpt-1"))
    with modelport.open(Path(written + ".index")) as model:
        _assert_like_tensorflow(model, Path(written))
        assert "model/w/.ATTRIBUTES/VARIABLE_VALUE" in model.tensors
        assert model.details["skipped_tensors"]["model/words/.ATTRIBUTES/VARIABLE_VALUE"] == (
            "string [2]"
        )
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=module), tmp_path / "m", 3)
    manager.save()
    module.w.assign(module.w * 2)
    latest = manager.save()
    with modelport.open(tmp_path / "m") as model:
        assert model.details["checkpoint"] == Path(latest).name
        _assert_like_tensorflow(model, Path(latest))
    assert modelport.scan(tmp_path).verdict == "safe"


@pytest.mark.heavy
def test_tf_saved_model_folder_and_convert(tmp_path: Path, cli: Cli) -> None:
    tf = _tf()
    module = _Module.build(tf)
    folder = tmp_path / "sm"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.call})
    for path in (folder, folder / "saved_model.pb"):
        with modelport.open(path) as model:
            assert model.format.value == "tf-savedmodel"
            _assert_like_tensorflow(model, folder / "variables" / "variables")
            (meta,) = model.details["meta_graphs"]
            assert meta["tags"] == ["serve"]
            assert "serving_default" in meta["signatures"]
            assert meta["op_counts"]["MatMul"] >= 1
    report = modelport.scan(folder)
    assert report.verdict == "safe", report
    out = tmp_path / "out.safetensors"
    result = cli("convert", folder, out)
    assert result.code == 0, result.err
    reader = tf.train.load_checkpoint(str(folder / "variables" / "variables"))
    with modelport.open(out) as converted:
        key = "w/.ATTRIBUTES/VARIABLE_VALUE"
        assert digest(converted.tensors[key].numpy()) == digest(reader.get_tensor(key))


@pytest.mark.heavy
def test_tf1_saver_with_a_partitioned_variable(tmp_path: Path) -> None:
    tf = _tf()
    graph = tf.Graph()
    with graph.as_default():
        partitioner = tf.compat.v1.fixed_size_partitioner(2)
        tf.compat.v1.get_variable("emb", shape=[6, 2], partitioner=partitioner)
        tf.compat.v1.get_variable("w", initializer=tf.constant([[1.0, 2.0]]))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            prefix = saver.save(session, str(tmp_path / "model.ckpt"))
    with modelport.open(tmp_path) as model:
        assert list(model.tensors) == ["w"]
        assert model.details["skipped_tensors"]["emb"] == "float32 [6, 2] partitioned into 2 slices"
        assert model.details["slice_entries"] == 2
        expected = tf.train.load_checkpoint(prefix).get_tensor("w")
        assert digest(model.tensors["w"].numpy()) == digest(expected)
    with modelport.open(tmp_path / "model.ckpt.meta") as meta:
        assert list(meta.tensors) == ["w"]
        assert meta.details["meta_graphs"][0]["op_counts"]["SaveV2"] >= 1
    assert modelport.scan(tmp_path).verdict == "safe"


@pytest.mark.heavy
def test_keras_export_and_sharded_checkpoint(tmp_path: Path) -> None:
    tf = _tf()
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.export(str(tmp_path / "export"), verbose=False)
    with modelport.open(tmp_path / "export") as exported:
        _assert_like_tensorflow(exported, tmp_path / "export" / "variables" / "variables")
        names = exported.details["variable_names"]
        for position, variable in enumerate(model.variables):
            assert names[f"variables/{position}/.ATTRIBUTES/VARIABLE_VALUE"] == variable.path
    options = tf.train.CheckpointOptions(
        experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(max_shard_size=64)
    )
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "sharded" / "ckpt"), options)
    with modelport.open(Path(prefix + ".index")) as sharded:
        assert sharded.details["num_shards"] > 1
        _assert_like_tensorflow(sharded, Path(prefix))
    assert modelport.scan(tmp_path / "sharded").verdict == "safe"


def test_a_checkpoint_with_an_empty_prefix(tmp_path: Path) -> None:
    """``tf.compat.v1.train.Saver().save(sess, "model_dir/")`` writes ``model_dir/.index`` and
    ``model_dir/.data-00000-of-00001`` (musicnn ships such files)."""
    expected = sample_tensors()
    folder = tmp_path / "MSD_musicnn"
    folder.mkdir()
    write_bundle(folder / "x", dict(expected))
    for written in folder.iterdir():  # the same bytes under the names TensorFlow gives them
        written.rename(folder / written.name.removeprefix("x"))
    assert sorted(p.name for p in folder.iterdir()) == [".data-00000-of-00001", ".index"]
    with modelport.open(folder / ".index") as model:
        assert_tensors(model, expected)
    assert modelport.scan(folder).verdict == "safe"


@pytest.mark.heavy
def test_a_resource_that_writes_a_file_as_it_loads_is_unsafe(tmp_path: Path) -> None:
    """A TrackableResource whose _initialize calls tf.io.write_file: tf.saved_model.load
    runs it while loading (the marker appears), and the scan calls the folder unsafe."""
    tf = _tf()
    marker = tmp_path / "marker"

    class Resource(tf.saved_model.experimental.TrackableResource):  # type: ignore[misc]
        def _create_resource(self) -> Any:
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[])

        def _initialize(self) -> Any:
            tf.io.write_file(str(marker), "x")
            return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)

    module = tf.Module()
    module.resource = Resource()
    folder = tmp_path / "sm"
    tf.saved_model.save(module, str(folder))
    marker.unlink(missing_ok=True)  # whether saving ran the initializer is TensorFlow's affair
    report = modelport.scan(folder)
    assert report.verdict == "unsafe"
    load = f"import tensorflow as tf; tf.saved_model.load({str(folder)!r})"
    subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, timeout=300)
    assert marker.exists()


@pytest.mark.heavy
def test_a_printing_saved_model_writes_its_file_when_called(tmp_path: Path) -> None:
    """tf.print to a file:// stream: the loaded function appends to that file when called
    (the marker appears), so the scan calls the folder unsafe; the same model printing to
    stderr, with the saver's SaveV2 that every SavedModel holds, is safe."""
    tf = _tf()
    marker = tmp_path / "marker"

    def saved(stream: object, name: str) -> Path:
        module = tf.Module()
        module.v = tf.Variable(1.0)
        signature = [tf.TensorSpec([], tf.float32)]
        module.f = tf.function(input_signature=signature)(
            lambda x: (tf.print("x", x, output_stream=stream), x * module.v)[1]
        )
        folder = tmp_path / name
        tf.saved_model.save(module, str(folder))
        return folder

    printing, quiet = saved(f"file://{marker}", "printing"), saved(sys.stderr, "quiet")
    marker.unlink(missing_ok=True)
    report = modelport.scan(printing)
    assert report.verdict == "unsafe"
    (graph,) = [f for f in report.files if Path(f.path).name == "saved_model.pb"]
    assert [(f.rule, f.member) for f in graph.findings] == [("tf-file-access", "PrintV2")]
    assert modelport.scan(quiet).verdict == "safe"
    for folder in (quiet, printing):
        loaded = tf.saved_model.load(str(folder))  # kept: its function needs its variable
        loaded.f(tf.constant(2.0))
        assert marker.exists() == (folder == printing)
