"""torch's legacy (pre-1.6) checkpoints and 0.x tar archives, with torch.load as the oracle."""

from __future__ import annotations

import io
import pickle
import struct
import sys
import tarfile
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import modelport
from modelport.errors import CorruptFileError, ModelportError, TruncatedFileError
from tests.conftest import assert_same_tensors, torch_digest
from tests.models import TiedLM, TinyResNet, dtype_zoo, trained_checkpoint
from tests.mutation import assert_typed_error_or_whole, damage, legacy_torch_pickles_parse

MAGIC = 0x1950A86A20F9469CFC6C


def save_legacy(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False, **kwargs)
    return path


def assert_legacy_tensors(expected: dict[str, torch.Tensor], path: Path) -> None:
    assert_same_tensors(dict(expected), path, "torch-legacy")


def legacy_zoo() -> dict[str, torch.Tensor]:
    # torch itself cannot write float8 storages in the legacy format
    return {k: v for k, v in dtype_zoo().items() if not k.startswith("fp8")}


def test_state_dict_of_a_resnet(tmp_path: Path) -> None:
    model = TinyResNet()
    path = save_legacy(model.state_dict(), tmp_path / "resnet.pth")
    expected = torch.load(path)
    assert_legacy_tensors(expected, path)
    report = modelport.inspect(path)
    assert report.format == "torch-legacy"
    assert report.parameters == sum(p.numel() for p in model.parameters())  # not its buffers
    tracked = {t.name: t for t in report.tensors}["layer1.0.bn1.num_batches_tracked"]
    assert (tracked.dtype, tracked.shape) == ("int64", ())
    assert report.details["layout"] == "stream"
    with modelport.open(path) as model:  # zero-copy: each tensor is a range of the file
        ranges = [ref.byte_range() for ref in model.tensors.values()]
        assert all(r is not None and r[0] + r[1] <= path.stat().st_size for r in ranges)
    assert report.details["sys_info"]["little_endian"] is True
    as_json = report.to_json()
    assert as_json["format"] == "torch-legacy"
    assert as_json["tensors"][0] == {
        "name": "stem.0.weight",
        "dtype": "float32",
        "shape": [8, 3, 3, 3],
        "nbytes": 8 * 3 * 3 * 3 * 4,
    }


def test_dtype_zoo_views_and_aliases(tmp_path: Path) -> None:
    path = save_legacy(legacy_zoo(), tmp_path / "zoo.pt")
    assert_legacy_tensors(torch.load(path), path)
    groups = {frozenset(g) for g in modelport.inspect(path).aliases}
    assert frozenset({"transposed", "sliced", "view_of_base", "base"}) in groups


@pytest.mark.parametrize("protocol", [1, 2, 4, 5])
def test_every_pickle_protocol(tmp_path: Path, protocol: int) -> None:
    zoo = {k: v for k, v in legacy_zoo().items() if k in ("f32", "bf16", "i64", "scalar", "base")}
    path = save_legacy(zoo, tmp_path / f"p{protocol}.pt", pickle_protocol=protocol)
    # torch's weights-only unpickler has no protocol-1 LONG opcode; this file is ours
    assert_legacy_tensors(torch.load(path, weights_only=False), path)


def test_tied_weights_share_storage_like_torch(tmp_path: Path) -> None:
    path = save_legacy(TiedLM().state_dict(), tmp_path / "tied.bin")
    expected = torch.load(path)
    assert expected["head.weight"].data_ptr() == expected["embed.weight"].data_ptr()
    loaded = modelport.load(path)
    assert list(loaded) == list(expected)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    for name in expected:
        assert torch.equal(loaded[name], expected[name])
    assert ["embed.weight", "head.weight"] in [sorted(g) for g in modelport.inspect(path).aliases]


def test_training_checkpoint(tmp_path: Path) -> None:
    checkpoint = trained_checkpoint(TinyResNet(), torch.randn(2, 3, 8, 8))
    path = save_legacy(checkpoint, tmp_path / "ckpt.ckpt")
    expected = torch.load(path)
    report = modelport.inspect(path)
    names = [t.name for t in report.tensors]
    assert "model_state_dict.fc.weight" in names
    assert "optimizer_state_dict.state.0.exp_avg_sq" in names
    assert report.extras["epoch"] == 3
    assert report.extras["loss"] == pytest.approx(checkpoint["loss"])
    assert report.extras["optimizer_state_dict"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert report.weights_source == "model_state_dict"
    loaded = modelport.load(path)
    assert list(loaded) == list(expected["model_state_dict"])
    for name, tensor in expected["model_state_dict"].items():
        assert torch_digest(loaded[name]) == torch_digest(tensor), name
    with modelport.open(path) as model:
        state = expected["optimizer_state_dict"]["state"][0]["exp_avg"]
        assert torch.equal(model.tensors["optimizer_state_dict.state.0.exp_avg"].torch(), state)


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

    module = types.ModuleType("private_legacy_models")
    Hidden.__module__, Hidden.__qualname__ = module.__name__, "Hidden"
    module.Hidden = Hidden  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    model = Hidden()
    path = tmp_path / "whole.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch cannot find Hidden's source: it warns
        save_legacy(model, path)
    expected = model.state_dict()
    monkeypatch.delitem(sys.modules, module.__name__)

    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)
    loaded = modelport.load(path)
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch_digest(loaded[name]) == torch_digest(tensor), name
    report = modelport.inspect(path)
    assert report.weights_source == "module"
    assert report.modules is not None
    assert report.modules["class"] == "private_legacy_models.Hidden"
    assert report.modules["children"]["body"]["class"] == "tests.models.TinyResNet"
    assert "transient" not in [t.name for t in report.tensors]
    with modelport.open(path) as opened:  # class sources torch saved are text, never run
        assert "class TinyResNet" in opened.code["tests.models.TinyResNet"]
        assert "private_legacy_models.Hidden" not in opened.code


