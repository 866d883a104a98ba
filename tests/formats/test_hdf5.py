"""HDF5 files (Keras 2 models and weights, Keras 3 weights, transformers TF weights, plain),
with h5py reading the same file as the oracle.

Keras and TensorFlow are not installed here, so each layout is written with h5py exactly
the way its writer does (keras/src/legacy/saving/legacy_h5_format.py for Keras 2,
keras/src/saving/saving_lib.py ``H5IOStore`` for Keras 3, ``save_weights`` for
transformers' ``tf_model.h5``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport import dtypes as mp_dtypes
from modelport.errors import MissingDependencyError, ModelportError, TruncatedFileError
from tests.conftest import digest, torch_digest
from tests.mutation import assert_typed_error_or_whole

KERAS2_LAMBDA = ["4wEAAAAAAAAAAAAAAAEAAAACAAAAQwAAAHMIAAAAfABkARQAUwA=\n", None, None]


def dense_config(name: str, units: int) -> dict[str, Any]:
    return {
        "class_name": "Dense",
        "config": {
            "name": name,
            "trainable": True,
            "dtype": "float32",
            "units": units,
            "activation": "relu",
            "use_bias": True,
            "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
            "bias_initializer": {"class_name": "Zeros", "config": {}},
        },
    }


def keras2_model_config() -> dict[str, Any]:
    return {
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "config": {"batch_input_shape": [None, 4], "dtype": "float32", "name": "in"},
                },
                dense_config("dense", 8),
                {
                    "class_name": "Lambda",
                    "config": {
                        "name": "lambda",
                        "trainable": True,
                        "dtype": "float32",
                        "function": KERAS2_LAMBDA,
                        "function_type": "lambda",
                        "module": "__main__",
                        "output_shape": None,
                        "arguments": {},
                    },
                },
                dense_config("dense_1", 3),
            ],
        },
    }


def set_dataset(group: Any, name: str, value: np.ndarray) -> None:
    """What Keras 2's ``save_subset_weights_to_hdf5_group`` does for each weight."""
    dset = group.create_dataset(name, value.shape, dtype=value.dtype)
    if not value.shape:
        dset[()] = value
    else:
        dset[:] = value


