"""Red-team round 7, root cause B: a Keras model config that Keras runs and no reader of
modelport judged. A legacy ``.h5`` whose ``model_config`` sits in dense attribute storage
(h5py reads it, the heap check cannot follow it); a ``.keras`` zip behind other bytes (Python's
zipfile, and so Keras, opens it there); an HDF5 file behind a user block that holds a torch
zip, an npz or a safetensors header (each of those formats' loaders opens the same file); the
Keras 3 folder form (a loose ``config.json``); and a ``.keras`` zip that holds ``config.json``
alone (Keras builds the model, running the Lambda, before it asks for weights).

The files are written with h5py, zipfile, numpy and safetensors; the config is Keras 3.15's
own shape with a ``Lambda`` whose marshalled code opens a marker file (Python's ``marshal``
of a lambda is what Keras stores). The oracle that Keras runs each one is in
``tests/test_keras_attacks_reach.py`` (heavy): ``keras.saving.load_model(PATH,
safe_mode=False)`` under the blocking audit hook of ``tests/attacks/harness.py``, in the same
call as the attacks Keras writes itself, so Keras is imported once. The twins (the same
containers with a ``Rescaling`` layer, and files the libraries write) keep their verdicts.
"""

from __future__ import annotations

import base64
import io
import json
import marshal
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from safetensors.numpy import save_file

import modelport
from modelport import limits

USER_BLOCK = 4096
UNSAFE_LOADER = "import keras; keras.saving.load_model(PATH, safe_mode=False)"


def _scan(path: Path) -> tuple[str, set[str]]:
    report = modelport.scan(path)
    return report.verdict, {f.rule for file in report.files for f in file.findings}


def _dtype() -> dict[str, Any]:
    return {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": "float32"},
        "registered_name": None,
    }


def _middle(marker: Path | None) -> dict[str, Any]:
    """The model's one inner layer: a Lambda that opens ``marker``, or a Rescaling twin."""
    if marker is None:
        config: dict[str, Any] = {"name": "payload", "scale": 0.5, "offset": 0.0}
        return {"module": "keras.layers", "class_name": "Rescaling", "config": config}
    function = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")
    code = base64.encodebytes(marshal.dumps(function.__code__)).decode("ascii")
    dumped = {
        "class_name": "__lambda__",
        "config": {"code": code, "defaults": None, "closure": None},
    }
    config = {"name": "payload", "trainable": True, "dtype": _dtype(), "function": dumped}
    config["arguments"] = {}
    return {"module": "keras.layers", "class_name": "Lambda", "config": config}


def _config(marker: Path | None) -> dict[str, Any]:
    """Keras 3.15's ``config.json`` of ``Model(Input((4,)), middle(Input))``."""
    tensor = {"shape": [None, 4], "dtype": "float32", "keras_history": ["input_layer", 0, 0]}
    inputs: dict[str, Any] = {
        "module": "keras.layers",
        "class_name": "InputLayer",
        "config": {
            "batch_shape": [None, 4],
            "dtype": "float32",
            "sparse": False,
            "ragged": False,
            "name": "input_layer",
            "optional": False,
        },
        "registered_name": None,
        "name": "input_layer",
        "inbound_nodes": [],
    }
    middle = _middle(marker)
    middle.update(
        registered_name=None,
        build_config={"input_shape": [None, 4]},
        name="payload",
        inbound_nodes=[
            {"args": [{"class_name": "__keras_tensor__", "config": tensor}], "kwargs": {}}
        ],
    )
    return {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "config": {
            "name": "functional",
            "trainable": True,
            "layers": [inputs, middle],
            "input_layers": ["input_layer", 0, 0],
            "output_layers": ["payload", 0, 0],
        },
        "registered_name": "Functional",
        "build_config": {"input_shape": None},
        "compile_config": {},
    }


def _legacy_h5(path: Path, marker: Path | None, **options: Any) -> None:
    """What ``model.save("m.h5")`` writes for the model (a layer without weights each);
    ``options`` go to ``h5py.File`` (``libver``, ``userblock_size``)."""
    with h5py.File(path, "w", **options) as handle:
        if options.get("libver") == "latest":  # more than 8 attributes: dense storage
            for index in range(12):
                handle.attrs[f"note_{index:02d}"] = "x"
        handle.attrs["backend"] = "tensorflow"
        handle.attrs["keras_version"] = "3.15.1"
        handle.attrs["model_config"] = json.dumps(_config(marker))
        weights = handle.create_group("model_weights")
        weights.attrs["layer_names"] = np.array([b"input_layer", b"payload"])
        for name in ("input_layer", "payload", "top_level_model_weights"):
            weights.create_group(name).attrs["weight_names"] = np.array([], np.float64)