def test_renamed_file_is_detected_by_content(tmp_path: Path) -> None:
    path = save_legacy({"w": torch.ones(2)}, tmp_path / "weights.safetensors")
    report = modelport.inspect(path)
    assert report.format == "torch-legacy"
    assert any("extension .safetensors" in w for w in report.warnings)


def test_plain_pickles_are_not_claimed(tmp_path: Path) -> None:
    from modelport.formats import torch_legacy
    from modelport.formats.protocol import Probe

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    assert not torch_legacy.sniff(Probe.of(path))
    path.write_bytes(pickle.dumps(MAGIC + 1))
    assert not torch_legacy.sniff(Probe.of(path))
    path.write_bytes(pickle.dumps(MAGIC, protocol=2))
    assert torch_legacy.sniff(Probe.of(path))
    with pytest.raises(ModelportError):
        modelport.inspect(path)  # the magic number alone: the rest is missing


# -- hand-written layouts torch still reads -------------------------------------------------------
class _StorageId:
    """Stands in for a storage: the pickler writes it as the persistent id it carries."""

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


class _Rebuild:
    """Pickles as torch does a tensor: ``_rebuild_tensor_v2(storage, offset, size, stride)``."""

    def __init__(self, *args: Any) -> None:
        self.args = (*args, False, OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


def _legacy_stream(
    entries: dict[str, tuple[Any, ...]], storages: list[tuple[str, bytes, int]]
) -> bytes:
    """A legacy stream whose storages (and views, via view_metadata) are written by hand."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return obj.pid if isinstance(obj, _StorageId) else None

    out = io.BytesIO()
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    for value in (MAGIC, 1001, info):
        pickle.dump(value, out, protocol=2)
    tree = OrderedDict(
        (name, _Rebuild(_StorageId(pid), offset, size, stride))
        for name, (pid, offset, size, stride) in entries.items()
    )
    Pickler(out, protocol=2).dump(tree)
    pickle.dump([key for key, _, _ in storages], out, protocol=2)
    for _, data, numel in storages:
        out.write(struct.pack("<q", numel) + data)
    return out.getvalue()


def test_the_scan_reads_a_first_pickle_only_as_far_as_the_magic_number_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``is_magic_number`` (the scan's test of a stream's first pickle) reads under sniff's
    limits: torch's magic pickle in every protocol passes, and a whole model's pickle is
    given up after a few opcodes, its arrays never built (nor numpy imported for them)."""
    from modelport.formats import torch_legacy
    from modelport.pickles import numpy_types

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert torch_legacy.is_magic_number(pickle.dumps(MAGIC, protocol=protocol))
    assert not torch_legacy.is_magic_number(pickle.dumps(MAGIC + 1))

    def no_arrays(*args: object) -> None:
        raise AssertionError("an array was built")

    monkeypatch.setattr(numpy_types, "build_array", no_arrays)
    model = {"config": list(range(40)), "weight": np.ones(3, np.float32)}
    assert not torch_legacy.is_magic_number(pickle.dumps(model, protocol=2))


def test_storage_views_in_the_stream_layout(tmp_path: Path) -> None:
    root = torch.arange(10, dtype=torch.float32)
    view = ("storage", torch.FloatStorage, "root", "cpu", 10, ("view", 4, 6))
    entries = {
        "whole": (("storage", torch.FloatStorage, "root", "cpu", 10, None), 0, (2, 5), (5, 1)),
        "view": (view, 1, (2, 2), (1, 2)),
    }
    path = tmp_path / "views.pt"
    path.write_bytes(_legacy_stream(entries, [("root", root.numpy().tobytes(), 10)]))
    expected = torch.load(path, weights_only=False)
    assert torch.equal(expected["view"], torch.tensor([[5.0, 7.0], [6.0, 8.0]]))
    assert_legacy_tensors(expected, path)
    assert modelport.inspect(path).details["storages"] == 1


def write_legacy_tar(
    path: Path, tensors: dict[str, tuple[str, int, tuple[int, ...], tuple[int, ...]]]
) -> None:
    """The torch 0.1-0.3 tar layout, by hand: one float storage of 12 elements (key 1), a view
    of 4 of them at element 6 (key 2), and tensors (name -> storage key, offset, size, stride)."""
    base = torch.arange(12, dtype=torch.float32)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return obj.pid if isinstance(obj, _StorageId) else None

    objects = OrderedDict((name, _StorageId(str(100 + i))) for i, name in enumerate(tensors))
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(objects)
    object_pickle = buffer.getvalue()

    records = io.BytesIO()
    pickle.dump(len(tensors), records, protocol=2)
    for i, (storage_key, offset, size, stride) in enumerate(tensors.values()):
        pickle.dump((100 + i, storage_key, torch.FloatTensor), records, protocol=2)
        records.write(struct.pack("<i", len(size)) + b"\0" * 4)
        records.write(
            struct.pack(f"<{len(size)}q", *size) + struct.pack(f"<{len(stride)}q", *stride)
        )
        records.write(struct.pack("<q", offset))

    storages = io.BytesIO()
    pickle.dump(1, storages, protocol=2)
    pickle.dump((1, "cpu", torch.FloatStorage), storages, protocol=2)
    storages.write(struct.pack("<q", 12) + base.numpy().tobytes())
    pickle.dump([(2, 1, 6, 4)], storages, protocol=2)

    info = pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("sys_info", info),
            ("pickle", object_pickle),
            ("tensors", records.getvalue()),
            ("storages", storages.getvalue()),
        ):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_torch_0x_tar_layout(tmp_path: Path) -> None:
    path = tmp_path / "old.tar"
    write_legacy_tar(
        path,
        {
            "matrix": (1, 0, (3, 4), (4, 1)),
            "transposed": (1, 0, (4, 3), (1, 4)),
            "row": (1, 4, (4,), (1,)),
            "on_view": (2, 1, (3,), (1,)),
        },
    )
    expected = torch.load(path, weights_only=False)
    assert torch.equal(expected["on_view"], torch.tensor([7.0, 8.0, 9.0]))
    assert_legacy_tensors(expected, path)
    report = modelport.inspect(path)
    assert report.details["layout"] == "tar"
    assert {"matrix", "transposed", "row"} <= set(report.aliases[0])


