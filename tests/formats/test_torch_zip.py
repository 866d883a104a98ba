"""torch zip checkpoints, with torch.load as the oracle."""

from __future__ import annotations

import struct
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import modelport
from modelport.errors import ModelportError
from tests.conftest import assert_same_tensors, torch_digest
from tests.models import TiedLM, TinyResNet, dtype_zoo, trained_checkpoint
from tests.mutation import assert_typed_error_or_whole, damage, zip_pickles_parse


def test_state_dict_of_a_resnet(tmp_path: Path) -> None:
    model = TinyResNet()
    path = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), path)
    assert_same_tensors(torch.load(path), path)
    report = modelport.inspect(path)
    assert report.format == "torch-zip"
    # parameters(), as torch counts them: the BatchNorm running statistics are buffers
    assert report.parameters == sum(p.numel() for p in model.parameters())
    assert "layer1.0.bn1.num_batches_tracked" in [t.name for t in report.tensors]
    assert report.weights_note == ""


def test_dtype_zoo_and_views(tmp_path: Path) -> None:
    path = tmp_path / "zoo.pt"
    zoo = dtype_zoo()
    torch.save(zoo, path)
    assert_same_tensors(torch.load(path), path)
    report = modelport.inspect(path)
    groups = {frozenset(g) for g in report.aliases}
    assert frozenset({"transposed", "sliced", "view_of_base", "base"}) in groups


def test_load_keeps_storage_sharing_like_torch(tmp_path: Path) -> None:
    model = TiedLM()
    path = tmp_path / "tied.bin"
    torch.save(model.state_dict(), path)
    expected = torch.load(path)
    loaded = modelport.load(path)
    assert list(loaded) == list(expected)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    for name in expected:
        assert torch.equal(loaded[name], expected[name])
    assert ["embed.weight", "head.weight"] in [sorted(g) for g in modelport.inspect(path).aliases]


def test_tied_weights_are_counted_once_in_bytes_by_dtype(tmp_path: Path) -> None:
    model = TiedLM(vocab=50, dim=16)
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    report = modelport.inspect(tmp_path / "tied.pt")
    stored = {id(t.untyped_storage()): t.nbytes for t in model.state_dict().values()}
    assert report.bytes_by_dtype == {"float32": sum(stored.values())}
    # the tied weight counts once, as model.parameters() yields it once
    assert report.to_json()["parameters"] == sum(p.numel() for p in model.parameters())


def test_training_checkpoint_tree_and_extras(tmp_path: Path) -> None:
    model = TinyResNet()
    checkpoint = trained_checkpoint(model, torch.randn(2, 3, 8, 8))
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    expected = torch.load(path)
    report = modelport.inspect(path)
    names = [t.name for t in report.tensors]
    assert "model_state_dict.fc.weight" in names
    assert "optimizer_state_dict.state.0.exp_avg" in names
    assert report.extras["epoch"] == 3
    assert report.extras["loss"] == pytest.approx(checkpoint["loss"])
    groups = report.extras["optimizer_state_dict"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(1e-3)
    assert groups[0]["params"] == expected["optimizer_state_dict"]["param_groups"][0]["params"]
    assert report.weights_source == "model_state_dict"
    loaded = modelport.load(path)
    assert list(loaded) == list(expected["model_state_dict"])
    for name, tensor in expected["model_state_dict"].items():
        assert torch.equal(loaded[name], tensor)


def test_whole_pickled_module_without_its_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = TinyResNet(classes=4)
            self.extra = nn.Parameter(torch.ones(3))
            self.register_buffer("persistent", torch.arange(3))
            self.register_buffer("transient", torch.zeros(1), persistent=False)

    # The class lives in a module that exists only while saving, as a user's project would.
    module = types.ModuleType("private_project_models")
    Hidden.__module__, Hidden.__qualname__ = module.__name__, "Hidden"
    module.Hidden = Hidden  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    model = Hidden()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    expected = model.state_dict()
    monkeypatch.delitem(sys.modules, module.__name__)

    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)
    loaded = modelport.load(path)
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert torch_digest(loaded[name]) == torch_digest(tensor), name
    report = modelport.inspect(path)
    assert report.weights_source == "module"
    assert report.modules is not None
    assert report.modules["class"] == "private_project_models.Hidden"
    assert report.modules["children"]["body"]["class"] == "tests.models.TinyResNet"
    stem = report.modules["children"]["body"]["children"]["stem"]
    assert stem["children"]["0"]["class"] == "torch.nn.modules.conv.Conv2d"
    assert "transient" not in [t.name for t in report.tensors]


