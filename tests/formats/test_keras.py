"""Keras v3 ``.keras`` archives, with h5py reading the embedded weights file as the oracle.

Keras is not installed here, so each archive is written the way
keras/src/saving/saving_lib.py writes it: ``zipfile.ZipFile(f, "w")`` (members STORED),
``metadata.json`` and ``config.json`` first, then ``model.weights.h5`` built by h5py in
memory (``H5IOStore`` with an archive) in Keras 3's ``layers/<name>/vars/<i>`` layout.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import h5py
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport.errors import CorruptFileError, ModelportError
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole

LAMBDA_CODE = "4wEAAAAAAAAAAAAAAAEAAAACAAAAQwAAAHMIAAAAfABkARQAUwA="


def serialized(module: str, class_name: str, config: dict[str, Any], **extra: Any) -> dict:
    return {"module": module, "class_name": class_name, "config": config, **extra}


def dense(name: str, units: int) -> dict[str, Any]:
    initializer = serialized("keras.initializers", "GlorotUniform", {"seed": None})
    return serialized(
        "keras.layers",
        "Dense",
        {
            "name": name,
            "trainable": True,
            "dtype": serialized("keras", "DTypePolicy", {"name": "float32"}, registered_name=None),
            "units": units,
            "activation": "relu",
            "use_bias": True,
            "kernel_initializer": initializer,
        },
        registered_name=None,
        build_config={"input_shape": [None, 4]},
    )


def model_config(*, with_lambda: bool = False, custom: bool = False) -> dict[str, Any]:
    layers = [
        serialized(
            "keras.layers",
            "InputLayer",
            {"batch_shape": [None, 4], "dtype": "float32", "name": "input_layer"},
            registered_name=None,
        ),
        dense("dense", 8),
    ]
    if with_lambda:
        function = {"class_name": "__lambda__", "config": {"code": LAMBDA_CODE}}
        layers.append(
            serialized(
                "keras.layers",
                "Lambda",
                {"name": "lambda", "function": function, "arguments": {}},
                registered_name=None,
            )
        )
    if custom:
        layer = serialized("my_package.layers", "Scale", {"name": "scale"})
        layer["registered_name"] = "MyPackage>Scale"
        layers.append(layer)
    layers.append(dense("dense_1", 3))
    return serialized(
        "keras",
        "Sequential",
        {"name": "sequential", "trainable": True, "layers": layers},
        registered_name=None,
        build_config={"input_shape": [None, 4]},
        compile_config={"optimizer": "adam", "loss": "mse"},
    )


def weights_file(rng: np.random.Generator) -> bytes:
    """``H5IOStore(archive=zf, mode="w")``: an in-memory HDF5 file in Keras 3's layout."""
    variables: dict[str, np.ndarray] = {
        "layers/dense/vars/0": rng.standard_normal((4, 8), dtype=np.float32),
        "layers/dense/vars/1": rng.standard_normal(8, dtype=np.float32),
        "layers/dense_1/vars/0": rng.standard_normal((8, 3)).astype(ml_dtypes.bfloat16),
        "layers/dense_1/vars/1": rng.standard_normal(3).astype(np.float16),
        "optimizer/vars/0": np.array(5, dtype=np.int64),
        "optimizer/vars/1": np.array(0.01, dtype=np.float32),
        "optimizer/vars/2": np.zeros((0, 8), np.float32),
    }
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_group("vars")
        for name, value in variables.items():
            group_name, key = name.rsplit("/", 1)
            group = f.require_group(group_name)
            if value.dtype == ml_dtypes.bfloat16:
                group.create_dataset(key, data=value).attrs["dtype"] = "bfloat16"
            else:
                group[key] = value
    return buffer.getvalue()


def write_keras(
    path: Path,
    *,
    compression: int = zipfile.ZIP_STORED,
    config: dict[str, Any] | None = None,
    weights: bytes | None = None,
    extra: dict[str, bytes] | None = None,
) -> bytes:
    weights = weights if weights is not None else weights_file(np.random.default_rng(0))
    metadata = {"keras_version": "3.6.0", "date_saved": "2024-10-01@12:00:00"}
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("metadata.json", json.dumps(metadata))
        zf.writestr("config.json", json.dumps(config or model_config()))
        zf.writestr("model.weights.h5", weights)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return weights


