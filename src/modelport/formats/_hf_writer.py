"""Hugging Face model directories, written: weight files, an index, the sidecars.

Layout (transformers 5.x ``save_pretrained`` over huggingface_hub
``split_torch_state_dict_into_shards``; diffusers and PEFT name their files their own way),
what ``from_pretrained`` reads back:

- the file names follow the source's library (``Scheme``): transformers ``model`` (or
  ``pytorch_model`` for ``.bin``), diffusers ``diffusion_pytorch_model`` for both, PEFT
  ``adapter_model``; ``--to hf`` writes safetensors, ``--to hf-bin`` torch zip archives
  (``torch.save``'s format, loadable with ``weights_only=True``) named ``.bin``;
- everything fits in one shard: ``<stem>.<ext>`` and no index (a PEFT adapter is always one
  file: PEFT loads no shards);
- otherwise ``<stem>-00001-of-0000N.<ext>`` ... ``<stem>-0000N-of-0000N.<ext>`` and
  ``<stem>.<ext>.index.json``: ``{"metadata": {"total_parameters": P, "total_size": B,
  ...}, "weight_map": {tensor: shard}}``, written as transformers does
  (``json.dumps(indent=2, sort_keys=True)`` and a final newline);
- shards MUST be cut greedily in plan order: a tensor that would take the current shard past
  the shard size starts the next one; a tensor larger than the shard size gets a shard of its
  own (huggingface_hub's rule); ``total_size`` is the bytes of the stored tensors and
  ``total_parameters`` their element count (buffers included, tied tensors once);
- tied tensors are stored once: in safetensors, ``alias -> kept`` records go in every
  shard's ``__metadata__`` and in the index metadata, and the ``weight_map`` lists stored
  tensors only, so every entry is present in its shard (transformers itself omits tied keys
  and re-ties them from the config); in ``.bin`` shards both names share one storage, and
  a tie joins the shard of the name it ties to, as huggingface_hub places shared storages;
- sizes are parsed like transformers / huggingface_hub: an int is bytes; ``"5GB"``,
  ``"500MB"``, ``"50KB"``, ``"1TB"`` are decimal, ``"2GiB"``, ``"1MiB"``, ``"1KiB"`` binary;
  the default is huggingface_hub's ``"5GB"``.

Sidecars: when the source is a Hugging Face directory (or a file inside one: its folder has
``config.json`` or ``adapter_config.json``), the folder's other top-level files are carried
over (config, generation config, tokenizer files, model card) if modelport's detector does
not take them for weights (by content: old weights, Git LFS pointers and pickles such as
``training_args.bin`` stay behind), they are not a ``*.index.json`` with a ``weight_map``,
not a weights format modelport cannot read (Flax ``.msgpack``, TensorFlow checkpoints), not
hidden, and at most ``limits.MAX_SIDECAR_BYTES`` bytes. Subdirectories are not copied (the
report names them). When the tensors are cast, ``config.json``'s ``dtype`` /
``torch_dtype`` is updated to the new dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from modelport import limits
from modelport.errors import (
    ModelportError,
    NotAModelError,
    UnknownFormatError,
    UsageError,
)
from modelport.formats import (
    _hf_folder,
    adapters,
    hf_dir,
    safetensors,
    safetensors_writer,
    sentence_transformers_dir,
    torch_zip,
)
from modelport.formats.protocol import Format, FormatReader, Probe
from modelport.formats.registry import detect
from modelport.transfer.streaming import write_all
from modelport.transfer.write_plan import OutputTensor, WritePlan
from modelport.tree import names as trees

DEFAULT_SHARD_SIZE: Final = "5GB"
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
class Scheme:
    """The names one library gives its weight files in a folder, and their format."""

    library: str  # transformers, diffusers, peft-adapter: the layout it belongs to
    stem: str  # model, pytorch_model, diffusion_pytorch_model, adapter_model
    extension: str  # safetensors, or bin (a torch zip)
    sharded: bool = True  # False: one file whatever its size (PEFT adapters)

    @property
    def single(self) -> str:
        return f"{self.stem}.{self.extension}"

    @property
    def index(self) -> str:
        return f"{self.single}.index.json"

    @property
    def binary(self) -> bool:
        return self.extension == "bin"

    def shard(self, number: int, count: int) -> str:
        return f"{self.stem}-{number:05d}-of-{count:05d}.{self.extension}"

    def owns(self, name: str) -> bool:
        """Whether a file in a target folder belongs to this scheme, which new weights of
        the scheme replace. Other weights (``pytorch_model.bin`` beside ``model.safetensors``,
        ``tf_model.h5``) and everything else are never removed."""
        shard = rf"{re.escape(self.stem)}-\d{{5}}-of-\d{{5}}\.{self.extension}"
        return name in (self.single, self.index) or re.fullmatch(shard, name) is not None

    def write(self, handle: BinaryIO, plan: WritePlan) -> None:
        writer = torch_zip.READER.write if self.binary else safetensors_writer.write
        assert writer is not None
        writer(handle, plan)


SCHEMES: Final = {
    ("transformers", False): Scheme("transformers", "model", "safetensors"),
    ("transformers", True): Scheme("transformers", "pytorch_model", "bin"),
    ("diffusers", False): Scheme("diffusers", _hf_folder.DIFFUSERS_STEM, "safetensors"),
    ("diffusers", True): Scheme("diffusers", _hf_folder.DIFFUSERS_STEM, "bin"),
    ("peft-adapter", False): Scheme("peft-adapter", "adapter_model", "safetensors", False),
    ("peft-adapter", True): Scheme("peft-adapter", "adapter_model", "bin", False),
}
SAFETENSORS: Final = SCHEMES["transformers", False]


def scheme_for(source: Path | None, binary: bool) -> Scheme:
    """The scheme of the source's library: a diffusers model keeps
    ``diffusion_pytorch_model``, a PEFT adapter ``adapter_model``, anything else takes
    transformers' names."""
    layout = "transformers"
    if source is not None and source.exists():
        folder = source if source.is_dir() else source.parent
        if source.is_file() and source.name.startswith(_hf_folder.DIFFUSERS_STEM):
            layout = "diffusers"
        elif source.is_file() and source.name.startswith("adapter_model."):
            layout = "peft-adapter"
        elif source.is_dir() or _is_hf_folder(folder):
            layout = _hf_folder.layout_of(folder)
    return SCHEMES[layout, binary]


