"""Training-output folders as DeepSpeed, Lightning and accelerate write them: what ``scan``
says of the files they carry beside the weights, and what ``inspect`` counts as parameters.

The folders are built the way ``tests/test_deepspeed_zero.py`` builds them (the engine's dicts
written with ``torch.save``); the DeepSpeed classes its optimizer files pickle are stood in by
classes of the same module path and shape, so the opcodes are DeepSpeed's. The heavy test
trains with DeepSpeed itself and checks the same on its own files. The oracles: ``pickle``
(what it raises on the ``latest`` tag file), ``nn.Module.parameters()`` (what a parameter
count counts) and ``torch.distributed.checkpoint`` (what accelerate saves).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import pickle
import shutil
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import modelport
from modelport.pickles.judging import Severity
from modelport.scanning.content_kinds import is_text_not_pickle
from modelport.scanning.findings import FileReport, ScanReport
from tests.conftest import torch_digest
from tests.test_deepspeed_zero import (
    checkpoint_root,
    lightning_checkpoint,
    train,
    write_stage3,
    write_stage12,
)


def files_of(report: ScanReport) -> dict[str, FileReport]:
    return {Path(file.path).name: file for file in report.files}


def findings_of(report: ScanReport) -> list[tuple[str, str, str]]:
    """(severity, rule, what) of every finding: the global a pickle names, else the member."""
    return sorted(
        (f.severity.value, f.rule, f.global_name or f.member)
        for file in report.files
        for f in file.findings
    )


# -- the ``latest`` tag file --------------------------------------------------------------


@pytest.mark.parametrize("tag", ["checkpoint", "checkpoint\n", "cut\ncut", "Copyright 2025"])
def test_a_tag_file_is_text_that_pickle_cannot_read(tag: str) -> None:
    """``checkpoint`` (Lightning's tag) opens with GLOBAL by chance: pickle gives up inside
    its argument, having imported and called nothing."""
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(tag.encode())
    assert is_text_not_pickle(memoryview(tag.encode()))


@pytest.mark.parametrize(
    "blob",
    [
        pickle.dumps({"lr": 0.1, "layers": [1, 2]}, protocol=0),  # whole: reaches STOP
        pickle.dumps(OrderedDict(a=1), protocol=0)[:-2],  # cut after naming a global
        b"cos\nsystem\n(S'echo'\n",  # names a gadget, then cut
        b"\x80\x04K",  # binary
        b"c" + b"x" * 5000,  # longer than a tag file
    ],
)
def test_text_pickles_stay_pickles(blob: bytes) -> None:
    assert not is_text_not_pickle(memoryview(blob))


def test_lightning_deepspeed_folder_is_not_an_error(tmp_path: Path) -> None:
    ckpt, _ = lightning_checkpoint(tmp_path)
    assert (ckpt / "latest").read_text() == "checkpoint"
    report = modelport.scan(ckpt)
    assert report.verdict == "safe", report.to_json()
    latest = files_of(report)["latest"]
    assert (latest.format, latest.verdict, latest.findings) == ("text", "safe", ())
    alone = modelport.scan(ckpt / "latest")  # named on its own: no model
    assert alone.verdict == "error" and alone.files[0].format == "text"


def test_a_cut_text_pickle_naming_a_class_is_still_an_error(tmp_path: Path) -> None:
    ckpt, _ = lightning_checkpoint(tmp_path)
    (ckpt / "latest").write_bytes(pickle.dumps(OrderedDict(a=1), protocol=0)[:-2])
    latest = files_of(modelport.scan(ckpt))["latest"]
    assert (latest.format, latest.verdict) == ("pickle", "error")


# -- Python files beside the weights --------------------------------------------------------


def deepspeed_recovery_script() -> Path | None:
    """DeepSpeed's ``zero_to_fp32.py``, which ``engine._copy_recovery_script`` copies into
    every checkpoint folder (found without importing DeepSpeed)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return None
    script = Path(next(iter(spec.submodule_search_locations))) / "utils" / "zero_to_fp32.py"
    return script if script.is_file() else None


def test_deepspeed_recovery_scripts_are_named_not_suspicious(tmp_path: Path) -> None:
    script = deepspeed_recovery_script()
    if script is None:
        pytest.skip("deepspeed is not installed: its zero_to_fp32.py is the fixture")
    write_stage12(tmp_path / "global_step4", [{"w": torch.randn(3)}], 1, buffers={})
    root = checkpoint_root(tmp_path)
    shutil.copy(script, root / "zero_to_fp32.py")
    shutil.copy(script, root / "zero_to_torch.py")  # what some releases add beside it
    report = modelport.scan(root)
    assert report.verdict == "safe", report.to_json()
    assert findings_of(report) == [
        ("info", "python-source", "zero_to_fp32.py"),
        ("info", "python-source", "zero_to_torch.py"),
    ]
    (note,) = files_of(report)["zero_to_fp32.py"].findings
    assert "no configuration of the folder names it" in note.message


def test_code_a_configuration_names_stays_suspicious(tmp_path: Path) -> None:
    """auto_map names ``modeling_x``; transformers also imports what it imports relatively;
    a diffusers component names ``unet/my_unet.py``; a stray script is only named."""
    auto_map = {"AutoModel": "modeling_x.XModel", "AutoConfig": "configuration_x.XConfig"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": auto_map}))
    (tmp_path / "modeling_x.py").write_text("from .layers_x import Block\n")
    (tmp_path / "configuration_x.py").write_text("X = 1\n")
    (tmp_path / "layers_x.py").write_text("class Block: ...\n")
    (tmp_path / "train.py").write_text("import os\n")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["my_unet", "MyUNet"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "my_unet.py").write_text("class MyUNet: ...\n")
    report = modelport.scan(tmp_path)
    assert report.verdict == "suspicious"
    assert findings_of(report) == [
        ("info", "python-source", "train.py"),
        ("medium", "remote-code", "config.json"),
        ("medium", "remote-code", "configuration_x.py"),
        ("medium", "remote-code", "layers_x.py"),
        ("medium", "remote-code", "model_index.json"),
        ("medium", "remote-code", "modeling_x.py"),
        ("medium", "remote-code", "my_unet.py"),
    ]


# -- the optimizer files' classes -----------------------------------------------------------


class ZeroStageEnum(int, enum.Enum):  # deepspeed/runtime/zero/config.py
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class LossScaler:  # deepspeed/runtime/fp16/loss_scaler.py
    def __init__(self, scale: float = 1.0) -> None:
        self.cur_scale = scale
        self.dynamic = False


@dataclasses.dataclass
class fragment_address:  # deepspeed/utils/tensor_fragment.py spells it so
    numel: int
    start: int


DEEPSPEED_CLASSES = {
    "deepspeed.runtime.zero.config": ZeroStageEnum,
    "deepspeed.runtime.fp16.loss_scaler": LossScaler,
    "deepspeed.utils.tensor_fragment": fragment_address,
}


@pytest.fixture
def deepspeed_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-ins pickle under DeepSpeed's module paths, as DeepSpeed's own classes do
    (pickle imports the module and its parents to check the name; those are stand-ins too)."""
    modules: dict[str, types.ModuleType] = {}
    for module_name, cls in DEEPSPEED_CLASSES.items():
        parts = module_name.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[:n])
            modules.setdefault(name, types.ModuleType(name))
        setattr(modules[module_name], cls.__name__, cls)
        monkeypatch.setattr(cls, "__module__", module_name)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def with_engine_objects(folder: Path, stage: int) -> None:
    """Each rank's optimizer file as stage 1-3 save it: the stage as ``ZeroStageEnum``, the
    loss scaler object, stage 1-2's fragment addresses, and stage 3's flat groups carrying
    Python attributes (torch pickles those through ``_rebuild_from_type_v2``)."""
    for path in sorted(folder.glob("*optim_states.pt")):
        states = torch.load(path, weights_only=False)
        optimizer = states["optimizer_state_dict"]
        optimizer["zero_stage"] = ZeroStageEnum(stage)
        optimizer["loss_scaler"] = LossScaler()
        if stage < 3:
            optimizer["param_slice_mappings"] = [OrderedDict(w=fragment_address(3, 0))]
        else:
            for flat in optimizer["fp32_flat_groups"]:
                flat.ds_id = 0
        torch.save(states, path)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_classes_make_the_folder_suspicious_at_worst(
    tmp_path: Path, deepspeed_classes: None, stage: int
) -> None:
    groups = [{"w": torch.randn(3)}]
    if stage == 3:
        write_stage3(tmp_path / "global_step4", groups, 1, {}, {}, {})
    else:
        write_stage12(tmp_path / "global_step4", groups, 1, buffers={})
    with_engine_objects(tmp_path / "global_step4", stage)
    report = modelport.scan(checkpoint_root(tmp_path))
    assert report.verdict == "suspicious", report.to_json()
    serious = [f for f in findings_of(report) if f[0] != "info"]
    assert ("medium", "custom-class-call", "deepspeed.runtime.zero.config.ZeroStageEnum") in serious
    assert ("medium", "custom-class", "deepspeed.runtime.fp16.loss_scaler.LossScaler") in serious
    assert all(severity == "medium" for severity, _, _ in serious)
    assert {file.verdict for file in report.files} <= {"safe", "suspicious"}


def test_a_tensor_with_attributes_is_no_custom_class(tmp_path: Path) -> None:
    flat = torch.arange(4.0)
    flat.ds_id = 0  # type: ignore[attr-defined]
    torch.save({"fp32_flat_groups": [flat]}, tmp_path / "optim_states.pt")
    loaded = torch.load(tmp_path / "optim_states.pt", weights_only=True)  # torch admits it
    assert loaded["fp32_flat_groups"][0].ds_id == 0
    assert modelport.scan(tmp_path / "optim_states.pt").verdict == "safe"


# -- what ``parameters`` counts -------------------------------------------------------------


class Net(torch.nn.Module):
    """The heavy DeepSpeed test's model: a BatchNorm (three buffers), a frozen layer and a
    head tied to the embedding, 151 parameters and 221 state_dict elements."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.hidden = torch.nn.Linear(5, 7)
        self.norm = torch.nn.BatchNorm1d(7)
        self.frozen = torch.nn.Linear(7, 5)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(5, 11, bias=False)
        self.head.weight = self.embed.weight


def net_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_a_state_dict_counts_parameters_not_buffers_nor_ties(tmp_path: Path) -> None:
    net = Net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    assert net_parameters(net) == 151
    assert sum(t.numel() for t in net.state_dict().values()) == 221
    assert modelport.inspect(tmp_path / "net.pt").parameters == 151


@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_folder_counts_the_models_parameters(tmp_path: Path, stage: int) -> None:
    net = Net()
    trained = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in net.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in net.named_buffers()}
    shared = {"head.weight": "embed.weight"}
    folder = tmp_path / "global_step4"
    if stage == 3:
        write_stage3(folder, [trained], 2, buffers, frozen, shared)
    else:
        write_stage12(folder, [trained], 2, buffers=buffers, frozen=frozen, shared=shared)
        states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
        states["frozen_param_fragments"] = OrderedDict(frozen)  # stage 1-2: whole tensors
        torch.save(states, folder / "mp_rank_00_model_states.pt")
    report = modelport.inspect(checkpoint_root(tmp_path))
    assert report.format == "deepspeed-zero"
    assert report.parameters == net_parameters(net)


# -- accelerate's FSDP SHARDED_STATE_DICT ---------------------------------------------------


def test_fsdp_sharded_state_dict_gives_the_models_names(tmp_path: Path) -> None:
    """accelerate's ``save_fsdp_model`` (SHARDED_STATE_DICT) calls ``dist_cp.save`` with
    ``{"model": state_dict}`` into ``pytorch_model_fsdp_0/``. (No tied weight here: DCP
    writes a tied tensor once per name, so nothing in the folder says they are one.)"""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 2))
    state = net.state_dict()
    folder = tmp_path / "pytorch_model_fsdp_0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save({"model": state}, checkpoint_id=folder, no_dist=True)
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp"]
    with modelport.open(folder) as model:
        assert sorted(model.tensors) == sorted(f"model.{n}" for n in state)  # the file's names
        chosen = model.weights()
        assert chosen.source == "model"
        assert list(chosen.tensors) == list(state)  # the model's own names
        for name, tensor in state.items():
            assert torch_digest(chosen.tensors[name].torch()) == torch_digest(tensor), name
    report = modelport.inspect(folder)
    assert report.parameters == net_parameters(net)
    assert report.safety["verdict"] == "safe"


