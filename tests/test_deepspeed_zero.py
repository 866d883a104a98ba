"""DeepSpeed ZeRO checkpoints merged into fp32 weights, as ``zero_to_fp32`` merges them.

The fast tests write the files the way DeepSpeed's engine writes them (``torch.save`` of the
same dicts, deepspeed/runtime/engine.py ``_save_checkpoint`` / ``_save_zero_checkpoint``):
the fp32 master weights are flattened, padded and cut into one partition per rank as
``stage_1_and_2.py`` and stage 3 cut them, so the oracle is the weights they were cut from.
The heavy tests train with DeepSpeed itself on CPU (gloo, one and two ranks) and compare with
DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``, which also checks that the
hand-made files are what ``zero_to_fp32`` expects.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import modelport
from modelport.errors import CorruptFileError, UnsupportedVersionError
from modelport.pickles.records import CallRecord
from tests.conftest import Cli, Reduces, os_system_stand_in, torch_digest

ENGINE_KEYS = {
    "optimizer": None,
    "lr_scheduler": None,
    "data_sampler": None,
    "random_ltd": None,
    "skipped_steps": 0,
    "global_steps": 4,
    "global_samples": 16,
    "dp_world_size": 1,
    "mp_world_size": 1,
    "ds_config": {"train_batch_size": 16, "zero_optimization": {"stage": 2}},
    "ds_version": "0.14.0",
}


def groups_of(sizes: list[list[tuple[int, ...]]], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Parameter groups of fp32 master weights, named as a module names them."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {f"g{g}.p{i}.weight": torch.randn(s, generator=generator) for i, s in enumerate(group)}
        for g, group in enumerate(sizes)
    ]


def model_states(
    groups: list[dict[str, torch.Tensor]],
    buffers: dict[str, torch.Tensor],
    *,
    frozen: dict[str, torch.Tensor] | None = None,
    shared: dict[str, str] | None = None,
    placeholders: bool = False,
) -> dict[str, Any]:
    """A model-states dict: the module's 16-bit state (empty placeholders in stage 3)."""
    module: dict[str, torch.Tensor] = OrderedDict()
    for name, tensor in [*(kv for g in groups for kv in g.items()), *(frozen or {}).items()]:
        module[name] = torch.empty(0, dtype=torch.half) if placeholders else tensor.half()
    module.update(buffers)
    return {
        "module": module,
        "buffer_names": list(buffers),
        "param_shapes": [OrderedDict((n, t.shape) for n, t in g.items()) for g in groups],
        "frozen_param_shapes": OrderedDict((n, t.shape) for n, t in (frozen or {}).items()),
        "shared_params": dict(shared or {}),
        "frozen_param_fragments": OrderedDict(),
        **ENGINE_KEYS,
    }


def optimizer_states(
    stage: int, world: int, flats: list[torch.Tensor], **more: Any
) -> dict[str, Any]:
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    state = {
        "zero_stage": stage,
        "loss_scaler": {"cur_scale": 1.0},
        "dynamic_loss_scale": False,
        "overflow": False,
        "base_optimizer_state": {"state": {i: {"exp_avg": f * 0.5} for i, f in enumerate(flats)}},
        key: flats,
        "partition_count": [world] * len(flats) if stage < 3 else world,
        **more,
    }
    return {"optimizer_state_dict": state, "ds_config": {}, "ds_version": "0.14.0"}