def test_tar_with_missing_member_or_bad_storage(tmp_path: Path) -> None:
    path = tmp_path / "old.tar"
    write_legacy_tar(path, {"m": (1, 0, (3, 4), (4, 1))})
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        end = max(m.offset_data + m.size for m in tar.getmembers())
    for n in (100, 600, end // 2, end - 1):  # tar pads its end with zeros: cut before that
        cut = tmp_path / f"cut{n}.tar"
        cut.write_bytes(data[:n])
        with pytest.raises(ModelportError):
            modelport.load(cut)
    lying = tmp_path / "lying.tar"
    lying.write_bytes(data.replace(struct.pack("<q", 12), struct.pack("<q", 1 << 40), 1))
    with pytest.raises(ModelportError):
        modelport.load(lying)
    outside = tmp_path / "outside.tar"
    write_legacy_tar(outside, {"m": (2, 0, (3, 4), (4, 1))})  # 12 elements on a 4-element view
    with pytest.raises(CorruptFileError):
        modelport.open(outside)


# -- malformed ------------------------------------------------------------------------------------
def _small() -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {"w": torch.arange(6.0).reshape(2, 3), "n": 3, "b": torch.ones(2, dtype=torch.int64)},
        buffer,
        _use_new_zipfile_serialization=False,
    )
    return buffer.getvalue()


def test_truncated_files_fail_cleanly(tmp_path: Path) -> None:
    data = _small()
    for n in (1, 10, 16, 40, 200, len(data) // 2, len(data) - 40, len(data) - 1):
        path = tmp_path / f"cut{n}.pt"
        path.write_bytes(data[:n])
        with pytest.raises(ModelportError), modelport.open(path) as model:
            for ref in model.tensors.values():
                ref.numpy()


def test_lying_element_counts(tmp_path: Path) -> None:
    data = _small()
    count_at = len(data) - (8 + 16) - (8 + 24)  # storages are sorted by key, sizes 2 and 6
    first = struct.unpack("<q", data[count_at : count_at + 8])[0]
    assert first in (2, 6)
    for lie in (first + 1, first - 1, -1, 1 << 60):
        path = tmp_path / "lying.pt"
        path.write_bytes(data[:count_at] + struct.pack("<q", lie) + data[count_at + 8 :])
        with pytest.raises(ModelportError):
            modelport.load(path)
    path = tmp_path / "short.pt"
    path.write_bytes(data[:-3])
    with pytest.raises(TruncatedFileError):
        modelport.load(path)


def test_numel_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    data = _small()
    lie = data.replace(b"K\x06N", b"J" + struct.pack("<i", 1 << 30) + b"N", 1)
    assert lie != data
    path = tmp_path / "numel.pt"
    path.write_bytes(lie)
    with pytest.raises(ModelportError):
        modelport.load(path)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(damage(data, _SMALL, flips=6))
    assert_typed_error_or_whole(path, pickles=legacy_torch_pickles_parse, intact=_SMALL)


_SMALL = _small()
