"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3), read as the fp32 weights ``zero_to_fp32``
merges from them, as DeepSpeed, Lightning's DeepSpeed strategy, accelerate and the HF
Trainer save them.

Layout (deepspeed/runtime/engine.py ``save_checkpoint``, deepspeed/checkpoint/constants.py):

- ``<dir>/latest`` names the tag folder (``global_step10``; Lightning: ``checkpoint``,
  inside a ``.ckpt`` folder; accelerate: ``pytorch_model``). The folder read is ``<dir>``,
  or the tag folder itself;
- the tag folder holds ``torch.save`` files: ``mp_rank_00_model_states.pt`` (stages 1 and
  2) or ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` (stage 3, one per rank), and one
  ``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per data-parallel rank;
- a model-states dict holds ``module`` (the 16-bit weights of stages 1 and 2, empty
  placeholders in stage 3; buffers whole), ``buffer_names``, ``param_shapes`` (one ordered
  dict ``name -> shape`` per parameter group), ``frozen_param_shapes``,
  ``frozen_param_fragments``, ``shared_params`` (``{alias: name}``), ``ds_version``, the
  engine's bookkeeping, and every key of the caller's ``client_state`` (Lightning's whole
  checkpoint less its ``state_dict`` and optimizer states);
- an optimizer-states dict holds ``optimizer_state_dict``: ``zero_stage``, ``partition_count``
  (an int or one per group) and the rank's fp32 master partitions:
  ``single_partition_of_fp32_groups`` (stages 1, 2; ``param_alignment_paddings`` when the
  engine pads between parameters) or ``fp32_flat_groups`` (stage 3). Its moments
  (``base_optimizer_state``) are optimizer state, not weights, and are never listed.

The weights are merged as ``zero_to_fp32`` merges them (``_zero_merge``): buffers (floating
ones as fp32), frozen parameters, the trainable parameters from the partitions, then shared
names pointing at the tensor they share. The tree is that flat dict; when the model states
carry a client state (Lightning), the tree is the client state with the merged weights under
``state_dict``, as Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` builds it, and
names lose Lightning's old ``_forward_module.`` wrapper prefix as they do there. Every file
is read with modelport's restricted unpickler: DeepSpeed's classes (the loss scaler, the
stage enum) are recorded, never imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from modelport.errors import CorruptFileError, UnsupportedVersionError
from modelport.formats._zero_merge import (
    Shapes,
    as_float32,
    merge_fragmented,
    merge_frozen_fragments,
    merge_partitioned,
)
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.formats.registry import FILE_SLOTS, detect
from modelport.pickles.records import CallRecord, ObjectRecord
from modelport.tensors import TensorRef

LATEST_NAME: Final = "latest"
LATEST_MAX_BYTES: Final = 4096  # a tag name; DeepSpeed writes one line
MAX_LISTED_ENTRIES: Final = 10_000  # entries of a folder looked at while sniffing
MAX_TAG_FOLDERS: Final = 64  # subfolders listed in search of a tag folder, without ``latest``
MODEL_STATES: Final = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
OPTIM_STATES: Final = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
LIGHTNING_WRAPPER: Final = "_forward_module."
# What the engine itself writes into a model-states file; any other key is client state.
ENGINE_KEYS: Final = frozenset(
    {
        "module",
        "buffer_names",
        "optimizer",
        "param_shapes",
        "frozen_param_shapes",
        "shared_params",
        "frozen_param_fragments",
        "lr_scheduler",
        "data_sampler",
        "random_ltd",
        "sparse_tensor_module_names",
        "csr_tensor_module_names",
        "skipped_steps",
        "global_steps",
        "global_samples",
        "dp_world_size",
        "mp_world_size",
        "checkpoint_parallel_dimensions",
        "universal_checkpoint_info",
        "ds_autoep_layers",
        "autoep_layers",
        "ds_config",
        "ds_version",
    }
)


@dataclass(frozen=True)
class StateFiles:
    """A tag folder's files: model states and optimizer states by data-parallel rank
    (model states of stages 1 and 2 have no rank: they sit under ``None``)."""

    folder: Path
    model: dict[int | None, Path]
    optimizer: dict[int, Path]