def keras2_layer_weights(rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    return {
        "dense": {
            "dense/kernel:0": rng.standard_normal((4, 8), dtype=np.float32),
            "dense/bias:0": rng.standard_normal(8, dtype=np.float32),
        },
        "lambda": {},
        "dense_1": {
            "dense_1/kernel:0": rng.standard_normal((8, 3), dtype=np.float32),
            "dense_1/bias:0": rng.standard_normal(3, dtype=np.float32),
        },
    }


def write_keras2_weights_group(group: Any, layers: dict[str, dict[str, np.ndarray]]) -> None:
    """``save_weights_to_hdf5_group``: layer_names, then one group per layer."""
    group.attrs["layer_names"] = np.array([name.encode("utf8") for name in layers])
    group.attrs["backend"] = b"tensorflow"
    group.attrs["keras_version"] = b"2.15.0"
    for layer in sorted(layers):
        sub = group.create_group(layer)
        names = [name.encode("utf8") for name in layers[layer]]
        sub.attrs["weight_names"] = np.array(names) if names else np.asarray([])
        for name, value in layers[layer].items():
            set_dataset(sub, name, value)


def write_keras2_model(path: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Keras 2 ``model.save('m.h5')`` of a Sequential with Dense and Lambda layers."""
    config = keras2_model_config()
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.15.0"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(config).encode("utf8")
        training = {"loss": "mse", "optimizer_config": {"class_name": "Adam", "config": {}}}
        f.attrs["training_config"] = json.dumps(training).encode("utf8")
        write_keras2_weights_group(f.create_group("model_weights"), keras2_layer_weights(rng))
        optimizer = f.create_group("optimizer_weights")
        optimizer.attrs["weight_names"] = np.array([b"Adam/iter:0", b"Adam/dense/kernel/m:0"])
        set_dataset(optimizer, "Adam/iter:0", np.array(12, dtype=np.int64))
        set_dataset(optimizer, "Adam/dense/kernel/m:0", np.zeros((4, 8), np.float32))
    return config


def oracle(path: Path) -> dict[str, np.ndarray]:
    """h5py's view of every numeric dataset, in its own visiting order."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset) or obj.shape is None:
                return
            if obj.attrs.get("dtype") == "bfloat16":
                found[name] = np.asarray(obj[()]).view(ml_dtypes.bfloat16)
            elif obj.dtype.kind in "fiubc":
                found[name] = np.asarray(obj[()])

        f.visititems(visit)
    return found


def assert_matches_oracle(path: Path, expected: dict[str, np.ndarray]) -> None:
    with modelport.open(path) as model:
        assert list(model.tensors) == list(expected)
        for name, array in expected.items():
            ref = model.tensors[name]
            assert ref.shape == array.shape, name
            assert ref.nbytes == array.nbytes, name
            assert digest(ref.numpy()) == digest(array), name
            if array.dtype == ml_dtypes.bfloat16:
                assert ref.dtype == "bfloat16"
            else:
                assert ref.dtype == mp_dtypes.from_numpy(array.dtype.newbyteorder("<"))


def test_keras2_full_model(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    config = write_keras2_model(path, np.random.default_rng(0))
    expected = oracle(path)
    assert "model_weights/dense/dense/kernel:0" in expected
    assert_matches_oracle(path, expected)
    report = modelport.inspect(path).to_json()
    assert report["format"] == "hdf5"
    details = report["details"]
    assert details["layout"] == "keras2-full-model"
    assert details["model_config"] == config
    assert details["model_class"] == "Sequential"
    assert details["layer_classes"] == ["InputLayer", "Dense", "Lambda"]
    assert details["lambda_layers"] == ["lambda"]
    assert details["layer_names"] == ["dense", "lambda", "dense_1"]
    assert (
        "Keras Lambda layer lambda: its Python code runs when Keras loads this model"
        in report["warnings"]
    )
    assert report["metadata"]["keras_version"] == "2.15.0"
    assert report["metadata"]["backend"] == "tensorflow"
    assert json.loads(report["metadata"]["training_config"])["loss"] == "mse"
    assert report["parameters"] == sum(a.size for a in expected.values())
    listed = {t["name"]: t for t in report["tensors"]}
    assert listed["optimizer_weights/Adam/iter:0"] == {
        "name": "optimizer_weights/Adam/iter:0",
        "dtype": "int64",
        "shape": [],
        "nbytes": 8,
    }
    # Keras' datasets are contiguous: zero-copy byte ranges of the file itself.
    raw = path.read_bytes()
    with modelport.open(path) as model:
        for name, ref in model.tensors.items():
            where = ref.byte_range()
            assert where is not None, name
            start, length = where
            assert raw[start : start + length] == expected[name].tobytes(), name


def test_keras2_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        write_keras2_weights_group(f, keras2_layer_weights(np.random.default_rng(1)))
    assert_matches_oracle(path, oracle(path))
    report = modelport.inspect(path).to_json()
    assert report["details"]["layout"] == "keras2-weights"
    assert report["details"]["layer_names"] == ["dense", "lambda", "dense_1"]
    assert "model_config" not in report["details"]


def write_keras3_weights(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``H5IOStore``: ``vars`` groups per saveable; bfloat16 as 2-byte opaque + attribute."""
    variables = {
        "layers/dense/vars/0": rng.standard_normal((4, 8), dtype=np.float32),
        "layers/dense/vars/1": rng.standard_normal(8, dtype=np.float32),
        "layers/dense_1/vars/0": rng.standard_normal((8, 3)).astype(ml_dtypes.bfloat16),
        "layers/dense_1/vars/1": rng.standard_normal(3).astype(np.float16),
        "optimizer/vars/0": np.array(3, dtype=np.int64),
        "optimizer/vars/1": np.array(0.001, dtype=np.float32),
    }
    with h5py.File(path, "w") as f:
        f.create_group("vars")
        f.create_group("layers/lambda/vars")
        for name, value in variables.items():
            group_name, key = name.rsplit("/", 1)
            group = f.require_group(group_name)
            if value.dtype == ml_dtypes.bfloat16:
                group.create_dataset(key, data=value).attrs["dtype"] = "bfloat16"
            else:
                group[key] = value
    return variables


KERAS_NAMES = {
    "layers/dense/vars/0": "dense/kernel",
    "layers/dense/vars/1": "dense/bias",
    "layers/dense_1/vars/0": "dense_1/kernel",
    "layers/dense_1/vars/1": "dense_1/bias",
}


def test_keras3_weights(tmp_path: Path) -> None:
    path = tmp_path / "model.weights.h5"
    variables = write_keras3_weights(path, np.random.default_rng(2))
    stored = oracle(path)
    assert sorted(stored) == sorted(variables)
    # Keras' own names for a Dense layer's two variables; the optimizer's keep their paths
    expected = {KERAS_NAMES.get(name, name): value for name, value in stored.items()}
    assert_matches_oracle(path, expected)
    with modelport.open(path) as model:
        assert model.details["layout"] == "keras3-weights"
        bf16 = model.tensors["dense_1/kernel"]
        assert bf16.dtype == "bfloat16"
        assert bf16.byte_range() is not None
        assert (
            torch_digest(bf16.torch())
            == hashlib.sha256(variables["layers/dense_1/vars/0"].tobytes()).hexdigest()
        )
        assert model.tensors["optimizer/vars/0"].numpy() == 3


def test_transformers_tf_weights(tmp_path: Path) -> None:
    """``TFPreTrainedModel.save_pretrained`` -> Keras 2 ``save_weights`` of the main layer."""
    rng = np.random.default_rng(3)
    scope = "tf_bert_model/bert"
    layers = {
        "bert": {
            f"{scope}/embeddings/word_embeddings/weight:0": rng.standard_normal(
                (10, 4), dtype=np.float32
            ),
            f"{scope}/embeddings/LayerNorm/gamma:0": np.ones(4, np.float32),
            f"{scope}/pooler/dense/kernel:0": rng.standard_normal((4, 4), dtype=np.float32),
        }
    }
    path = tmp_path / "tf_model.h5"
    with h5py.File(path, "w") as f:
        write_keras2_weights_group(f, layers)
    expected = oracle(path)
    assert "bert/tf_bert_model/bert/embeddings/word_embeddings/weight:0" in expected
    assert_matches_oracle(path, expected)
    assert modelport.inspect(path).details["layout"] == "hf-tf"


def test_untagged_bfloat16_from_the_keras3_legacy_writer(tmp_path: Path) -> None:
    """Keras 3's ``model.save('m.h5')`` stores bfloat16 weights as h5py does: an untagged
    2-byte opaque type, without the ``dtype`` attribute of ``.weights.h5``."""
    kernel = np.random.default_rng(7).standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "legacy.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(keras2_model_config()).encode("utf8")
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = np.array([b"head"])
        group.create_group("head").attrs["weight_names"] = np.array([b"head/kernel"])
        group["head"].create_dataset("head/kernel", data=kernel)
    with modelport.open(path) as model:
        ref = model.tensors["model_weights/head/head/kernel"]
        assert ref.dtype == "bfloat16"
        assert ref.note == "untagged 2-byte opaque type read as bfloat16"
        assert ref.numpy().tobytes() == kernel.tobytes()
        assert any("read as bfloat16" in w for w in model.warnings)


def write_plain(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    values = {
        "chunked": rng.standard_normal((64, 32), dtype=np.float32),
        "half": rng.standard_normal((5, 3)).astype(np.float16),
        "longs": rng.integers(-(2**40), 2**40, size=(7,), dtype=np.int64),
        "flags": rng.integers(0, 2, size=(3, 3)).astype(bool),
        "bytes_u8": rng.integers(0, 255, size=(9,), dtype=np.uint8),
        "int8": rng.integers(-100, 100, size=(4,), dtype=np.int8),
        "doubles": rng.standard_normal(4),
        "complex": (rng.standard_normal(3) + 1j).astype(np.complex64),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in values.items():
            if name == "chunked":
                f.create_dataset(
                    "nested/deeper/chunked", data=value, chunks=(16, 8), compression="gzip"
                )
            else:
                f.create_dataset(name, data=value)
        f.create_dataset("shuffled", data=values["longs"], chunks=(4,), shuffle=True)
        f.create_dataset("text", data="not a tensor")
        f.create_dataset("nothing", data=h5py.Empty("f4"))
        f.attrs["description"] = "plain arrays"
        f.attrs["count"] = 3
        f.attrs["ratios"] = np.array([0.5, 0.25])
    with open(path, "r+b") as handle:
        handle.write(b"user block: not HDF5")
    return values


def test_plain_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "arrays.h5"
    write_plain(path)
    expected = oracle(path)
    assert_matches_oracle(path, expected)
    report = modelport.inspect(path).to_json()
    details = report["details"]
    assert details["layout"] == "plain"
    assert details["userblock_bytes"] == 512
    assert details["compression"] == {"deflate": 1, "shuffle": 1}
    assert details["read_through_h5py"] == 2
    skipped = {item["name"]: item["reason"] for item in details["skipped"]}
    assert skipped == {"nothing": "null dataspace (no data)", "text": "string"}
    assert report["metadata"] == {"count": 3, "description": "plain arrays", "ratios": [0.5, 0.25]}
    dtypes = {t["name"]: t["dtype"] for t in report["tensors"]}
    assert dtypes["flags"] == "bool"
    assert dtypes["complex"] == "complex64"
    assert dtypes["nested/deeper/chunked"] == "float32"
    loaded = modelport.load(path)
    for name in ("flags", "half", "nested/deeper/chunked", "scalar", "empty"):
        assert torch_digest(loaded[name]) == digest(expected[name]), name


def test_chunked_datasets_read_after_close(tmp_path: Path) -> None:
    path = tmp_path / "arrays.h5"
    values = write_plain(path)
    with modelport.open(path) as model:
        chunked = model.tensors["nested/deeper/chunked"]
        assert chunked.byte_range() is None  # compressed: read through h5py
    assert digest(chunked.numpy()) == digest(values["chunked"])


def test_reads_after_close_on_many_threads_at_once(tmp_path: Path) -> None:
    """A conversion reads its source on two threads (the writer and the checks); after
    ``close`` each read opens the file for itself, and none closes it under another's."""
    path = tmp_path / "arrays.h5"
    values = write_plain(path)
    with modelport.open(path) as model:
        chunked = model.tensors["nested/deeper/chunked"]
        shuffled = model.tensors["shuffled"]
    expected = {id(chunked): digest(values["chunked"]), id(shuffled): digest(values["longs"])}

    def read_many(ref: Any) -> list[str]:
        return [digest(ref.numpy()) for _ in range(150)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read_many, [chunked, shuffled, chunked, shuffled]))
    for ref, found in zip([chunked, shuffled, chunked, shuffled], results, strict=True):
        assert set(found) == {expected[id(ref)]}


def test_big_endian_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "be.h5"
    values = np.arange(12, dtype=">i4").reshape(3, 4)
    with h5py.File(path, "w") as f:
        f["be"] = values
    with modelport.open(path) as model:
        ref = model.tensors["be"]
        assert ref.dtype == "int32"
        assert ref.byte_range() is None
        assert ref.numpy().dtype == np.dtype("<i4")
        np.testing.assert_array_equal(ref.numpy(), values)


def test_links_and_other_files_are_reported_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["secret"] = np.arange(3.0)
    (tmp_path / "raw.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    path = tmp_path / "links.h5"
    with h5py.File(path, "w") as f:
        f["weights/w"] = np.arange(6, dtype=np.float32)
        f["tied"] = f["weights/w"]  # a second hard link: one storage, two names
        f["loop"] = f["weights"]  # a group linked twice is walked once
        f["soft"] = h5py.SoftLink("/weights/w")
        f["outside"] = h5py.ExternalLink(str(secret), "/secret")
        layout = h5py.VirtualLayout(shape=(3,), dtype="f8")
        layout[:] = h5py.VirtualSource(str(secret), "secret", shape=(3,))
        f.create_virtual_dataset("virtual", layout)
        f.create_dataset("external", shape=(4,), dtype="f4", external=[("raw.bin", 0, 16)])
    report = modelport.inspect(path).to_json()
    names = [t["name"] for t in report["tensors"]]
    assert names == ["loop/w", "tied"]
    assert report["aliases"] == [["loop/w", "tied"]]
    details = report["details"]
    assert details["soft_links"] == [{"name": "soft", "target": "/weights/w"}]
    kinds = {item["name"]: item["kind"] for item in details["external_references"]}
    assert kinds == {
        "external": "external storage of",
        "outside": "external link",
        "virtual": "virtual dataset",
    }
    assert sum("modelport did not follow it" in w for w in report["warnings"]) == 3


def test_renamed_file_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_keras2_model(path, np.random.default_rng(5))
    report = modelport.inspect(path)
    assert report.format == "hdf5"
    assert any(".safetensors suggests safetensors" in w for w in report.warnings)


def test_missing_h5py_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.h5"
    write_keras2_model(path, np.random.default_rng(6))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(MissingDependencyError, match="h5py"):
        modelport.open(path)


def small_file(tmp_path: Path) -> bytes:
    path = tmp_path / "small.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.arange(8, dtype=np.float32)
        f.create_dataset("b", data=np.arange(64, dtype=np.int64), chunks=(8,), compression="gzip")
        f.attrs["model_config"] = b'{"class_name": "Sequential", "config": {"layers": []}}'
    return path.read_bytes()


def open_and_read_everything(path: Path) -> None:
    with modelport.open(path) as model:
        for ref in model.tensors.values():
            ref.numpy()


def test_truncated_files(tmp_path: Path) -> None:
    raw = small_file(tmp_path)
    for cut in (4, 8, 20, 60, 200, len(raw) // 2, len(raw) - 100, len(raw) - 1):
        path = tmp_path / f"cut{cut}.h5"
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelportError):
            open_and_read_everything(path)
    path = tmp_path / "cut.h5"
    path.write_bytes(raw[:-1])
    with pytest.raises(TruncatedFileError, match="truncated download"):
        modelport.open(path)


def test_garbage_and_lies(tmp_path: Path) -> None:
    raw = small_file(tmp_path)
    cases = {
        "garbage": b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8,
        "zeros": b"\x89HDF\r\n\x1a\n" + bytes(4096),
        "version9": raw[:8] + b"\x09" + raw[9:],
        "huge_eof": raw[:40] + b"\xff" * 8 + raw[48:],
        "bad_offset_size": raw[:13] + b"\x03" + raw[14:],
        "no_root": raw[:64] + bytes(len(raw) - 64),
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.h5"
        path.write_bytes(data)
        with pytest.raises(ModelportError):
            open_and_read_everything(path)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_raise_only_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    seed = small_file(tmp_path)
    raw = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "mutated.h5"
    path.write_bytes(bytes(raw))
    assert_typed_error_or_whole(path, intact=seed)
