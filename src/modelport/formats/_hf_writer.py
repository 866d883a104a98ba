"""Hugging Face model directories, written: safetensors shards, an index, the sidecars.

Layout (transformers 5.x ``save_pretrained`` over huggingface_hub
``split_torch_state_dict_into_shards``), what ``from_pretrained`` reads back:

- everything fits in one shard: ``model.safetensors`` and no index;
- otherwise ``model-00001-of-0000N.safetensors`` ... ``model-0000N-of-0000N.safetensors``
  and ``model.safetensors.index.json``: ``{"metadata": {"total_parameters": P,
  "total_size": B, ...}, "weight_map": {tensor: shard}}``, written as transformers does
  (``json.dumps(indent=2, sort_keys=True)`` and a final newline);
- shards MUST be cut greedily in plan order: a tensor that would take the current shard past
  the shard size starts the next one; a tensor larger than the shard size gets a shard of its
  own (huggingface_hub's rule); ``total_size`` is the bytes of the stored tensors and
  ``total_parameters`` their element count (buffers included, tied tensors once);
- tied tensors are stored once: ``alias -> kept`` records go in every shard's
  ``__metadata__`` and in the index metadata; the ``weight_map`` lists stored tensors only,
  so every entry is present in its shard (transformers itself omits tied keys and re-ties
  them from the config);
- sizes are parsed like transformers / huggingface_hub: an int is bytes; ``"5GB"``,
  ``"500MB"``, ``"50KB"``, ``"1TB"`` are decimal, ``"2GiB"``, ``"1MiB"``, ``"1KiB"`` binary;
  the default is huggingface_hub's ``"5GB"``.

Sidecars: when the source is a Hugging Face directory (or a file inside one: its folder has
``config.json``), the folder's other top-level files are carried over (config, generation
config, tokenizer files, model card) if modelport's detector does not take them for weights
(by content: old weights, Git LFS pointers and pickles such as ``training_args.bin`` stay
behind), they are not a ``*.index.json`` with a ``weight_map``, not a weights format modelport
cannot read (Flax ``.msgpack``, TensorFlow checkpoints), not hidden, and at most
``limits.MAX_SIDECAR_BYTES`` bytes. Subdirectories are not copied (the report names them). When the
tensors are cast, ``config.json``'s ``dtype`` / ``torch_dtype`` is updated to the new dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from modelport import limits
from modelport.errors import (
    ModelportError,
    NotAModelError,
    UnknownFormatError,
    UsageError,
)
from modelport.formats import hf_dir, safetensors
from modelport.formats.protocol import Format, FormatReader, Probe
from modelport.formats.registry import detect
from modelport.transfer.streaming import write_all
from modelport.transfer.write_plan import OutputTensor, WritePlan

DEFAULT_SHARD_SIZE: Final = "5GB"
SINGLE_NAME: Final = "model.safetensors"
SHARD_PATTERN: Final = "model-{index:05d}-of-{count:05d}.safetensors"
INDEX_NAME: Final = "model.safetensors.index.json"
CONFIG_NAME: Final = "config.json"
UNREADABLE_WEIGHTS: Final = re.compile(r".*(\.msgpack|\.ckpt\.index|\.ckpt\.data-.*|\.ot)$")
SIZE_UNITS: Final = {
    "TB": 10**12,
    "GB": 10**9,
    "MB": 10**6,
    "KB": 10**3,
    "TIB": 2**40,
    "GIB": 2**30,
    "MIB": 2**20,
    "KIB": 2**10,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str | None) -> int:
    """Bytes for ``--shard-size``: an int, a digit string, or a number with a unit."""
    if value is None:
        value = DEFAULT_SHARD_SIZE
    if isinstance(value, bool):
        raise UsageError(f"shard size {value!r} is not a size")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).upper() if match else ""
        if match is None or (unit and unit not in SIZE_UNITS):
            raise UsageError(
                f"shard size {value!r}: expected bytes or a number with a unit "
                "(KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5GB"
            )
        number = float(match.group(1))
        size = int(number * SIZE_UNITS[unit]) if unit else int(number)
    if size < 1:
        raise UsageError(f"shard size {value!r} must be at least one byte")
    return size


@dataclass(frozen=True)
class Layout:
    """Where each tensor goes: shard file names with their plans, and the index (or None)."""

    shards: tuple[tuple[str, WritePlan], ...]
    index: dict[str, Any] | None

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shards)


def split(tensors: tuple[OutputTensor, ...], limit: int) -> list[list[OutputTensor]]:
    """huggingface_hub's greedy cut, in order; an oversized tensor sits alone."""
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    current_size = 0
    for tensor in tensors:
        if tensor.nbytes > limit:
            shards.append([tensor])
            continue
        if current and current_size + tensor.nbytes > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(tensor)
        current_size += tensor.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def aliases_of(plan: WritePlan) -> dict[str, str]:
    """The ``alias -> kept`` records among the plan's metadata (kept is a stored tensor)."""
    stored = {t.name for t in plan.tensors}
    return {k: v for k, v in plan.metadata.items() if v in stored and k not in stored}