@dataclass(frozen=True)
class ModelStates:
    """What ``zero_to_fp32`` takes from a model-states file, and the caller's client state."""

    buffers: dict[str, TensorRef]
    param_shapes: list[Shapes]
    frozen_shapes: Shapes
    frozen_fragments: dict[str, TensorRef]
    shared: dict[str, str]
    ds_version: str
    client: dict[str, Any]


@dataclass(frozen=True)
class OptimizerStates:
    """One rank's fp32 master partitions, and how they are laid out."""

    stage: int
    world: int
    flat_groups: list[TensorRef]
    paddings: list[list[int]] | None
    bf16_optimizer: bool  # DeepSpeed's BF16_Optimizer: stage 1's layout, no stage recorded


def sniff(probe: Probe) -> bool:
    return probe.is_dir and bool(_candidates(probe.path))


def read(path: Path, probe: Probe) -> Contents:
    files = _state_files(_tag_folder(path))
    first = _optimizer_states(files.optimizer[min(files.optimizer)])
    ranks = sorted(files.optimizer)
    if ranks != list(range(first.world)):
        raise CorruptFileError(
            f"the optimizer states say {first.world} ranks, the folder holds ranks {ranks}: "
            "a rank's file is missing, or an older checkpoint was partly overwritten",
            path=files.folder,
        )
    ranked = [first] + [_optimizer_states(files.optimizer[r]) for r in ranks[1:]]
    if any(r.stage != first.stage or r.world != first.world for r in ranked):
        raise CorruptFileError(
            "the ranks' optimizer states disagree on the stage", path=files.folder
        )
    model = _model_states(_model_file(files, first.stage, 0))
    weights = dict(model.buffers)
    weights.update(_frozen(files, first, model))
    groups = [r.flat_groups for r in ranked]
    if first.stage == 3:
        flat_shapes = {n: s for shapes in model.param_shapes for n, s in shapes.items()}
        weights.update(merge_fragmented(flat_shapes, groups))
    else:
        weights.update(merge_partitioned(model.param_shapes, groups, first.paddings))
    for alias, name in model.shared.items():
        if name in weights:
            weights[alias] = weights[name]
    details: dict[str, Any] = {
        "zero_stage": first.stage,
        "world_size": first.world,
        "tag": files.folder.name,
        "ds_version": model.ds_version,
        "merged": "fp32 master weights, as zero_to_fp32 merges them; optimizer moments left out",
    }
    if first.bf16_optimizer:  # zero_to_fp32 refuses these; their layout is stage 1's
        details["optimizer"] = "bf16 optimizer (no zero_stage recorded): merged as stage 1"
    if not model.client:
        return Contents(Format.DEEPSPEED_ZERO, weights, details=details)
    named = {n.removeprefix(LIGHTNING_WRAPPER): t for n, t in weights.items()}
    details["client_state"] = sorted(str(k) for k in model.client)
    return Contents(Format.DEEPSPEED_ZERO, {**model.client, "state_dict": named}, details=details)


# folders ---------------------------------------------------------------------------------
def _holds_states(folder: Path) -> bool:
    model = optimizer = False
    for count, entry in enumerate(folder.iterdir()):
        if count >= MAX_LISTED_ENTRIES:
            break
        model = model or bool(MODEL_STATES.fullmatch(entry.name))
        optimizer = optimizer or bool(OPTIM_STATES.fullmatch(entry.name))
        if model and optimizer:
            return True
    return False


def _latest(path: Path) -> Path | None:
    """The tag folder ``latest`` names, if it is a plain name of a folder beside it."""
    latest = path / LATEST_NAME
    if not latest.is_file() or latest.stat().st_size > LATEST_MAX_BYTES:
        return None
    tag = latest.read_bytes().decode("utf-8", "replace").strip()
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag:
        return None
    folder = path / tag
    return folder if folder.is_dir() else None


