"""Objects a model config carries as base64 text (Keras 3's ``TorchModuleWrapper`` keeps a
``torch.save`` of its module in its layer config and ``torch.load``s it) are decoded and
scanned wherever they sit in the config."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import h5py
import torch

import modelport
from tests.conftest import attack_pickles


def _base64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _keras_archive(path: Path, module_bytes: bytes) -> Path:
    config = {
        "class_name": "Sequential",
        "config": {
            "layers": [
                {
                    "class_name": "TorchModuleWrapper",
                    "config": {
                        "name": "wrapped",
                        "module": base64.b64encode(module_bytes).decode(),
                    },
                }
            ]
        },
    }
    weights = io.BytesIO()
    with h5py.File(weights, "w") as h5:  # the layout Keras 3 writes: a group per layer
        h5.create_group("layers/wrapped/vars")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.8.0"}))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", weights.getvalue())
    return path


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_torch_module_embedded_in_a_keras_config_is_scanned(tmp_path: Path) -> None:
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("m/data.pkl", attack_pickles(tmp_path / "PWNED")["stack-global"])
    report = modelport.scan(_keras_archive(tmp_path / "evil.keras", evil.getvalue()))
    assert report.verdict == "unsafe", report.to_json()
    assert {f.rule for f in report.serious} == {"known-gadget"}
    assert any("#$.config.layers[0].config.module" in f.member for f in report.serious)


def test_a_plain_torch_module_embedded_in_a_keras_config_is_safe(tmp_path: Path) -> None:
    benign = _torch_bytes(torch.nn.Linear(2, 2))
    report = modelport.scan(_keras_archive(tmp_path / "ok.keras", benign))
    assert report.verdict == "safe", report.to_json()
    assert "embedded-object" in {f.rule for f in report.files[0].findings}


def test_a_pickle_embedded_as_base64_is_scanned(tmp_path: Path) -> None:
    evil = attack_pickles(tmp_path / "PWNED")["global-reduce"] + b" " * 80  # long enough
    report = modelport.scan(_keras_archive(tmp_path / "evil.keras", evil))
    assert report.verdict == "unsafe", report.to_json()


def test_ordinary_long_text_in_a_config_is_left_alone(tmp_path: Path) -> None:
    text = "A" * 200  # base64-looking text that decodes to no object
    report = modelport.scan(_keras_archive(tmp_path / "ok.keras", base64.b64decode(text)))
    assert report.verdict == "safe", report.to_json()
    assert "embedded-object" not in {f.rule for f in report.files[0].findings}
