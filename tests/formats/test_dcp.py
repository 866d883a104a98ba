"""torch.distributed.checkpoint directories; the oracle is DCP's own loaders."""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.filesystem import (
    FileSystemReader,
    FileSystemWriter,
    SerializationFormat,
    _StorageInfo,
)
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

import modelport
from modelport.errors import CorruptFileError, ModelportError, TruncatedFileError
from tests.conftest import torch_digest
from tests.mutation import assert_typed_error_or_whole, dcp_pickles_parse


def save(state: dict[str, Any], directory: Path, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        if kwargs:
            dcp.save(state, storage_writer=FileSystemWriter(directory, **kwargs), no_dist=True)
        else:
            dcp.save(state, checkpoint_id=directory, no_dist=True)


def training_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "extra": {
            "bf16": torch.randn(5, 3, dtype=torch.bfloat16),
            "half": torch.randn(4, dtype=torch.float16),
            "ids": torch.arange(6, dtype=torch.int32),
            "mask": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 3),
            "scalar": torch.tensor(2.5),
        },
        "epoch": 3,
        "tag": "run-1",
    }


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        name = f"{prefix}{key}"
        if isinstance(item, (dict, list, tuple)) and not isinstance(item, torch.Tensor):
            out.update(flat(item, name + "."))
        else:
            out[name] = item
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dcp") / "step_3"
    save(training_state(), directory)
    return directory


def test_matches_dcp_to_torch_save(checkpoint: Path, tmp_path: Path) -> None:
    dcp_to_torch_save(checkpoint, tmp_path / "full.pt")
    oracle = flat(torch.load(tmp_path / "full.pt", weights_only=False))
    expected = {k: v for k, v in oracle.items() if isinstance(v, torch.Tensor)}
    with modelport.open(checkpoint) as model:
        assert model.format == "dcp"
        assert sorted(model.tensors) == sorted(expected)
        for name, tensor in expected.items():
            ref = model.tensors[name]
            assert ref.dtype == str(tensor.dtype).removeprefix("torch.")
            assert ref.shape == tuple(tensor.shape)
            assert torch_digest(ref.torch()) == torch_digest(tensor), name
            if tensor.numel():  # chunks are torch.save zips: the bytes stay in the file
                assert ref.byte_range() is not None
                assert ref.storage is not None and ref.storage.path is not None
                assert ref.storage.path.suffix == ".distcp"
        entries = model.details["bytes_entries"]
        assert entries["epoch"] == 3 and entries["tag"] == "run-1"
        assert entries["optim.param_groups.0.lr"] == oracle["optim.param_groups.0.lr"]
        assert entries["optim.param_groups.0.betas"] == [0.9, 0.999]
        assert model.details["data_files"] == ["__0_0.distcp"]


def test_inspect_and_load(checkpoint: Path) -> None:
    report = modelport.inspect(checkpoint).to_json()
    assert report["format"] == "dcp"
    tensors = {t["name"]: t for t in report["tensors"]}
    assert tensors["extra.bf16"] == {
        "name": "extra.bf16",
        "dtype": "bfloat16",
        "shape": [5, 3],
        "nbytes": 30,
    }
    assert tensors["extra.scalar"]["shape"] == []
    assert "optim.state.0.exp_avg_sq" in tensors
    assert report["weights"]["source"] == "model"  # saved under "model": the model's weights
    state = training_state()
    assert report["parameters"] == sum(t.numel() for t in state["model"].values())
    assert report["details"]["dcp_version"] == FileSystemReader(checkpoint).read_metadata().version
    with modelport.open(checkpoint) as model:
        weights = {name: ref.torch() for name, ref in model.weights().tensors.items()}
        assert torch_digest(model.tensors["extra.bf16"].torch()) == torch_digest(
            state["extra"]["bf16"]
        )
    assert list(weights) == list(state["model"])  # the model's own names, as in torch.save
    assert torch.equal(weights["0.weight"], state["model"]["0.weight"])


def test_matches_dcp_load(checkpoint: Path) -> None:
    template = {"model": {k: torch.zeros_like(v) for k, v in training_state()["model"].items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=checkpoint, no_dist=True)
    with modelport.open(checkpoint) as model:
        for name, tensor in template["model"].items():
            assert torch.equal(model.tensors[f"model.{name}"].torch(), tensor)


def test_safetensors_serialization(tmp_path: Path) -> None:
    state = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5),
        "c": torch.randn(2, dtype=torch.bfloat16),
    }
    save(state, tmp_path / "ck", serialization_format=SerializationFormat.SAFETENSORS)
    with modelport.open(tmp_path / "ck") as model:
        assert list(model.tensors) == ["a", "b", "c"]
        for name, tensor in state.items():
            assert torch_digest(model.tensors[name].torch()) == torch_digest(tensor)