def _is_hf_folder(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() or (folder / adapters.ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class Layout:
    """Where each tensor goes: shard file names with their plans, and the index (or None)."""

    shards: tuple[tuple[str, WritePlan], ...]
    index: dict[str, Any] | None
    scheme: Scheme = SAFETENSORS

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shards)


def split(
    tensors: tuple[OutputTensor, ...], limit: int, tied: bool = False
) -> list[list[OutputTensor]]:
    """huggingface_hub's greedy cut, in order; an oversized tensor sits alone. With
    ``tied``, a tensor that shares its stored view with an earlier one (a tie a torch
    archive stores once) joins that one's shard and adds nothing to its size."""
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    current_size = 0
    placed: dict[tuple[Any, ...], list[OutputTensor]] = {}
    later: list[tuple[list[OutputTensor], OutputTensor]] = []
    for tensor in tensors:
        key = _tie_key(tensor) if tied else None
        if key is not None and key in placed:
            later.append((placed[key], tensor))
            continue
        if tensor.nbytes > limit:
            shards.append([tensor])
            if key is not None:
                placed[key] = shards[-1]
            continue
        if current and current_size + tensor.nbytes > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(tensor)
        current_size += tensor.nbytes
        if key is not None:
            placed[key] = current
    if current or not shards:
        shards.append(current)
    for shard, tensor in later:
        shard.append(tensor)
    return shards


def _tie_key(tensor: OutputTensor) -> tuple[Any, ...] | None:
    """Two names of one stored view, written uncast: a torch archive stores it once."""
    if tensor.is_cast or tensor.source.storage is None or tensor.nbytes == 0:
        return None
    return (*trees.view_key(tensor.source), tensor.dtype)


def stored(plan_tensors: tuple[OutputTensor, ...], tied: bool) -> list[OutputTensor]:
    """The tensors whose bytes are stored: with ``tied``, each shared view once."""
    seen: set[tuple[Any, ...]] = set()
    kept = []
    for tensor in plan_tensors:
        key = _tie_key(tensor) if tied else None
        if key is None or key not in seen:
            kept.append(tensor)
        if key is not None:
            seen.add(key)
    return kept


def aliases_of(plan: WritePlan) -> dict[str, str]:
    """The ``alias -> kept`` records among the plan's metadata (kept is a stored tensor)."""
    stored = {t.name for t in plan.tensors}
    return {k: v for k, v in plan.metadata.items() if v in stored and k not in stored}


def layout(plan: WritePlan, limit: int, scheme: Scheme = SAFETENSORS) -> Layout:
    if not scheme.sharded:
        groups = [list(plan.tensors)]
    else:
        groups = split(plan.tensors, limit, tied=scheme.binary)
    if len(groups) == 1:
        return Layout(((scheme.single, WritePlan(tuple(groups[0]), plan.metadata)),), None, scheme)
    names = [scheme.shard(i + 1, len(groups)) for i in range(len(groups))]
    shards = tuple(
        (name, WritePlan(tuple(group), plan.metadata))
        for name, group in zip(names, groups, strict=True)
    )
    metadata: dict[str, Any] = {
        k: v for k, v in plan.metadata.items() if k.startswith("modelport.")
    }
    metadata.update(aliases_of(plan))
    kept = stored(plan.tensors, scheme.binary)
    metadata["total_size"] = sum(t.nbytes for t in kept)
    metadata["total_parameters"] = sum(math.prod(t.shape) for t in kept)
    weight_map = {t.name: name for name, part in shards for t in part.tensors}
    return Layout(shards, {"metadata": metadata, "weight_map": weight_map}, scheme)


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
    if not (_is_hf_folder(folder) or (source.is_dir() and hf_dir.sniff(Probe.of(source)))):
        return [], []
    if source.is_dir():
        return carried_files(folder, reserved)
    carried, notes = carried_files(folder, reserved, source)
    if sentence_transformers_dir.sniff(folder):
        notes.append(
            f"{source.name} holds one module of the sentence-transformers model in "
            f"{folder.name}: convert the folder to keep its other modules"
        )
    return carried, notes


def carried_files(
    folder: Path,
    reserved: frozenset[str] = frozenset(),
    source: Path | None = None,
    written: frozenset[str] = frozenset(),
) -> tuple[list[Path], list[str]]:
    """The top-level files of ``folder`` that are no weights (see the module docstring),
    the ``source`` file itself left out, and notes on what stays behind; subfolders in
    ``written`` (a pipeline's components, written on their own) are not among them."""
    carried: list[Path] = []
    left: list[str] = []
    subfolders: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in written:
                subfolders.append(entry.name)
            continue
        if not entry.is_file() or (source is not None and entry.samefile(source)):
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
    scheme: Scheme = SAFETENSORS,
) -> Layout:
    """Write the shards, the index and the sidecars into ``directory`` (empty, existing)."""
    planned = layout(plan, limit, scheme)
    for name, part in planned.shards:
        with open(directory / name, "xb", buffering=0) as handle:
            scheme.write(handle, part)
            if fsync:
                os.fsync(handle.fileno())
    if planned.index is not None:
        _write_file(directory / scheme.index, index_bytes(planned.index), fsync)
    carried, _ = sidecars(source, weight_names(planned))
    copy_files(directory, carried, cast, fsync)
    return planned


def copy_files(directory: Path, carried: list[Path], cast: str | None, fsync: bool) -> None:
    """The sidecars into ``directory``; ``config.json`` with its dtype recast."""
    for path in carried:
        data = _recast_config(path, cast) if path.name == CONFIG_NAME and cast else None
        if data is not None:
            _write_file(directory / CONFIG_NAME, data, fsync)
        else:
            shutil.copyfile(path, directory / path.name)


def weight_names(planned: Layout) -> frozenset[str]:
    """The names the new weights take in the directory."""
    return frozenset((*planned.files, planned.scheme.index))


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
BIN_TARGET = FormatReader(  # --to hf-bin: the same folders, weights as torch zips (.bin)
    Format.HF_DIR,
    hf_dir.sniff,
    hf_dir.read,
    (),
    holds=torch_zip.holds,
    shares_storage=True,
)


def is_target(writer: FormatReader) -> bool:
    return writer is TARGET or writer is BIN_TARGET