def layout(plan: WritePlan, limit: int) -> Layout:
    groups = split(plan.tensors, limit)
    if len(groups) == 1:
        return Layout(((SINGLE_NAME, WritePlan(tuple(groups[0]), plan.metadata)),), None)
    names = [SHARD_PATTERN.format(index=i + 1, count=len(groups)) for i in range(len(groups))]
    shards = tuple(
        (name, WritePlan(tuple(group), plan.metadata))
        for name, group in zip(names, groups, strict=True)
    )
    metadata: dict[str, Any] = {
        k: v for k, v in plan.metadata.items() if k.startswith("modelport.")
    }
    metadata.update(aliases_of(plan))
    metadata["total_size"] = sum(t.nbytes for t in plan.tensors)
    metadata["total_parameters"] = sum(math.prod(t.shape) for t in plan.tensors)
    weight_map = {t.name: name for name, part in shards for t in part.tensors}
    return Layout(shards, {"metadata": metadata, "weight_map": weight_map})


def index_bytes(index: dict[str, Any]) -> bytes:
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def sidecars(
    source: Path | None, reserved: frozenset[str] = frozenset()
) -> tuple[list[Path], list[str]]:
    """The files to carry from the source's Hugging Face folder, and notes on them. Names in
    ``reserved`` (the new weights and index) are never carried."""
    if source is None:
        return [], []
    folder = source if source.is_dir() else source.parent
    is_hf = (folder / CONFIG_NAME).is_file() or (source.is_dir() and hf_dir.sniff(Probe.of(source)))
    if not is_hf:
        return [], []
    carried: list[Path] = []
    left: list[str] = []
    subfolders: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subfolders.append(entry.name)
            continue
        if not entry.is_file() or (source.is_file() and entry.samefile(source)):
            continue
        size = entry.stat().st_size
        if size > limits.MAX_SIDECAR_BYTES:
            left.append(f"{entry.name} ({size:,} bytes: too large for a sidecar)")
        elif _is_sidecar(entry):
            if entry.name in reserved:
                left.append(f"{entry.name} (the new weights take that name)")
            else:
                carried.append(entry)
    notes = []
    if carried:
        notes.append(f"sidecars from {folder.name or folder}: {', '.join(p.name for p in carried)}")
    if left:
        notes.append(f"left behind: {', '.join(left)}")
    if subfolders:
        notes.append(f"subfolders not copied: {', '.join(subfolders)}")
    return carried, notes


def _is_sidecar(path: Path) -> bool:
    if UNREADABLE_WEIGHTS.fullmatch(path.name.lower()):
        return False
    if path.name.endswith(hf_dir.INDEX_SUFFIX):
        with open(path, "rb") as handle:
            if b'"weight_map"' in handle.read(hf_dir.SNIFF_BYTES):
                return False
    try:
        detect(path)
    except NotAModelError as exc:  # empty, an HTML page: not weights; an LFS pointer is
        return exc.kind != "git-lfs-pointer"
    except UnknownFormatError:
        return True
    except ModelportError:  # a damaged file of a format modelport reads
        return False
    return False  # a format modelport reads: weights, not a sidecar


def write_directory(
    directory: Path,
    plan: WritePlan,
    limit: int,
    source: Path | None,
    cast: str | None = None,
    fsync: bool = False,
) -> Layout:
    """Write the shards, the index and the sidecars into ``directory`` (empty, existing)."""
    assert safetensors.READER.write is not None
    planned = layout(plan, limit)
    for name, part in planned.shards:
        with open(directory / name, "xb", buffering=0) as handle:
            safetensors.READER.write(handle, part)
            if fsync:
                os.fsync(handle.fileno())
    if planned.index is not None:
        _write_file(directory / INDEX_NAME, index_bytes(planned.index), fsync)
    carried, _ = sidecars(source, weight_names(planned))
    for path in carried:
        data = _recast_config(path, cast) if path.name == CONFIG_NAME and cast else None
        if data is not None:
            _write_file(directory / CONFIG_NAME, data, fsync)
        else:
            shutil.copyfile(path, directory / path.name)
    return planned


def superseded(name: str) -> bool:
    """Whether a file in a target folder belongs to the weights scheme this writer writes
    (``model.safetensors``, its shards and index), which new weights replace. Other weights
    (``pytorch_model.bin``, ``tf_model.h5``) and everything else are never removed."""
    return name in (SINGLE_NAME, INDEX_NAME) or _SHARD_NAME.fullmatch(name) is not None


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def weight_names(planned: Layout) -> frozenset[str]:
    """The names the new weights take in the directory."""
    return frozenset((*planned.files, INDEX_NAME))


def _recast_config(path: Path, cast: str) -> bytes | None:
    """``config.json`` with its dtype set to ``cast``; None to copy it unchanged."""
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None  # not ours to repair: carried as it is
    if not isinstance(config, dict) or not ({"dtype", "torch_dtype"} & config.keys()):
        return None
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = cast
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _write_file(path: Path, data: bytes, fsync: bool) -> None:
    with open(path, "xb", buffering=0) as handle:
        write_all(handle, data)
        if fsync:
            os.fsync(handle.fileno())


TARGET = FormatReader(
    Format.HF_DIR,
    hf_dir.sniff,
    hf_dir.read,
    (),
    holds=safetensors.holds,
    records_aliases=True,
)