def chunked_checkpoint(directory: Path, full: torch.Tensor, cuts: list[tuple[int, int]]) -> None:
    """A tensor saved as several chunks (as several ranks would), written by hand."""
    directory.mkdir()
    blobs, chunks, storage = b"", [], {}
    for index, (row, col) in enumerate(cuts):
        piece = full[row : row + 2, col : col + 3].clone()
        buffer = io.BytesIO()
        torch.save(piece, buffer)
        offsets = torch.Size([row, col])
        chunks.append(ChunkStorageMetadata(offsets, piece.shape))
        storage[MetadataIndex("w", offsets, index)] = _StorageInfo(
            "__0_0.distcp", len(blobs), len(buffer.getvalue())
        )
        blobs += buffer.getvalue()
    (directory / "__0_0.distcp").write_bytes(blobs)
    meta = Metadata(
        {"w": TensorStorageMetadata(TensorProperties(dtype=full.dtype), full.shape, chunks)},
        storage_data=storage,
    )
    (directory / ".metadata").write_bytes(pickle.dumps(meta))


def test_tensor_in_several_chunks(tmp_path: Path) -> None:
    full = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    chunked_checkpoint(tmp_path / "ck", full, [(0, 0), (0, 3), (2, 0), (2, 3)])
    template = {"w": torch.zeros(4, 6, dtype=torch.float64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=tmp_path / "ck", no_dist=True)
    assert torch.equal(template["w"], full)
    with modelport.open(tmp_path / "ck") as model:
        ref = model.tensors["w"]
        assert ref.shape == (4, 6) and ref.dtype == "float64"
        assert torch.equal(ref.torch(), template["w"])


def test_chunks_that_do_not_tile(tmp_path: Path) -> None:
    full = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    chunked_checkpoint(tmp_path / "ck", full, [(0, 0), (0, 3), (2, 0)])
    with pytest.raises(CorruptFileError, match="tile"):
        modelport.open(tmp_path / "ck")


def rewrite_storage(directory: Path, change: Any) -> None:
    """Edit the (benign, self-written) metadata with torch's own classes."""
    meta = pickle.loads((directory / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        change(info)
    (directory / ".metadata").write_bytes(pickle.dumps(meta))


def test_relative_path_must_stay_inside(tmp_path: Path) -> None:
    directory = tmp_path / "inner" / "ck"
    save({"w": torch.ones(3)}, directory)
    (tmp_path / "inner" / "outside.distcp").write_bytes((directory / "__0_0.distcp").read_bytes())

    def escape(info: _StorageInfo) -> None:
        info.relative_path = "../outside.distcp"

    rewrite_storage(directory, escape)
    with pytest.raises(CorruptFileError, match="escapes"):
        modelport.open(directory)
    link = directory / "link.distcp"
    link.symlink_to(tmp_path / "inner" / "outside.distcp")

    def through_link(info: _StorageInfo) -> None:
        info.relative_path = "link.distcp"

    rewrite_storage(directory, through_link)
    with pytest.raises(CorruptFileError, match="escapes"):
        modelport.open(directory)


def test_lying_lengths_and_truncation(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    save({"w": torch.ones(3), "n": 1}, directory)
    data = directory / "__0_0.distcp"
    original = data.read_bytes()
    data.write_bytes(original[: len(original) // 2])
    with pytest.raises(TruncatedFileError):
        modelport.open(directory)
    data.write_bytes(original)

    def longer(info: _StorageInfo) -> None:
        info.length += 10_000

    rewrite_storage(directory, longer)
    with pytest.raises(TruncatedFileError):
        modelport.open(directory)


def test_garbage_metadata(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    save({"w": torch.ones(3)}, directory)
    meta = (directory / ".metadata").read_bytes()
    for cut in (2, len(meta) // 3, len(meta) - 1):
        (directory / ".metadata").write_bytes(meta[:cut])
        with pytest.raises(ModelportError):
            modelport.open(directory)
    (directory / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CorruptFileError, match="Metadata"):
        modelport.open(directory)


def test_malicious_bytes_item_is_never_run(tmp_path: Path, marker: Path) -> None:
    directory = tmp_path / "ck"
    save({"w": torch.ones(3), "n": 1}, directory)
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    (directory / "evil.distcp").write_bytes(evil.getvalue())

    def redirect(info: _StorageInfo) -> None:
        if info.length != 1577:  # the bytes item, not the tensor
            info.relative_path, info.offset, info.length = "evil.distcp", 0, len(evil.getvalue())

    rewrite_storage(directory, redirect)
    with modelport.open(directory) as model:
        assert "os.system" in str(model.details["bytes_entries"]["n"])
    assert not marker.exists()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dcp_small") / "ck"
    save({"w": torch.arange(6.0), "n": 1}, directory)
    return directory


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from([".metadata", "__0_0.distcp"]),
    cut=st.integers(min_value=0, max_value=3000),
    flips=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), max_size=4),
)
def test_mutations_only_raise_modelport_errors(
    small_checkpoint: Path, tmp_path: Path, which: str, cut: int, flips: list[tuple[int, int]]
) -> None:
    directory = tmp_path / "mutated"
    directory.mkdir(exist_ok=True)
    for name in (".metadata", "__0_0.distcp"):
        (directory / name).write_bytes((small_checkpoint / name).read_bytes())
    data = bytearray((small_checkpoint / which).read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    (directory / which).write_bytes(bytes(data[: max(1, len(data) - cut % len(data))]))
    # where DCP's own reader finds the items of the undamaged checkpoint
    items = FileSystemReader(small_checkpoint).read_metadata().storage_data.values()
    segments = sorted((item.offset, item.length) for item in items)
    assert [item.relative_path for item in items] == ["__0_0.distcp"] * 2
    assert_typed_error_or_whole(directory, pickles=dcp_pickles_parse(segments))