def _candidates(path: Path) -> list[Path]:
    """Tag folders ``path`` may mean: itself, the one ``latest`` names, or its subfolders
    that hold ZeRO states."""
    try:
        if _holds_states(path):
            return [path]
        named = _latest(path)
        if named is not None:
            return [named] if _holds_states(named) else []
        found: list[Path] = []
        looked = 0
        for count, entry in enumerate(path.iterdir()):
            if count >= MAX_LISTED_ENTRIES or looked >= MAX_TAG_FOLDERS:
                break
            if entry.is_dir() and not entry.is_symlink():
                looked += 1
                if _holds_states(entry):
                    found.append(entry)
        return found
    except OSError:
        return []


def _tag_folder(path: Path) -> Path:
    found = _candidates(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise CorruptFileError("holds no DeepSpeed ZeRO model and optimizer states", path=path)
    names = ", ".join(sorted(f.name for f in found))
    raise CorruptFileError(
        f"holds several DeepSpeed checkpoints ({names}) and no '{LATEST_NAME}' file naming "
        "one: name the tag folder to read",
        path=path,
    )


def _state_files(folder: Path) -> StateFiles:
    model: dict[int | None, Path] = {}
    optimizer: dict[int, Path] = {}
    model_parallel: set[int] = set()
    for entry in folder.iterdir():
        if found := MODEL_STATES.fullmatch(entry.name):
            model[None if found[1] is None else int(found[1])] = entry
            model_parallel.add(int(found[2]))
        elif found := OPTIM_STATES.fullmatch(entry.name):
            optimizer[int(found[1])] = entry
            model_parallel.add(int(found[2]))
    if model_parallel != {0}:
        raise UnsupportedVersionError(
            f"tensor-parallel ZeRO checkpoints (model-parallel ranks {sorted(model_parallel)}) "
            "cannot be merged: zero_to_fp32 merges data-parallel ranks only",
            path=folder,
        )
    if not optimizer or not model:
        raise CorruptFileError("lacks the model or the optimizer states", path=folder)
    return StateFiles(folder, model, optimizer)


def _model_file(files: StateFiles, stage: int, rank: int) -> Path:
    key = rank if stage == 3 else None
    found = files.model.get(key)
    if found is None:
        expected = (
            f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
            if stage == 3
            else "mp_rank_00_model_states.pt"
        )
        raise CorruptFileError(f"a stage {stage} checkpoint needs {expected}", path=files.folder)
    return found


# files -----------------------------------------------------------------------------------
def _load(path: Path) -> dict[Any, Any]:
    reader, probe, _ = detect(path, FILE_SLOTS)
    if reader.format not in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        raise CorruptFileError(f"is {reader.format}, not a torch.save file", path=path)
    tree = reader.contents(probe).tree
    if not isinstance(tree, dict):
        raise CorruptFileError("does not hold a dict of states", path=path)
    return tree


def _optimizer_states(path: Path) -> OptimizerStates:
    state = _load(path).get("optimizer_state_dict")
    if not isinstance(state, dict):
        raise CorruptFileError("holds no optimizer_state_dict", path=path)
    stage = _stage(state.get("zero_stage"), "single_partition_of_fp32_groups" in state)
    if stage not in (1, 2, 3):
        raise UnsupportedVersionError(
            f"ZeRO stage {stage!r} is not one zero_to_fp32 merges", path=path
        )
    count = state.get("partition_count")
    counts = count if isinstance(count, list) else [count]  # one per group, or one
    if not counts or not all(_count(c) for c in counts):
        raise CorruptFileError(f"partition_count {count!r:.60} is not a rank count", path=path)
    world: int = max(counts)
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = state.get(key)
    if not isinstance(groups, list) or not all(_flat(g) for g in groups):
        raise CorruptFileError(f"{key} is not a list of flat tensors", path=path)
    paddings = state.get("param_alignment_paddings")
    if paddings is not None and not (
        isinstance(paddings, list)
        and all(isinstance(p, list) and all(_count(n, 0) for n in p) for p in paddings)
    ):
        raise CorruptFileError("param_alignment_paddings is not lists of counts", path=path)
    return OptimizerStates(stage, world, groups, paddings, state.get("zero_stage") is None)


def _model_states(path: Path) -> ModelStates:
    tree = _load(path)
    if _partitioned_experts(tree):
        raise UnsupportedVersionError(
            "AutoEP expert parameters are partitioned over expert groups; zero_to_fp32 does "
            "not merge them (DeepSpeed's ds_to_universal does)",
            path=path,
        )
    names = tree.get("buffer_names")
    module = tree.get("module")
    if not isinstance(names, list) or not isinstance(module, dict):
        raise CorruptFileError("is not a DeepSpeed model-states file (no buffer_names)", path=path)
    wanted = set(names)
    buffers = {
        str(k): as_float32(str(k), v)
        for k, v in module.items()
        if k in wanted and isinstance(v, TensorRef)
    }
    groups = tree.get("param_shapes")
    if isinstance(groups, dict):  # checkpoints of DeepSpeed < 0.3.17: one group, no list
        groups = [groups]
    if not isinstance(groups, list) or not all(_shapes(g) for g in groups):
        raise CorruptFileError("param_shapes is not a list of name -> shape tables", path=path)
    frozen = tree.get("frozen_param_shapes") or {}
    fragments = tree.get("frozen_param_fragments") or {}
    shared = tree.get("shared_params") or {}
    if not _shapes(frozen) or not isinstance(fragments, dict) or not isinstance(shared, dict):
        raise CorruptFileError("frozen or shared parameter records are malformed", path=path)
    version = tree.get("ds_version")
    return ModelStates(
        buffers,
        [_as_shapes(g) for g in groups],
        _as_shapes(frozen),
        {str(k): v for k, v in fragments.items() if isinstance(v, TensorRef)},
        {str(k): str(v) for k, v in shared.items()},
        str(version) if version is not None else "",
        {k: v for k, v in tree.items() if k not in ENGINE_KEYS},
    )


def _frozen(files: StateFiles, first: OptimizerStates, model: ModelStates) -> dict[str, TensorRef]:
    """Parameters the optimizer does not own: whole in stages 1 and 2, one fragment per rank
    in stage 3 (each rank's model-states file holds its own)."""
    if not model.frozen_shapes:
        return {}
    if first.stage != 3:
        missing = [n for n in model.frozen_shapes if n not in model.frozen_fragments]
        if missing:
            raise CorruptFileError(
                f"frozen parameter {missing[0]!r} is not stored", path=files.folder
            )
        return {n: model.frozen_fragments[n] for n in model.frozen_shapes}
    fragments = [model.frozen_fragments] + [
        _model_states(_model_file(files, 3, rank)).frozen_fragments
        for rank in range(1, first.world)
    ]
    return merge_frozen_fragments(model.frozen_shapes, fragments)


# values ----------------------------------------------------------------------------------
def _stage(value: Any, partitioned: bool) -> int | None:
    """``zero_stage`` is DeepSpeed's ``ZeroStageEnum``, pickled as a call with the stage;
    the bf16 optimizer of stage 1 records no stage but stage 1's partitions."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    args = value.args if isinstance(value, (CallRecord, ObjectRecord)) else ()
    if args and isinstance(args[0], int):
        return args[0]
    inner = getattr(value, "value", None)
    if isinstance(inner, int):
        return inner
    return 1 if value is None and partitioned else None


def _count(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _flat(value: Any) -> bool:
    return isinstance(value, TensorRef) and len(value.shape) == 1


def _shapes(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(s, (tuple, list)) and all(_count(n, 0) for n in s) for s in value.values()
    )


def _as_shapes(table: dict[Any, Any]) -> Shapes:
    return {str(name): tuple(shape) for name, shape in table.items()}


def _partitioned_experts(tree: dict[Any, Any]) -> bool:
    layers = tree.get("ds_autoep_layers", tree.get("autoep_layers"))
    return isinstance(layers, list) and any(
        isinstance(e, dict) and e.get("checkpoint_format") == "zero3_partitioned" for e in layers
    )


READER = FormatReader(Format.DEEPSPEED_ZERO, sniff, read, ())
