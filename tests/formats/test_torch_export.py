"""torch.export archives (.pt2), with torch.export.load(...).state_dict as the oracle."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import modelport
from modelport.errors import ModelportError
from tests.conftest import digest, torch_digest
from tests.models import TiedLM, TinyResNet, dtype_zoo
from tests.mutation import (
    assert_typed_error_or_whole,
    damage,
    zip_pickles_parse,
)

Members = dict[str, bytes]


def export_to(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> Path:
    torch.export.save(torch.export.export(model, args), path)
    return path


def assert_same(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    assert list(found) == list(expected)
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype, name
        assert tuple(found[name].shape) == tuple(tensor.shape), name
        assert torch_digest(found[name]) == torch_digest(tensor), name


def assert_matches_export(path: Path) -> torch.export.ExportedProgram:
    """modelport.load gives exactly the loaded program's state_dict; constants lie aside."""
    program = torch.export.load(path)
    assert_same(dict(program.state_dict), modelport.load(path))
    with modelport.open(path) as model:
        assert model.format.value == "torch-export"
        constants = {
            name[len("constants.") :]: ref.torch()
            for name, ref in model.tensors.items()
            if name.startswith("constants.")
        }
        assert_same({k: v for k, v in program.constants.items()}, constants)
        for name, ref in model.tensors.items():
            if name in program.state_dict:
                tensor = program.state_dict[name]
            elif name.startswith("constants."):
                tensor = program.constants[name.removeprefix("constants.")]
            else:
                continue
            if ref.dtype in ("float32", "int64", "int32", "bool") and ref.numel:
                assert digest(ref.numpy()) == digest(tensor.detach().contiguous().numpy())
    return program


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, tensor in dtype_zoo().items():
            self.register_buffer(name, tensor)
        self.register_buffer("transient", torch.ones(2), persistent=False)
        self.weight = nn.Parameter(torch.randn(2, 2).bfloat16())
        self.offset = torch.arange(2.0)  # a plain tensor attribute: a lifted constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset + self.transient + self.weight.float().sum()


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pt2")
    return {
        "resnet": export_to(TinyResNet(), (torch.randn(1, 3, 8, 8),), folder / "resnet.pt2"),
        "tied": export_to(TiedLM(), (torch.tensor([[1, 2, 3]]),), folder / "tied.pt2"),
        "zoo": export_to(Zoo(), (torch.randn(2),), folder / "zoo.pt2"),
    }