# the names Keras gives these variables (``Variable.path``), which modelport reads them under
KERAS_NAMES = {
    "layers/dense/vars/0": "dense/kernel",
    "layers/dense/vars/1": "dense/bias",
    "layers/dense_1/vars/0": "dense_1/kernel",
    "layers/dense_1/vars/1": "dense_1/bias",
}


def oracle(weights: bytes) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(weights), "r") as f:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                value = np.asarray(obj[()])
                if obj.attrs.get("dtype") == "bfloat16":
                    value = value.view(ml_dtypes.bfloat16)
                found[KERAS_NAMES.get(name, name)] = value

        f.visititems(visit)
    return found


def assert_matches(path: Path, expected: dict[str, np.ndarray]) -> None:
    with modelport.open(path) as model:
        assert list(model.tensors) == list(expected)
        for name, array in expected.items():
            ref = model.tensors[name]
            assert ref.shape == array.shape, name
            assert ref.nbytes == array.nbytes, name
            assert digest(ref.numpy()) == digest(array), name
        assert model.tensors["dense_1/kernel"].dtype == "bfloat16"
        assert model.tensors["dense_1/bias"].dtype == "float16"
        assert model.tensors["optimizer/vars/0"].dtype == "int64"


def test_stored_archive_is_zero_copy(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    weights = write_keras(path)
    expected = oracle(weights)
    assert_matches(path, expected)
    raw = path.read_bytes()
    with modelport.open(path) as model:
        for name, ref in model.tensors.items():
            where = ref.byte_range()
            assert where is not None, name
            start, length = where
            assert raw[start : start + length] == expected[name].tobytes(), name
    report = modelport.inspect(path).to_json()
    assert report["format"] == "keras"
    assert report["metadata"] == {"keras_version": "3.6.0", "date_saved": "2024-10-01@12:00:00"}
    details = report["details"]
    assert details["model_class"] == "Sequential"
    assert details["layer_classes"] == ["InputLayer", "Dense"]
    assert [layer["name"] for layer in details["layers"]] == ["input_layer", "dense", "dense_1"]
    assert details["weights_member"] == "model.weights.h5"
    assert details["weights_stored"] is True
    assert details["weights_layout"] == "keras3-weights"
    assert details["model_config"] == model_config()
    assert "custom_objects" not in details and "lambda_layers" not in details
    assert report["warnings"] == []
    # the model's weights, not the optimizer's variables Keras keeps beside them
    layers = {n: a for n, a in expected.items() if not n.startswith("optimizer/")}
    assert len(layers) < len(expected)
    assert report["parameters"] == sum(a.size for a in layers.values())
    assert "optimizer variables" in report["weights"]["note"]
    listed = {t["name"]: t for t in report["tensors"]}
    assert listed["dense_1/kernel"] == {
        "name": "dense_1/kernel",
        "dtype": "bfloat16",
        "shape": [8, 3],
        "nbytes": 48,
    }


def test_deflated_archive_reads_through_h5py(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    weights = write_keras(path, compression=zipfile.ZIP_DEFLATED)
    expected = oracle(weights)
    assert_matches(path, expected)
    with modelport.open(path) as model:
        assert model.details["weights_stored"] is False
        kernel = model.tensors["dense/kernel"]
        assert kernel.byte_range() is None
    # The archive is closed; the tensor is still readable (the file is reopened).
    assert digest(kernel.numpy()) == digest(expected["dense/kernel"])
    loaded = modelport.load(path)
    assert sorted(loaded) == sorted(n for n in expected if not n.startswith("optimizer/"))


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_bzip2_and_lzma_archives_read_as_keras_reads_them(tmp_path: Path, compression: int) -> None:
    """Keras opens archives with Python's zipfile, which inflates bzip2 and LZMA members too:
    a re-zipped archive is read, and its Lambda layer judged, not refused as damaged."""
    path = tmp_path / "model.keras"
    weights = write_keras(path, compression=compression)
    assert_matches(path, oracle(weights))
    write_keras(path, compression=compression, config=model_config(with_lambda=True))
    with zipfile.ZipFile(path) as zf:
        assert json.loads(zf.read("config.json"))["config"]["layers"][2]["class_name"] == "Lambda"
    report = modelport.scan(path)
    assert report.verdict == "unsafe"
    high = [f.rule for f in report.files[0].findings if f.severity.value == "high"]
    assert high == ["keras-lambda"]


def test_lambda_and_custom_objects_are_reported(tmp_path: Path) -> None:
    """Shapes as Keras 3.15 writes them: a Functional root (a built-in with a registered
    name), custom layers with ``"module": null``, a lambda activation as a bare dump."""
    config = model_config(with_lambda=True, custom=True)
    config.update(module="keras.src.models.functional", class_name="Functional")
    config["registered_name"] = "Functional"
    config["config"]["layers"][-2]["module"] = None  # Scale, registered as MyPackage>Scale
    unregistered = serialized("__main__", "Unregistered", {"name": "unreg"})
    unregistered["registered_name"] = "Unregistered"
    config["config"]["layers"].insert(-1, unregistered)
    dumped = {"value": [LAMBDA_CODE, None, None]}
    config["config"]["layers"][1]["config"]["activation"] = dumped
    path = tmp_path / "model.keras"
    write_keras(path, config=config)
    report = modelport.inspect(path)
    assert report.details["model_class"] == "Functional"
    assert report.details["lambda_layers"] == ["lambda"]
    assert "Keras Lambda layer lambda: its Python code runs when Keras loads this model" in (
        report.warnings
    )
    assert report.details["lambda_functions"] == [".config.layers[1].config.activation"]
    assert any("serialized Python lambda" in w for w in report.warnings)
    custom = report.details["custom_objects"]
    assert [(c["class_name"], c["module"], c["registered_name"]) for c in custom] == [
        ("Scale", None, "MyPackage>Scale"),
        ("Unregistered", "__main__", "Unregistered"),
    ]


def test_renamed_archive_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    write_keras(path)
    report = modelport.inspect(path)
    assert report.format == "keras"
    assert any(".h5 suggests hdf5" in w for w in report.warnings)


def test_duplicate_config_reads_the_last_like_keras(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    second = model_config(with_lambda=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        write_keras(path, extra={"config.json": json.dumps(second).encode()})
    report = modelport.inspect(path)
    assert report.details["lambda_layers"] == ["lambda"]
    assert any("2 members named 'config.json'" in w for w in report.warnings)


def test_npz_weights_and_missing_config(tmp_path: Path) -> None:
    path = tmp_path / "npz.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
        zf.writestr("model.weights.npz", b"PK\x05\x06" + bytes(18))
    report = modelport.inspect(path)
    assert report.format == "keras"
    assert report.tensors == ()
    assert any("model.weights.npz" in w for w in report.warnings)
    assert any("no config.json" in w for w in report.warnings)


def test_bad_metadata_is_only_a_warning(tmp_path: Path) -> None:
    """Keras never reads metadata.json back, so a broken one must not hide the model."""
    path = tmp_path / "model.keras"
    write_keras(path, extra={})
    raw = path.read_bytes().replace(b'"keras_version"', b'"keras_version\x00', 1)
    path.write_bytes(raw)
    report = modelport.inspect(path)
    assert report.metadata == {}
    assert any("metadata.json is not a JSON object" in w for w in report.warnings)
    assert len(report.tensors) == 7


def test_malformed_members(tmp_path: Path) -> None:
    cases: dict[str, dict[str, Any]] = {
        "not_hdf5": {"weights": b"not an hdf5 file at all" * 10},
        "truncated_hdf5": {"weights": weights_file(np.random.default_rng(1))[:600]},
        "garbage_hdf5": {"weights": b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4},
    }
    for name, kwargs in cases.items():
        path = tmp_path / f"{name}.keras"
        write_keras(path, **kwargs)
        with pytest.raises(ModelportError):
            modelport.open(path)
    path = tmp_path / "bad_config.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", b"{not json")
        zf.writestr("model.weights.h5", weights_file(np.random.default_rng(2)))
    with pytest.raises(CorruptFileError, match=r"config\.json"):
        modelport.open(path)


def test_truncated_archives(tmp_path: Path) -> None:
    source = tmp_path / "model.keras"
    write_keras(source)
    raw = source.read_bytes()
    for cut in (10, 100, len(raw) // 3, len(raw) // 2, len(raw) - 30, len(raw) - 1):
        path = tmp_path / f"cut{cut}.keras"
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelportError), modelport.open(path) as model:
            for ref in model.tensors.values():
                ref.numpy()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_archives_raise_only_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    source = tmp_path / "model.keras"
    if not source.exists():
        write_keras(source)
    raw = bytearray(source.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "mutated.keras"
    path.write_bytes(bytes(raw))
    assert_typed_error_or_whole(path, intact=source.read_bytes())