def _keras_zip(marker: Path | None, *, alone: bool = False) -> bytes:
    """A ``.keras`` archive; ``alone``: its ``config.json`` only (no ``metadata.json``
    naming a Keras version, no weights)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        if not alone:
            archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps(_config(marker)))
        if not alone:
            inner = io.BytesIO()
            with h5py.File(inner, "w") as handle:
                handle.create_group("layers")
                handle.create_group("vars")
            archive.writestr("model.weights.h5", inner.getvalue())
    return buffer.getvalue()


def _stored_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _zip_in_user_block(path: Path, marker: Path | None, members: dict[str, bytes]) -> None:
    """The HDF5 file behind a user block holding the zip's members; the zip's directory and
    end record after the HDF5 data, its directory offset moved there (Python's zipfile and
    torch's reader both open it, and so does h5py)."""
    _legacy_h5(path, marker, userblock_size=USER_BLOCK)
    archive = _stored_zip(members)
    cd_size, cd_offset = struct.unpack("<II", archive[-10:-2])
    assert cd_offset <= USER_BLOCK
    blob = bytearray(path.read_bytes())
    blob[:cd_offset] = archive[:cd_offset]
    end = bytearray(archive[cd_offset + cd_size :])
    end[16:20] = struct.pack("<I", len(blob))
    path.write_bytes(bytes(blob) + archive[cd_offset : cd_offset + cd_size] + bytes(end))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def build_dense_model_config(folder: Path, marker: Path | None) -> Path:
    path = folder / "dense.h5"
    _legacy_h5(path, marker, libver="latest")
    return path


def build_keras_prepended(folder: Path, marker: Path | None) -> Path:
    path = folder / "prepended.keras"
    path.write_bytes(b"#" * 63 + b"\n" + _keras_zip(marker))
    return path


def build_h5_behind_torch_zip(folder: Path, marker: Path | None) -> Path:
    path = folder / "torchzip.h5"
    members = {"archive/data.pkl": pickle.dumps({}, protocol=2), "archive/version": b"3\n"}
    _zip_in_user_block(path, marker, members)
    return path


def build_h5_behind_npz(folder: Path, marker: Path | None) -> Path:
    path = folder / "npz.h5"
    _zip_in_user_block(path, marker, {"w.npy": _npy(np.zeros(4, np.float32))})
    return path


def build_h5_behind_safetensors(folder: Path, marker: Path | None) -> Path:
    """One uint8 tensor spans the rest of the file (the HDF5 bytes): safe_open takes it."""
    path = folder / "safetensors.h5"
    _legacy_h5(path, marker, userblock_size=USER_BLOCK)
    blob = bytearray(path.read_bytes())
    span = len(blob) - USER_BLOCK
    header = json.dumps({"x": {"dtype": "U8", "shape": [span], "data_offsets": [0, span]}})
    raw = header.encode().ljust(USER_BLOCK - 8)
    blob[:USER_BLOCK] = struct.pack("<Q", len(raw)) + raw
    path.write_bytes(bytes(blob))
    return path


def build_keras_folder(folder: Path, marker: Path | None) -> Path:
    path = folder / "keras_dir"
    path.mkdir()
    with zipfile.ZipFile(io.BytesIO(_keras_zip(marker))) as archive:
        archive.extractall(path)
    return path


def build_keras_config_only(folder: Path, marker: Path | None) -> Path:
    path = folder / "config_only.keras"
    path.write_bytes(_keras_zip(marker, alone=True))
    return path


BUILDERS: dict[str, Callable[[Path, Path | None], Path]] = {
    "h5-dense-model-config": build_dense_model_config,
    "keras-prepended": build_keras_prepended,
    "h5-behind-torch-zip": build_h5_behind_torch_zip,
    "h5-behind-npz": build_h5_behind_npz,
    "h5-behind-safetensors": build_h5_behind_safetensors,
    "keras-folder": build_keras_folder,
    "keras-config-only": build_keras_config_only,
}
# The file's other reading, which kept the HDF5 reader from running.
POLYGLOTS = ("h5-behind-torch-zip", "h5-behind-npz", "h5-behind-safetensors")


def _attack(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    return BUILDERS[name](tmp_path, marker), marker


@pytest.mark.parametrize("name", [n for n in BUILDERS if n != "h5-dense-model-config"])
def test_the_lambda_is_judged_wherever_keras_finds_it(tmp_path: Path, name: str) -> None:
    path, marker = _attack(tmp_path, name)
    report = modelport.scan(path)
    rules = [f.rule for file in report.files for f in file.findings]
    assert report.verdict == "unsafe", rules
    assert rules.count("keras-lambda") == 1, rules  # the member and the reader agree: once
    assert ("polyglot" in rules) is (name in POLYGLOTS)
    assert not marker.exists()


def test_a_keras_zip_behind_other_bytes_is_read_by_the_keras_reader(tmp_path: Path) -> None:
    """Keras opens the zip where Python's zipfile finds it, and so does modelport's reader."""
    (report,) = modelport.scan(build_keras_prepended(tmp_path, None)).files
    assert (report.format, report.verdict) == ("keras", "safe"), report.findings


def test_a_model_config_in_dense_storage_is_not_analysed(tmp_path: Path) -> None:
    """h5py reads it and Keras runs it; modelport cannot check the heap it sits in, so the
    file is an error, never a description and a warning."""
    path, _ = _attack(tmp_path, "h5-dense-model-config")
    assert h5py.File(path, "r").attrs["model_config"].startswith('{"module"')
    (report,) = modelport.scan(path).files
    assert report.verdict == "error", report.findings
    assert [(f.rule, f.member) for f in report.findings] == [("not-analysed", "model_config")]


def test_a_model_config_past_the_size_read_is_not_analysed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rule for a fixed-length string left out for its size (past 64 MiB in use;
    256 bytes here), which h5py reads and Keras decodes all the same."""
    path = tmp_path / "big.h5"
    _legacy_h5(path, None)
    with h5py.File(path, "a") as handle:
        handle.attrs["model_config"] = np.bytes_(json.dumps(_config(None)))
    monkeypatch.setattr(limits, "MAX_HDF5_ATTR_BYTES", 256)
    (report,) = modelport.scan(path).files
    assert report.verdict == "error", report.findings
    assert ("not-analysed", "model_config") in {(f.rule, f.member) for f in report.findings}


def test_the_same_config_with_compact_attributes_is_read(tmp_path: Path) -> None:
    path = tmp_path / "compact.h5"
    _legacy_h5(path, tmp_path / "PWNED")
    assert _scan(path) == ("unsafe", {"keras-lambda"})


def test_a_training_config_is_judged_like_the_model_config(tmp_path: Path) -> None:
    """Keras deserializes ``training_config`` (loss, metrics, optimizer) when it compiles."""
    path = tmp_path / "trained.h5"
    _legacy_h5(path, None)
    gadget = {"class_name": "function", "module": "builtins", "config": "eval"}
    with h5py.File(path, "a") as handle:
        handle.attrs["training_config"] = json.dumps({"loss": gadget, "metrics": []})
    verdict, rules = _scan(path)
    assert verdict == "unsafe" and "keras-gadget" in rules, rules


@pytest.mark.parametrize("name", list(BUILDERS))
def test_twins_with_a_rescaling_layer_stay_safe(tmp_path: Path, name: str) -> None:
    path = BUILDERS[name](tmp_path, None)
    verdict, rules = _scan(path)
    if name == "h5-dense-model-config":
        assert verdict == "error" and rules == {"not-analysed"}
    else:
        assert verdict == "safe", rules
        assert rules <= {"polyglot"}


def test_library_outputs_keep_their_verdicts(tmp_path: Path) -> None:
    """What h5py, numpy, safetensors and a Hugging Face folder write: safe, no finding."""
    with h5py.File(tmp_path / "dense_attrs.h5", "w", libver="latest") as handle:
        for index in range(12):
            handle.attrs[f"note_{index:02d}"] = "x"
        handle["w"] = np.ones((2, 2), np.float32)
    with h5py.File(tmp_path / "user_block.h5", "w", userblock_size=USER_BLOCK) as handle:
        handle["w"] = np.ones((2, 2), np.float32)
    np.savez_compressed(tmp_path / "arrays.npz", w=np.ones(3))
    save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = modelport.scan(tmp_path)
    assert report.verdict == "safe", report.to_json()
    assert all(not file.findings for file in report.files), report.to_json()