def write_stage12(
    folder: Path,
    groups: list[dict[str, torch.Tensor]],
    world: int,
    *,
    stage: int = 2,
    paddings: list[list[int]] | None = None,
    **model: Any,
) -> None:
    """Each group flattened (``paddings`` after each parameter), padded to a multiple of
    ``2 * world`` and cut into ``world`` equal partitions, one per rank's file."""
    folder.mkdir(parents=True)
    partitions: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for g, group in enumerate(groups):
        pieces = []
        for i, tensor in enumerate(group.values()):
            pieces += [tensor.reshape(-1), torch.zeros(paddings[g][i] if paddings else 0)]
        flat = torch.cat(pieces)
        flat = torch.cat([flat, torch.zeros(-len(flat) % (2 * world))])
        for rank, part in enumerate(flat.chunk(world)):
            partitions[rank].append(part.clone())
    more = {} if paddings is None else {"param_alignment_paddings": paddings}
    torch.save(model_states(groups, **model), folder / "mp_rank_00_model_states.pt")
    for rank in range(world):
        states = optimizer_states(stage, world, partitions[rank], **more)
        torch.save(states, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def fragments(tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Stage 3's cut: ``ceil(numel / world)`` elements per rank, the last one padded."""
    size = math.ceil(tensor.numel() / world)
    flat = torch.cat([tensor.reshape(-1), torch.zeros(size * world - tensor.numel())])
    return [flat[r * size : (r + 1) * size].clone() for r in range(world)]


def write_stage3(
    folder: Path,
    groups: list[dict[str, torch.Tensor]],
    world: int,
    buffers: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    shared: dict[str, str],
) -> None:
    folder.mkdir(parents=True)
    for rank in range(world):
        flats = [torch.cat([fragments(t, world)[rank] for t in g.values()]) for g in groups]
        states = model_states(groups, buffers, frozen=frozen, shared=shared, placeholders=True)
        states["frozen_param_fragments"] = OrderedDict(
            (n, fragments(t, world)[rank]) for n, t in frozen.items()
        )
        torch.save(states, folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        optim = optimizer_states(3, world, flats)
        torch.save(optim, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def checkpoint_root(folder: Path, tag: str = "global_step4") -> Path:
    """``save_checkpoint``'s top folder: ``latest`` names the tag folder."""
    (folder / "latest").write_text(tag)
    (folder / "zero_to_fp32.py").write_text("# DeepSpeed's recovery script\n")
    return folder


def assert_weights(path: Path, expected: dict[str, torch.Tensor]) -> None:
    with modelport.open(path) as model:
        assert model.format == "deepspeed-zero"
        weights = model.weights().tensors
        assert list(weights) == list(expected)
        for name, tensor in expected.items():
            assert weights[name].dtype == str(tensor.dtype).removeprefix("torch.")
            assert weights[name].shape == tuple(tensor.shape), name
            assert torch_digest(weights[name].torch()) == torch_digest(tensor), name


BUFFERS = {"g0.norm.running_mean": torch.arange(5.0).half(), "g0.norm.steps": torch.tensor(3)}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stage2_partitions_join_across_ranks(tmp_path: Path, world: int) -> None:
    groups = groups_of([[(7, 5), (7,), (3, 7)], [(4,), (2, 2, 3)]])
    write_stage12(tmp_path / "global_step4", groups, world, buffers=BUFFERS)
    expected = {n: t.float() for n, t in BUFFERS.items() if t.is_floating_point()}
    expected["g0.norm.steps"] = BUFFERS["g0.norm.steps"]
    expected.update({n: t for g in groups for n, t in g.items()})
    assert_weights(checkpoint_root(tmp_path), expected)
    with modelport.open(tmp_path) as model:
        assert model.details["zero_stage"] == 2 and model.details["world_size"] == world
        assert model.details["tag"] == "global_step4"
        assert not any("exp_avg" in name for name in model.tensors)
        weight = model.tensors["g1.p0.weight"]  # in rank 0's partition whatever the world
        assert weight.storage is not None and weight.storage.path is not None
        assert weight.storage.path.name == "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        assert weight.byte_range() is not None  # read where it lies, not copied


def test_stage1_with_alignment_paddings(tmp_path: Path) -> None:
    groups = groups_of([[(3, 3), (5,), (4,)]], seed=1)
    folder = tmp_path / "global_step4"
    write_stage12(folder, groups, 2, stage=1, paddings=[[3, 0, 2]], buffers={})
    assert_weights(folder, {n: t for g in groups for n, t in g.items()})


def test_bf16_optimizer_of_stage1(tmp_path: Path) -> None:
    """``BF16_Optimizer`` (bf16 weights, fp32 gradient accumulation, stage 1) saves
    ``bf16_zero_pp_rank_*`` files with stage 1's partitions and no ``zero_stage``."""
    groups = groups_of([[(3, 3), (5,)]], seed=4)
    folder = tmp_path / "global_step4"
    write_stage12(folder, groups, 2, stage=1, buffers={})
    for rank in range(2):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        states = torch.load(folder / name, weights_only=False)
        del states["optimizer_state_dict"]["zero_stage"]
        (folder / name).unlink()
        torch.save(states, folder / f"bf16_{name}")
    assert_weights(folder, {n: t for g in groups for n, t in g.items()})
    with modelport.open(folder) as model:
        assert model.details["zero_stage"] == 1 and "bf16" in model.details["optimizer"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stage3_fragments_join_with_frozen_and_shared(tmp_path: Path, world: int) -> None:
    groups = groups_of([[(7, 5), (7,)], [(3, 7), (5,)]], seed=2)
    frozen = {"frozen.weight": torch.randn(4, 3), "frozen.bias": torch.randn(5)}
    shared = {"tied.weight": "g0.p0.weight"}
    write_stage3(tmp_path / "global_step4", groups, world, BUFFERS, frozen, shared)
    expected = {n: t.float() if t.is_floating_point() else t for n, t in BUFFERS.items()}
    expected.update(frozen)
    expected.update({n: t for g in groups for n, t in g.items()})
    expected["tied.weight"] = groups[0]["g0.p0.weight"]
    assert_weights(checkpoint_root(tmp_path), expected)
    with modelport.open(tmp_path) as model:
        assert model.details["zero_stage"] == 3
        assert model.tensors["tied.weight"] is model.tensors["g0.p0.weight"]


def lightning_checkpoint(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """What Lightning's DeepSpeed strategy saves: the engine's files under tag
    ``checkpoint`` inside the ``.ckpt`` folder, its own checkpoint as client state."""
    groups = groups_of([[(4, 3), (4,)]], seed=3)
    wrapped = [{f"_forward_module.{n}": t for n, t in g.items()} for g in groups]
    ckpt = directory / "epoch=0-step=4.ckpt"
    client = {"epoch": 0, "global_step": 4, "pytorch-lightning_version": "2.0.9"}
    client["hyper_parameters"] = {"lr": 0.01}
    write_stage12(ckpt / "checkpoint", wrapped, 1, buffers={})
    states = torch.load(ckpt / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
    torch.save({**states, **client}, ckpt / "checkpoint" / "mp_rank_00_model_states.pt")
    return checkpoint_root(ckpt, "checkpoint"), groups[0]


def test_lightning_checkpoint_folder(tmp_path: Path, cli: Cli) -> None:
    ckpt, expected = lightning_checkpoint(tmp_path)
    assert_weights(ckpt, expected)
    with modelport.open(ckpt) as model:
        assert model.tree["epoch"] == 0 and model.tree["hyper_parameters"] == {"lr": 0.01}
        assert model.weights().source == "state_dict"
    report = cli("inspect", ckpt, "--json")
    assert report.code == 0 and report.json["format"] == "deepspeed-zero"
    assert report.json["parameters"] == sum(t.numel() for t in expected.values())
    out = tmp_path / "out.safetensors"
    assert cli("convert", ckpt, out).code == 0
    written = load_file(out)
    assert list(written) == list(expected)
    assert all(torch.equal(written[n], t) for n, t in expected.items())


def test_which_tag_is_read(tmp_path: Path) -> None:
    groups = groups_of([[(3,)]])
    write_stage12(tmp_path / "global_step2", groups, 1, buffers={})
    assert_weights(tmp_path, groups[0])  # the only tag folder, without ``latest``
    write_stage12(tmp_path / "global_step4", groups_of([[(3,)]], seed=9), 1, buffers={})
    with pytest.raises(CorruptFileError, match="global_step2, global_step4"):
        modelport.open(tmp_path)
    checkpoint_root(tmp_path, "global_step2")
    assert_weights(tmp_path, groups[0])


def test_a_missing_rank_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "global_step4"
    write_stage12(folder, groups_of([[(9,)]]), 3, buffers={})
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CorruptFileError, match=r"3 ranks, the folder holds ranks \[0, 2\]"):
        modelport.open(folder)


def test_shapes_that_do_not_fit_the_partitions(tmp_path: Path) -> None:
    folder = tmp_path / "global_step4"
    write_stage12(folder, groups_of([[(4,), (4,)]]), 2, buffers={})
    states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    states["param_shapes"][0]["g0.p1.weight"] = torch.Size([40])
    torch.save(states, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(CorruptFileError, match="needs elements up to 44"):
        modelport.open(folder)
    del states["param_shapes"][0]["g0.p1.weight"]  # 4 of 8 elements: more than padding left
    torch.save(states, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(CorruptFileError, match="do not describe these partitions"):
        modelport.open(folder)


def test_tensor_parallel_ranks_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "global_step4"
    write_stage12(folder, groups_of([[(4,)]]), 1, buffers={})
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").rename(
        folder / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    )
    with pytest.raises(UnsupportedVersionError, match="tensor-parallel"):
        modelport.open(folder)


def test_client_state_is_never_run(tmp_path: Path) -> None:
    folder = tmp_path / "global_step4"
    groups = groups_of([[(4,)]])
    write_stage12(folder, groups, 1, buffers={})
    states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    states["payload"] = Reduces(os_system_stand_in, "echo pwned")  # raises if ever called
    torch.save(states, folder / "mp_rank_00_model_states.pt")
    with modelport.open(folder) as model:
        assert isinstance(model.tree["payload"], CallRecord)
        assert set(model.weights().tensors) == set(groups[0])


# -- DeepSpeed itself (heavy: it imports for seconds and trains in subprocesses) ---------------

TRAIN = """
import importlib, json, os, sys
import torch, deepspeed
# the shared-memory collective is a C++ extension compiled on first use; gloo suffices here
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
stage, out, tag, client = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
torch.manual_seed(0)
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.hidden = torch.nn.Linear(5, 7)
        self.norm = torch.nn.BatchNorm1d(7)
        self.frozen = torch.nn.Linear(7, 5)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(5, 11, bias=False)
        self.head.weight = self.embed.weight
    def forward(self, x):
        return self.head(self.frozen(self.norm(self.hidden(self.embed(x)))))
class Wrapper(torch.nn.Module):  # Lightning < 2.1 wrapped the module so
    def __init__(self):
        super().__init__()
        self._forward_module = Net()
    def forward(self, x):
        return self._forward_module(x)
model = Wrapper() if client else Net()
world = int(os.environ["WORLD_SIZE"])
config = {"train_batch_size": 2 * world, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True}
deepspeed.init_distributed(dist_backend="gloo")
trained = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(
    model=model, optimizer=torch.optim.AdamW(trained, lr=1e-2), config=config)
engine.backward(engine(torch.tensor([1, 2])).sum())
engine.step()
engine.save_checkpoint(out, tag=tag or None, client_state=client)
torch.distributed.barrier()  # every rank's files are written
torch.distributed.destroy_process_group()
sys.stderr.flush()
os._exit(0)  # gloo's threads may abort in the interpreter's teardown ("terminate called")
"""


def train(tmp_path: Path, stage: int, world: int, tag: str = "", client: Any = None) -> Path:
    script, out = tmp_path / "train.py", tmp_path / "ckpt"
    script.write_text(TRAIN)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(port), WORLD_SIZE=str(world))
    args = [sys.executable, str(script), str(stage), str(out), tag, json.dumps(client or {})]
    runs = [
        subprocess.Popen(
            args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE
        )
        for r in range(world)
    ]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert all(run.returncode == 0 for run in runs), errors[0].decode()[-2000:]
    return out


def zero_to_fp32(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        merged: dict[str, torch.Tensor] = get_fp32_state_dict_from_zero_checkpoint(str(path))
    return merged


@pytest.mark.heavy
@pytest.mark.parametrize(("stage", "world"), [(1, 2), (2, 2), (3, 2), (3, 1)])
def test_deepspeed_checkpoints_match_zero_to_fp32(tmp_path: Path, stage: int, world: int) -> None:
    pytest.importorskip("deepspeed")
    out = train(tmp_path, stage, world)
    assert_weights(out, zero_to_fp32(out))


@pytest.mark.heavy
def test_lightning_strategy_layout_matches_its_converter(tmp_path: Path) -> None:
    """Lightning saves with ``tag="checkpoint"`` and its checkpoint as client state; its
    ``convert_zero_checkpoint_to_fp32_state_dict`` strips ``_forward_module.``."""
    pytest.importorskip("deepspeed")
    client = {"epoch": 1, "global_step": 4, "pytorch-lightning_version": "2.0.9"}
    out = train(tmp_path, 2, 1, "checkpoint", client)
    expected = {n.removeprefix("_forward_module."): t for n, t in zero_to_fp32(out).items()}
    assert_weights(out, expected)
    with modelport.open(out) as model:
        assert model.tree["pytorch-lightning_version"] == "2.0.9"


@pytest.mark.heavy
@pytest.mark.parametrize("stage", [2, 3])
def test_hand_made_files_are_what_zero_to_fp32_reads(tmp_path: Path, stage: int) -> None:
    pytest.importorskip("deepspeed")
    groups = groups_of([[(7, 5), (7,)], [(3, 7)]])
    if stage == 3:
        frozen = {"frozen.weight": torch.randn(4, 3)}
        write_stage3(tmp_path / "global_step4", groups, 3, BUFFERS, frozen, {"t": "g0.p1.weight"})
    else:
        write_stage12(tmp_path / "global_step4", groups, 3, buffers=BUFFERS)
    root = checkpoint_root(tmp_path)
    assert_weights(root, zero_to_fp32(root))
