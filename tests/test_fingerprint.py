"""``modelport.hash``: one digest for the same weights in every container.

The oracle recomputes the documented scheme from the torch tensors themselves (sha256 of
their C-order bytes, records sorted by name), independently of modelport's readers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from onnx import TensorProto, helper, numpy_helper

import modelport
from modelport.comparing.fingerprint import SCHEME
from modelport.errors import ModelFileNotFoundError, UnsafeModelError
from modelport.transfer.hashing import NO_DATA
from tests.conftest import Cli, benign_twins, digest, torch_digest
from tests.models import TiedLM, TinyResNet, dtype_zoo, trained_checkpoint


def oracle(tensors: dict[str, torch.Tensor]) -> str:
    """The documented digest, computed from torch tensors without modelport."""
    records = sorted(
        [name, str(t.dtype).removeprefix("torch."), list(t.shape), torch_digest(t)]
        for name, t in tensors.items()
    )
    text = json.dumps([SCHEME, records], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_everywhere(tmp_path: Path, state: dict[str, torch.Tensor], checkpoint: Any) -> list[Path]:
    """The same weights as a checkpoint, torch zip, legacy torch, safetensors and npz."""
    paths = {
        "checkpoint.pt": tmp_path / "checkpoint.pt",
        "zip": tmp_path / "pytorch_model.bin",
        "legacy": tmp_path / "legacy.pt",
        "safetensors": tmp_path / "model.safetensors",
        "npz": tmp_path / "weights.npz",
    }
    torch.save(checkpoint, paths["checkpoint.pt"])
    torch.save(state, paths["zip"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
    np.savez(paths["npz"], **{k: v.numpy() for k, v in state.items()})  # type: ignore[arg-type]
    return list(paths.values())


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], list[Path]]:
    torch.manual_seed(0)
    checkpoint = trained_checkpoint(TinyResNet(), torch.randn(2, 3, 8, 8))
    state = checkpoint["model_state_dict"]
    return state, save_everywhere(tmp_path_factory.mktemp("resnet"), state, checkpoint)


def test_same_digest_in_every_container(
    resnet: tuple[dict[str, torch.Tensor], list[Path]],
) -> None:
    state, paths = resnet
    expected = oracle(state)
    reports = [modelport.hash(p) for p in paths]
    assert {r.format for r in reports} == {"torch-zip", "torch-legacy", "safetensors", "npz"}
    for report in reports:
        assert report.digest == expected, report.path
        assert report.algorithm == "sha256" and report.scheme == SCHEME
        assert report.tensor_count == len(state)
        assert report.parameters == sum(t.numel() for t in state.values())
        by_name = {t.name: t for t in report.tensors}
        for name, tensor in state.items():
            assert by_name[name].digest == torch_digest(tensor)
            assert by_name[name].shape == tuple(tensor.shape)
    assert reports[0].weights_source == "model_state_dict"
    assert reports[1].weights_source == ""


def test_order_does_not_matter_but_every_part_does(
    tmp_path: Path, resnet: tuple[dict[str, torch.Tensor], list[Path]]
) -> None:
    state, paths = resnet
    reference = modelport.hash(paths[1]).digest

    def digest_of(changed: dict[str, torch.Tensor]) -> str:
        path = tmp_path / "changed.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in changed.items()}, path)
        return modelport.hash(path).digest

    assert digest_of(dict(reversed(list(state.items())))) == reference
    one_element = {k: v.clone() for k, v in state.items()}
    one_element["fc.weight"][3, 1] += 1e-6
    renamed = {("head.weight" if k == "fc.weight" else k): v for k, v in state.items()}
    retyped = {k: (v.double() if k == "fc.bias" else v) for k, v in state.items()}
    reshaped = {k: (v.reshape(-1) if k == "fc.weight" else v) for k, v in state.items()}
    fewer = {k: v for k, v in state.items() if k != "fc.bias"}
    digests = [digest_of(d) for d in (one_element, renamed, retyped, reshaped, fewer)]
    assert reference not in digests and len(set(digests)) == len(digests)


def test_whole_file_includes_optimizer_state(
    resnet: tuple[dict[str, torch.Tensor], list[Path]],
) -> None:
    state, paths = resnet
    checkpoint = paths[0]
    everything = modelport.hash(checkpoint, weights_only=False)
    assert everything.digest != modelport.hash(checkpoint).digest
    assert everything.tensor_count > len(state)
    assert any(t.name.startswith("optimizer_state_dict.") for t in everything.tensors)
    assert everything.weights_source == ""


def test_strided_views_and_dtype_zoo(tmp_path: Path) -> None:
    zoo = dtype_zoo()  # bf16, fp8, bool, 0-d, empty, transposed and sliced views
    torch.save(zoo, tmp_path / "zoo.pt")
    torch.save(zoo, tmp_path / "zoo_legacy.pt", _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(
        {k: v.contiguous().clone() for k, v in zoo.items()}, tmp_path / "zoo.safetensors"
    )
    expected = oracle(zoo)
    for name in ("zoo.pt", "zoo_legacy.pt", "zoo.safetensors"):
        assert modelport.hash(tmp_path / name).digest == expected, name


def test_tied_weights_hash_under_each_name(tmp_path: Path) -> None:
    state = TiedLM().state_dict()
    torch.save(state, tmp_path / "tied.pt")
    untied = {k: v.clone() for k, v in state.items()}
    safetensors.torch.save_file(untied, tmp_path / "untied.safetensors")
    tied = modelport.hash(tmp_path / "tied.pt")
    assert tied.digest == modelport.hash(tmp_path / "untied.safetensors").digest
    assert tied.digest == oracle(state)
    assert {"embed.weight", "head.weight"} <= {t.name for t in tied.tensors}


def test_code_free_formats_agree(tmp_path: Path) -> None:
    """HDF5, ONNX initializers and GGUF hold the same arrays: the same digest."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "enc.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "enc.bias": rng.standard_normal(6).astype(np.float16),
        "steps": np.arange(5, dtype=np.int64),
    }
    safetensors.numpy.save_file(arrays, tmp_path / "a.safetensors")
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        for name, array in arrays.items():
            handle[name] = array
    graph = helper.make_graph(
        [helper.make_node("Identity", ["enc.weight"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])],
        initializer=[numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    onnx.save(helper.make_model(graph), tmp_path / "a.onnx")
    writer = GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = oracle({k: torch.from_numpy(v) for k, v in arrays.items()})
    for name in ("a.safetensors", "a.h5", "a.onnx", "a.gguf"):
        assert modelport.hash(tmp_path / name).digest == expected, name


def test_quantized_blocks_hash_their_bytes(tmp_path: Path) -> None:
    blocks = quantize(
        np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), GGMLQuantizationType.Q8_0
    )
    writer = GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    writer.add_tensor("q", blocks, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (record,) = modelport.hash(tmp_path / "q.gguf").tensors
    assert record.dtype == "Q8_0" and record.shape == (2, 32)
    assert record.digest == digest(blocks)


def test_meta_and_empty_tensors(tmp_path: Path) -> None:
    state = {"meta": torch.empty(3, 2, device="meta"), "empty": torch.zeros(0, 5)}
    torch.save(state, tmp_path / "m.pt")
    records = {t.name: t for t in modelport.hash(tmp_path / "m.pt").tensors}
    assert records["meta"].digest == NO_DATA and records["meta"].shape == (3, 2)
    assert records["empty"].digest == hashlib.sha256(b"").hexdigest()


def test_unsafe_files_are_refused(tmp_path: Path, marker: Path, attacks: dict[str, bytes]) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(attacks["weights-and-call"])
    with pytest.raises(UnsafeModelError):
        modelport.hash(path)
    report = modelport.hash(path, allow_unsafe=True)
    assert [t.name for t in report.tensors] == ["w"]
    assert report.digest == oracle({"w": torch.ones(3)})  # the weights without the payload
    twin = tmp_path / "twin.pkl"
    twin.write_bytes(benign_twins()["weights-and-call"])
    assert modelport.hash(twin).digest == report.digest
    assert not marker.exists()
    with pytest.raises(ModelFileNotFoundError):
        modelport.hash(tmp_path / "missing.pt")


def test_cli_prints_sha256sum_lines_and_json(
    tmp_path: Path, resnet: tuple[dict[str, torch.Tensor], list[Path]], cli: Cli
) -> None:
    state, paths = resnet
    expected = oracle(state)
    result = cli("hash", *paths)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines == [f"{expected}  {p}" for p in paths]
    result = cli("hash", paths[2], "--json")
    assert result.code == 0, result.err
    (payload,) = result.json
    assert payload["digest"] == expected and payload["format"] == "torch-legacy"
    assert payload["tensor_count"] == len(payload["tensors"]) == len(state)
    assert set(payload["tensors"][0]) == {"name", "dtype", "shape", "digest"}
    missing = str(tmp_path / "missing.bin")
    result = cli("hash", paths[3], missing)
    assert result.code == 2
    assert result.out == f"{expected}  {paths[3]}\n"
    assert "missing.bin" in result.err and "Traceback" not in result.err
    result = cli("hash", missing, "--json")
    assert result.code == 2
    assert result.json[0]["error"]["type"] == "ModelFileNotFoundError"