# -- DeepSpeed itself -----------------------------------------------------------------------


@pytest.mark.heavy
@pytest.mark.parametrize(("stage", "tag"), [(2, "checkpoint"), (3, "")])
def test_deepspeeds_own_folders(tmp_path: Path, stage: int, tag: str) -> None:
    """Trained by DeepSpeed (Lightning's tag ``checkpoint`` for stage 2): the folder scans
    ``suspicious`` for DeepSpeed's classes and nothing worse, ``latest`` and the recovery
    scripts are companions, and ``parameters`` is the model's 151."""
    pytest.importorskip("deepspeed")
    out = train(tmp_path, stage, 1, tag, {"epoch": 1} if tag else None)
    report = modelport.scan(out)
    assert report.verdict == "suspicious", report.to_json()
    assert {file.verdict for file in report.files} <= {"safe", "suspicious"}
    assert files_of(report)["latest"].verdict == "safe"
    scripts = [f for f in findings_of(report) if f[2].endswith(".py")]
    assert scripts and all(f[:2] == ("info", "python-source") for f in scripts)
    named = {f[2] for f in findings_of(report) if f[0] == "medium"}
    assert "deepspeed.runtime.zero.config.ZeroStageEnum" in named
    assert modelport.inspect(out).parameters == 151
    severities = {f.severity for file in report.files for f in file.findings}
    assert Severity.HIGH not in severities and Severity.CRITICAL not in severities