def test_exported_resnet(archives: dict[str, Path]) -> None:
    path = archives["resnet"]
    program = assert_matches_export(path)
    assert "scratch" in program.constants  # a non-persistent buffer is a constant
    report = modelport.inspect(path)
    assert report.format == "torch-export"
    assert report.weights_source == ""  # the state_dict's names, as the program gives them
    # the program's parameters: not its lifted constants, nor its buffers
    assert report.parameters == sum(p.numel() for p in program.parameters())
    names = [t.name for t in report.tensors]
    assert "layer1.0.bn1.num_batches_tracked" in names
    assert "constants.scratch" in names
    summary = report.details["programs"]["model"]
    assert summary["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 3, 8, 8]}]
    assert summary["outputs"][0]["shape"] == [1, 10]
    assert summary["op_counts"]["torch.ops.aten.conv2d.default"] == 5
    assert summary["input_kinds"]["parameter"] == sum(1 for _ in TinyResNet().parameters())
    assert report.details["archive_format"] == "pt2"
    with modelport.open(path) as model:  # zero-copy: each tensor is a range of the file
        assert all(ref.byte_range() is not None for ref in model.tensors.values())
    json.dumps(report.to_json())


def test_tied_weights_share_storage_like_torch(archives: dict[str, Path]) -> None:
    path = archives["tied"]
    program = assert_matches_export(path)
    expected = program.state_dict
    assert expected["head.weight"].data_ptr() == expected["embed.weight"].data_ptr()
    loaded = modelport.load(path)
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    groups = [sorted(g) for g in modelport.inspect(path).aliases]
    assert ["embed.weight", "head.weight"] in groups


def test_dtypes_views_and_constants(archives: dict[str, Path]) -> None:
    path = archives["zoo"]
    program = assert_matches_export(path)
    assert {"bf16", "fp8", "scalar", "empty", "transposed", "weight"} <= set(program.state_dict)
    assert set(program.constants) == {"offset", "transient"}
    with modelport.open(path) as model:
        assert model.tensors["transposed"].strides == (1, 4)


def test_renamed_file_is_detected_by_content(archives: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(archives["tied"].read_bytes())
    report = modelport.inspect(path)
    assert report.format == "torch-export"
    assert any("extension .pt" in w for w in report.warnings)


# -- archives rewritten by hand -------------------------------------------------------------------
def rewrite(source: Path, target: Path, change: Callable[[Members, str], None]) -> Path:
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    change(members, source.stem)
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def _config(members: Members, prefix: str) -> dict[str, dict[str, object]]:
    key = f"{prefix}/data/weights/model_weights_config.json"
    config: dict[str, dict[str, object]] = json.loads(members[key])["config"]
    return config


def _set_config(members: Members, prefix: str, config: dict[str, dict[str, object]]) -> None:
    key = f"{prefix}/data/weights/model_weights_config.json"
    members[key] = json.dumps({"config": config}).encode()


def test_pickled_payload_is_read_without_torch_load(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    """Tensor subclasses are stored as a torch.save blob (use_pickle)."""
    original = torch.export.load(archives["tied"]).state_dict["body.weight"]

    def pickle_one(members: Members, prefix: str) -> None:
        config = _config(members, prefix)
        meta = config["body.weight"]
        buffer = io.BytesIO()
        torch.save(nn.Parameter(original.detach().clone()), buffer)
        members[f"{prefix}/data/weights/pickled_0"] = buffer.getvalue()
        meta.update(path_name="pickled_0", use_pickle=True)
        _set_config(members, prefix, config)

    path = rewrite(archives["tied"], tmp_path / "tied.pt2", pickle_one)
    assert_matches_export(path)


def test_legacy_payload_files(archives: dict[str, Path], tmp_path: Path) -> None:
    """Older archives hold data/weights/model.pt: a torch.save of the whole state_dict."""
    program = torch.export.load(archives["zoo"])

    def legacy(members: Members, prefix: str) -> None:
        for name in [n for n in members if "/data/weights/" in n or "/data/constants/" in n]:
            del members[name]
        for folder, values in (("weights", program.state_dict), ("constants", program.constants)):
            buffer = io.BytesIO()
            torch.save(dict(values), buffer)
            members[f"{prefix}/data/{folder}/model.pt"] = buffer.getvalue()

    path = rewrite(archives["zoo"], tmp_path / "zoo.pt2", legacy)
    assert_matches_export(path)
    assert modelport.inspect(path).details["legacy_payloads"] == [
        "zoo/data/weights/model.pt",
        "zoo/data/constants/model.pt",
    ]


def _lie(archives: dict[str, Path], tmp_path: Path, field: str, value: object) -> Path:
    def change(members: Members, prefix: str) -> None:
        config = _config(members, prefix)
        meta = config["body.weight"]
        if field == "path_name":
            meta["path_name"] = value
        else:
            tensor_meta = meta["tensor_meta"]
            assert isinstance(tensor_meta, dict)
            tensor_meta[field] = value
        _set_config(members, prefix, config)

    return rewrite(archives["tied"], tmp_path / f"lie_{field}.pt2", change)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sizes", [{"as_int": 1 << 20}, {"as_int": 16}]),
        ("sizes", [{"as_expr": {"expr_str": "s0"}}, {"as_int": 16}]),
        ("storage_offset", {"as_int": 10_000}),
        ("dtype", 99),
        ("dtype", 5),  # int64: twice the bytes the file holds
        ("layout", 1),
        ("path_name", "weight_999"),
        ("path_name", "../escape"),
    ],
)
def test_lying_configs_are_refused(
    archives: dict[str, Path], tmp_path: Path, field: str, value: object
) -> None:
    path = _lie(archives, tmp_path, field, value)
    with pytest.raises(ModelportError):
        for ref in modelport.open(path).tensors.values():
            ref.numpy()


def test_truncated_archives_fail_cleanly(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["tied"].read_bytes()
    for n in (10, 100, len(data) // 2, len(data) - 30, len(data) - 1):
        path = tmp_path / f"cut{n}.pt2"
        path.write_bytes(data[:n])
        with pytest.raises(ModelportError):
            modelport.inspect(path)


def test_bad_json_is_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    def garble(members: Members, prefix: str) -> None:
        members[f"{prefix}/models/model.json"] = b"{not json"

    with pytest.raises(ModelportError):
        modelport.inspect(rewrite(archives["tied"], tmp_path / "bad.pt2", garble))


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_archives_only_raise_modelport_errors(
    archives: dict[str, Path], tmp_path: Path, data: st.DataObject
) -> None:
    intact = archives["tied"].read_bytes()
    path = tmp_path / "m.pt2"
    path.write_bytes(damage(data, intact, flips=6))
    assert_typed_error_or_whole(path, pickles=zip_pickles_parse, inspect=True, intact=intact)


SAMPLE_INPUTS = "data/sample_inputs/model.pt"


def _pt2_with(archive: Path, out: Path, payload: bytes, where: str) -> None:
    """``archive`` with ``payload`` as its sample inputs (``where="member"``), as the data.pkl
    of the torch zip stored there (``"zip"``), or as a new member ``extra/evil.pkl``."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            body = source.read(info)
            if info.filename.endswith(SAMPLE_INPUTS) and where == "member":
                body = payload
            elif info.filename.endswith(SAMPLE_INPUTS) and where == "zip":
                inner = zipfile.ZipFile(io.BytesIO(body))
                buffer = io.BytesIO()
                with zipfile.ZipFile(buffer, "w") as rebuilt:
                    for item in inner.infolist():
                        is_pickle = item.filename.endswith(".pkl")
                        rebuilt.writestr(item, payload if is_pickle else inner.read(item))
                body = buffer.getvalue()
            target.writestr(info, body)
        if where == "extra":
            target.writestr(f"{info.filename.split('/')[0]}/extra/evil.pkl", payload)


CUT_SHORT = pickle.dumps([torch.Size([1, 3])], protocol=2)[:-1]
CALLS_SYSTEM = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R."


@pytest.mark.parametrize(
    ("payload", "where", "parses", "verdict"),
    [
        pytest.param(CALLS_SYSTEM, "extra", True, "unsafe", id="calls-system-in-a-pkl-member"),
        pytest.param(CUT_SHORT, "extra", False, "error", id="cut-short-in-a-pkl-member"),
        pytest.param(
            CALLS_SYSTEM,
            "member",
            True,
            "unsafe",
            id="calls-system-as-sample-inputs",
        ),
        pytest.param(
            CALLS_SYSTEM,
            "zip",
            True,
            "unsafe",
            id="calls-system-in-sample-inputs-zip",
        ),
        pytest.param(
            CUT_SHORT,
            "zip",
            False,
            "error",
            id="cut-short-in-sample-inputs-zip",
        ),
    ],
)
def test_sample_input_pickles_are_scanned(
    archives: dict[str, Path],
    tmp_path: Path,
    payload: bytes,
    where: str,
    parses: bool,
    verdict: str,
) -> None:
    """Every pickle a .pt2 holds is scanned, the sample inputs' too. ``parses``: the stdlib
    oracle's answer (it counts pickles named *.pkl, in the archive or in zips within it)."""
    path = tmp_path / "m.pt2"
    _pt2_with(archives["tied"], path, payload, where)
    assert zip_pickles_parse(path) is parses
    assert modelport.scan(path).verdict == verdict