def test_storages_saved_on_cuda_read_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cuda.pt"
    state = {"w": torch.randn(4, 4), "b": torch.arange(3)}
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(state, path)
    monkeypatch.undo()
    with pytest.raises(RuntimeError):
        torch.load(path)  # the reference fails without map_location on a CPU-only machine
    loaded = modelport.load(path)
    assert torch.equal(loaded["w"], state["w"])
    assert modelport.inspect(path).details["devices"] == ["cuda:0"]


def test_any_archive_prefix_and_file_object_saves(tmp_path: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"x": torch.ones(2)}, buffer)
    path = tmp_path / "weights.safetensors"  # a lying extension
    path.write_bytes(buffer.getvalue())
    report = modelport.inspect(path)
    assert report.format == "torch-zip"
    assert report.details["archive_prefix"] == "archive"
    assert any("extension .safetensors" in w for w in report.warnings)


def _truncations(data: bytes) -> list[bytes]:
    return [data[:n] for n in (10, 100, len(data) // 2, len(data) - 30, len(data) - 1)]


def test_truncated_archives_fail_cleanly(tmp_path: Path) -> None:
    source = tmp_path / "ok.pt"
    torch.save(TinyResNet().state_dict(), source)
    for i, chunk in enumerate(_truncations(source.read_bytes())):
        path = tmp_path / f"cut{i}.pt"
        path.write_bytes(chunk)
        with pytest.raises(ModelportError):
            modelport.inspect(path)


def test_storage_larger_than_its_record_is_refused(tmp_path: Path) -> None:
    """A pickle that claims more elements than the record holds must not read past it."""
    path = tmp_path / "lying.pt"
    torch.save({"w": torch.ones(4)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    members[pkl_name] = members[pkl_name].replace(
        b"K\x04t", b"J" + struct.pack("<i", 1 << 30) + b"t"
    )
    members[pkl_name] = members[pkl_name].replace(
        b"K\x04\x85", b"J" + struct.pack("<i", 1 << 30) + b"\x85"
    )
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(ModelportError):
        modelport.load(path)


def test_inspect_does_not_import_torch(tmp_path: Path) -> None:
    import json
    import subprocess

    path = tmp_path / "m.pt"
    model = TinyResNet()
    state = model.state_dict()
    torch.save(state, path)
    code = (
        "import json, sys\n"
        "{first}"
        "import modelport\n"
        "r = modelport.inspect(sys.argv[1])\n"
        "print(json.dumps({{'parameters': r.parameters, 'tensors': len(r.tensors), "
        "'torch': 'torch' in sys.modules}}))\n"
    )
    expected = {"parameters": sum(p.numel() for p in model.parameters()), "tensors": len(state)}
    for first, torch_loaded in (("", False), ("import torch\n", True)):  # and the control
        done = subprocess.run(
            [sys.executable, "-c", code.format(first=first), str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout.strip().splitlines()[-1])
        assert printed == {**expected, "torch": torch_loaded}, (first, printed)


_SMALL_ARCHIVE: list[bytes] = []


def _small_archive() -> bytes:
    if not _SMALL_ARCHIVE:
        import io

        buffer = io.BytesIO()
        torch.save({"w": torch.arange(6.0).reshape(2, 3), "n": 3, "b": torch.ones(2)}, buffer)
        _SMALL_ARCHIVE.append(buffer.getvalue())
    return _SMALL_ARCHIVE[0]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_archives_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(damage(data, _small_archive(), flips=6))
    assert_typed_error_or_whole(path, pickles=zip_pickles_parse, intact=_small_archive())
