"""TorchScript archives, with torch.jit.load(...).state_dict() as the oracle."""

from __future__ import annotations

import io
import re
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import modelport
from modelport.errors import ModelportError, UnsupportedVersionError
from modelport.formats.torchscript import parse_classes
from tests.conftest import digest, torch_digest
from tests.models import TiedLM, TinyResNet, dtype_zoo
from tests.mutation import assert_typed_error_or_whole, damage, zip_pickles_parse


def assert_matches_jit(path: Path) -> dict[str, torch.Tensor]:
    """modelport must list exactly torch.jit.load(path).state_dict(): names, order, bytes."""
    expected = torch.jit.load(path).state_dict()
    with modelport.open(path) as model:
        assert model.format.value == "torchscript"
        assert list(model.tensors) == list(expected)
        for name, tensor in expected.items():
            ref = model.tensors[name]
            assert ref.dtype == str(tensor.dtype).removeprefix("torch."), name
            assert ref.shape == tuple(tensor.shape), name
            assert torch_digest(ref.torch()) == torch_digest(tensor), name
            if tensor.dtype in (torch.float32, torch.int64, torch.int32, torch.bool):
                assert digest(ref.numpy()) == digest(tensor.contiguous().numpy()), name
    loaded = modelport.load(path)
    assert list(loaded) == list(expected)
    return dict(expected)


class Zoo(nn.Module):
    """Buffers of every interesting kind, a parameter, and tensors that are neither."""

    def __init__(self) -> None:
        super().__init__()
        for name, tensor in dtype_zoo().items():
            self.register_buffer(name, tensor)
        self.register_buffer("skipped", torch.ones(2), persistent=False)
        self.weight = nn.Parameter(torch.randn(3, 2).bfloat16())
        self.plain = torch.arange(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.plain.sum() + self.skipped.sum()


def test_scripted_resnet(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.jit.script(TinyResNet()).save(str(path))
    expected = assert_matches_jit(path)
    assert "scratch" in expected  # TorchScript lists non-persistent buffers too
    report = modelport.inspect(path)
    assert report.format == "torchscript"
    # parameters() and the one buffer whose name does not say it is one ("scratch")
    parameters = sum(p.numel() for p in TinyResNet().parameters())
    assert report.parameters == parameters + expected["scratch"].numel()
    tracked = {t.name: t for t in report.tensors}["layer1.0.bn1.num_batches_tracked"]
    assert (tracked.dtype, tracked.shape) == ("int64", ())
    assert report.modules is not None
    assert _unmangled(report.modules["class"]) == "__torch__.tests.models.TinyResNet"
    stem = report.modules["children"]["stem"]
    assert _unmangled(stem["class"]) == "__torch__.torch.nn.modules.container.Sequential"
    assert _unmangled(stem["children"]["0"]["class"]) == "__torch__.torch.nn.modules.conv.Conv2d"
    code_files = {re.sub(r"/___torch_mangle_\d+(?=\.py$)", "", f) for f in report.code_files}
    assert "resnet/code/__torch__/tests/models.py" in code_files
    assert report.weights_source == ""
    assert report.to_json()["details"]["archive_prefix"] == "resnet"
    with modelport.open(path) as model:  # zero-copy: each tensor is a range of the file
        assert all(ref.byte_range() is not None for ref in model.tensors.values())


def test_traced_resnet_and_its_constants(tmp_path: Path) -> None:
    class WithConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyResNet(classes=3)
            self.offset = torch.arange(3.0)  # traced into constants.pkl

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) + self.offset

    path = tmp_path / "traced.pt"
    traced = torch.jit.trace(WithConstant().eval(), torch.randn(1, 3, 8, 8))
    traced.save(str(path))
    expected = assert_matches_jit(path)
    assert all(name.startswith("net.") for name in expected)
    report = modelport.inspect(path)
    assert report.details["constants"] == [{"name": "c0", "dtype": "float32", "shape": [3]}]
    with modelport.open(path) as model:
        assert any("CONSTANTS.c0" in text for text in model.code.values())


def test_tied_weights_share_storage_like_torch(tmp_path: Path) -> None:
    path = tmp_path / "tied.torchscript"
    torch.jit.script(TiedLM()).save(str(path))
    expected = assert_matches_jit(path)
    assert expected["head.weight"].data_ptr() == expected["embed.weight"].data_ptr()
    loaded = modelport.load(path)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert ["embed.weight", "head.weight"] in [sorted(g) for g in modelport.inspect(path).aliases]


def test_dtypes_views_and_plain_attributes(tmp_path: Path) -> None:
    path = tmp_path / "zoo.pt"
    torch.jit.script(Zoo()).save(str(path))
    expected = assert_matches_jit(path)
    assert {"bf16", "fp8", "scalar", "empty", "transposed", "weight", "skipped"} <= set(expected)
    report = modelport.inspect(path)
    assert report.details["tensor_attributes"] == ["plain"]
    groups = {frozenset(g) for g in report.aliases}
    assert frozenset({"transposed", "sliced", "view_of_base", "base"}) in groups


def test_lists_dicts_and_submodule_containers(tmp_path: Path) -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = {"a": 1}
            self.sizes = [1, 2]
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2, bias=False)])
            self.named = nn.ModuleDict({"first": nn.Conv1d(1, 1, 1)})
            self.shared = self.blocks[0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(x) + self.table["a"] + self.sizes[0]

    path = tmp_path / "holder.pt"
    scripted = torch.jit.script(Holder())
    torch.jit.save(scripted, str(path), _extra_files={"notes.txt": "made in a test"})
    expected = assert_matches_jit(path)
    assert "shared.weight" in expected and "blocks.1.weight" in expected
    report = modelport.inspect(path)
    assert report.metadata == {"notes.txt": "made in a test"}
    # torch.jit._pickle helpers (restore_type_tag, build_intlist) are allowlisted identities
    from modelport.formats.protocol import Probe
    from modelport.formats.torch_zip import load_archive_pickle

    root, _ = load_archive_pickle(Probe.of(path).zip, "holder", "data.pkl", path)
    assert root.attributes()["table"] == {"a": 1}
    assert root.attributes()["sizes"] == [1, 2]


def test_lite_interpreter_archive(tmp_path: Path) -> None:
    path = tmp_path / "mobile.ptl"
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lite interpreter is deprecated
        scripted._save_for_lite_interpreter(str(path))
    assert_matches_jit(path)
    assert modelport.inspect(path).details["mobile_bytecode"] is True


def test_renamed_file_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    report = modelport.inspect(path)
    assert report.format == "torchscript"
    assert any("extension .onnx" in w for w in report.warnings)


def test_plain_torch_save_is_not_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    assert modelport.inspect(path).format == "torch-zip"


def test_code_declarations_are_parsed_as_text() -> None:
    code = (
        "class Net(Module):\n"
        '  __parameters__ = ["weight", "bias", ]\n'
        '  __buffers__ = ["running_mean", ]\n'
        "  weight : Tensor\n"
        "  def forward(self: __torch__.Net) -> None:\n"
        '    __parameters__ = ["not", "a", "declaration"]\n'
        "    return None\n"
        "def helper(x: int) -> int:\n"
        "  return x\n"
        "class Point(NamedTuple):\n"
        "  x : int\n"
    )
    classes = parse_classes("__torch__.m", code)
    net = classes["__torch__.m.Net"]
    assert net.is_module
    assert net.parameters == {"weight", "bias"} and net.buffers == {"running_mean"}
    assert not classes["__torch__.m.Point"].is_module


def _rewrite(source: Path, target: Path, change: dict[str, bytes | None]) -> None:
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    for name, data in change.items():
        if data is None:
            members.pop(name, None)
        else:
            members[name] = data
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_archive_without_data_pkl_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "m.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(source))
    old = tmp_path / "old.pt"
    _rewrite(source, old, {"m/data.pkl": None, "m/model.json": b"{}"})
    with pytest.raises(UnsupportedVersionError):
        modelport.inspect(old)
    broken = tmp_path / "broken.pt"
    _rewrite(source, broken, {"m/data.pkl": None})
    with pytest.raises(ModelportError):
        modelport.inspect(broken)


def test_truncated_archives_fail_cleanly(tmp_path: Path) -> None:
    source = tmp_path / "m.pt"
    torch.jit.script(TinyResNet()).save(str(source))
    data = source.read_bytes()
    for n in (10, 100, len(data) // 2, len(data) - 30, len(data) - 1):
        path = tmp_path / f"cut{n}.pt"
        path.write_bytes(data[:n])
        with pytest.raises(ModelportError):
            modelport.inspect(path)


def test_storage_larger_than_its_record_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "m.pt"
    torch.jit.script(nn.Linear(4, 1, bias=False)).save(str(source))
    with zipfile.ZipFile(source) as archive:
        pickled = archive.read("m/data.pkl")
    lying = pickled.replace(b"K\x04t", b"J" + struct.pack("<i", 1 << 30) + b"t", 1)
    assert lying != pickled
    path = tmp_path / "lying.pt"
    _rewrite(source, path, {"m/data.pkl": lying})
    with pytest.raises(ModelportError):
        modelport.load(path)


def _small_archive() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(3, 2)), buffer)
    return buffer.getvalue()


_SMALL = _small_archive()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_archives_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(damage(data, _SMALL, flips=6))
    assert_typed_error_or_whole(path, pickles=zip_pickles_parse, intact=_SMALL)


def _unmangled(name: str) -> str:
    """A class name without the ``___torch_mangle_N.`` torch adds when a class is scripted
    a second time in one process (other tests script the same classes)."""
    return re.sub(r"___torch_mangle_\d+\.", "", name)
