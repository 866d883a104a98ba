"""Hugging Face model directories: ``config.json`` plus weights in one file or in shards.

Layout (transformers ``save_pretrained``; huggingface_hub ``split_torch_state_dict``):

- ``config.json`` MAY be present: a JSON object (``model_type``, ``architectures``,
  ``torch_dtype`` or ``dtype`` ...);
- the weights MUST be, in the order transformers prefers them: a
  ``*.safetensors.index.json``, a single ``model.safetensors`` (or diffusers / PEFT
  names), a ``*.bin.index.json``, a single ``pytorch_model.bin``; any other ``*.index.json``
  with a ``weight_map`` counts too, with or without ``config.json``;
- an index MUST be ``{"metadata": {...}, "weight_map": {tensor: shard file}}``; every
  entry MUST be present in its shard, no tensor may appear in two shards, and shard names
  MUST stay inside the directory (``../x`` and absolute names are refused, never opened);
- ``metadata.total_size`` SHOULD equal the bytes of the stored tensors (tied weights are
  stored once);
- safetensors ``__metadata__`` MAY record aliases ``{removed: kept}``
  (``safetensors.torch.save_model`` drops shared tensors so).

Each shard is read by whichever modelport reader its content calls for. The tree is a
flat dict ``name -> TensorRef`` in ``weight_map`` order (file order without an index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from modelport import dtypes, limits
from modelport.errors import CorruptFileError, LimitExceededError, ModelportError
from modelport.formats.file_formats import FILE_READERS
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.formats.sniffing import identify
from modelport.tensors import TensorRef
from modelport.tree import names as trees

CONFIG_NAME: Final = "config.json"
INDEX_SUFFIX: Final = ".index.json"
SAFETENSORS_NAMES: Final = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "adapter_model.safetensors",
)
BIN_NAMES: Final = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "adapter_model.bin")
SNIFF_BYTES = 64 * 1024
CONFIG_FIELDS: Final = ("model_type", "architectures", "torch_dtype", "dtype")


def sniff(probe: Probe) -> bool:
    if not probe.is_dir:
        return False
    for index in probe.path.glob("*" + INDEX_SUFFIX):
        if index.is_file():
            with open(index, "rb") as handle:
                head = handle.read(SNIFF_BYTES)
            if b'"weight_map"' in head or index.stat().st_size > SNIFF_BYTES:
                return True
    if not (probe.path / CONFIG_NAME).is_file():
        return False
    return any((probe.path / name).is_file() for name in SAFETENSORS_NAMES + BIN_NAMES)


def read(path: Path, probe: Probe) -> Contents:
    warnings: list[str] = []
    details: dict[str, Any] = {}
    config = _config(path, warnings)
    details.update({k: config[k] for k in CONFIG_FIELDS if k in config})
    index_path, files, skipped = _choose(path)
    if skipped:
        details["ignored_weights"] = skipped
    metadata: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    if index_path is not None:
        index = _load_json(index_path)
        weight_map = _weight_map(index, index_path)
        raw_meta = index.get("metadata") or {}
        metadata = dict(raw_meta) if isinstance(raw_meta, dict) else {}
        details["index"] = index_path.name
        files = list(dict.fromkeys(weight_map.values()))
    closers: list[Any] = []
    shards: dict[str, dict[str, TensorRef]] = {}
    aliases: dict[str, str] = {}
    formats: set[str] = set()
    try:
        for name in files:
            shard = _inside(path, name)
            tensors, shard_meta, fmt = _read_shard(shard, name, warnings, closers)
            formats.add(fmt)
            shards[name] = tensors
            for removed, kept in shard_meta.items():
                restored = tensors.get(removed) is tensors.get(kept)  # the reader re-tied it
                if kept in tensors and removed != "format" and (restored or removed not in tensors):
                    aliases[removed] = kept
            if index_path is None and len(files) == 1:
                metadata = {k: v for k, v in shard_meta.items() if k not in aliases}
        tree = _merge(shards, weight_map, warnings, path)
    except BaseException:
        _close_all(closers)
        raise
    details.update(files=files, shard_formats=sorted(formats))
    if aliases:
        details["aliases"] = aliases
    _check_totals(metadata, tree, config, warnings)
    return Contents(
        Format.HF_DIR,
        tree,
        metadata=metadata,
        details=details,
        warnings=warnings,
        close=(lambda: _close_all(closers)) if closers else None,
    )


def _config(path: Path, warnings: list[str]) -> dict[str, Any]:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        return {}
    try:
        config = _load_json(config_path)
    except ModelportError as exc:
        warnings.append(f"config.json ignored: {exc}")
        return {}
    return config


def _load_json(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > limits.MAX_HF_INDEX_JSON:
        raise LimitExceededError(f"{path.name} size", limits.MAX_HF_INDEX_JSON, size, path=path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{path.name} is not valid JSON ({exc})", path=path) from None
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path.name} is not a JSON object", path=path)
    return value


def _choose(path: Path) -> tuple[Path | None, list[str], list[str]]:
    """(index, weight files, weight files left aside), safetensors first as in transformers."""
    indexes = sorted(p for p in path.glob("*" + INDEX_SUFFIX) if p.is_file())
    st_indexes = [p for p in indexes if ".safetensors" in p.name]
    singles_st = [n for n in SAFETENSORS_NAMES if (path / n).is_file()]
    singles_bin = [n for n in BIN_NAMES if (path / n).is_file()]
    ranked: list[tuple[Path | None, list[str]]] = [
        *((p, []) for p in st_indexes),
        *((None, [n]) for n in singles_st),
        *((p, []) for p in indexes if p not in st_indexes),
        *((None, [n]) for n in singles_bin),
    ]
    if not ranked:
        loose = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
        if not loose:
            raise CorruptFileError(
                "Hugging Face directory without weights (no *.safetensors, pytorch_model.bin "
                "or *.index.json)",
                path=path,
            )
        return None, loose, []
    chosen_index, chosen_files = ranked[0]
    skipped = [p.name if p is not None else files[0] for p, files in ranked[1:]]
    return chosen_index, chosen_files, skipped


def _weight_map(index: dict[str, Any], index_path: Path) -> dict[str, str]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptFileError("index has no weight_map of names to files", path=index_path)
    return weight_map


def _inside(root: Path, name: str) -> Path:
    """A shard named by the index, refused when it would leave the directory."""
    if "\x00" in name:  # no file system accepts it; os calls would raise ValueError
        raise CorruptFileError(f"weight file name {name!r} holds a NUL byte", path=root)
    candidate = Path(name)
    if (
        not name
        or candidate.is_absolute()
        or ".." in candidate.parts
        or "\\" in name
        or ":" in name
    ):
        raise CorruptFileError(f"weight file {name!r} lies outside the directory", path=root)
    target = (root / candidate).resolve()
    if not target.is_relative_to(root.resolve()):
        raise CorruptFileError(f"weight file {name!r} lies outside the directory", path=root)
    if not target.is_file():
        raise CorruptFileError(f"weight file {name!r} is missing", path=root)
    return target


def _read_shard(
    shard: Path, name: str, warnings: list[str], closers: list[Any]
) -> tuple[dict[str, TensorRef], dict[str, Any], str]:
    reader, probe, notes = identify(shard, FILE_READERS)
    if probe.is_dir or reader.format is Format.HF_DIR:
        raise CorruptFileError(f"weight file {name!r} is not a file of weights", path=shard)
    contents = reader.contents(probe)
    if contents.close is not None:
        closers.append(contents.close)
    warnings.extend(f"{name}: {note}" for note in notes + contents.warnings)
    tensors = trees.tensors_of(contents.tree)
    meta = contents.metadata if reader.format is Format.SAFETENSORS else {}
    return tensors, dict(meta), reader.format.value


def _merge(
    shards: dict[str, dict[str, TensorRef]],
    weight_map: dict[str, str],
    warnings: list[str],
    root: Path,
) -> dict[str, TensorRef]:
    owner: dict[str, str] = {}
    for file, tensors in shards.items():
        for tensor in tensors:
            if tensor in owner:
                raise CorruptFileError(
                    f"tensor {tensor!r} is stored in both {owner[tensor]} and {file}", path=root
                )
            owner[tensor] = file
    merged: dict[str, TensorRef] = {}
    for tensor, file in weight_map.items():
        if tensor not in shards[file]:
            raise CorruptFileError(
                f"index lists tensor {tensor!r} in {file}, which does not hold it", path=root
            )
        merged[tensor] = shards[file][tensor]
    unlisted = [t for t in owner if t not in merged]
    listed = {id(x) for x in merged.values()}
    aliased = {t for t in unlisted if id(shards[owner[t]][t]) in listed}
    if weight_map and len(unlisted) > len(aliased):  # a restored alias need not be listed
        warnings.append(
            f"{len(unlisted) - len(aliased)} tensor(s) in the shards are not in the index"
        )
    for tensor in unlisted:
        merged[tensor] = shards[owner[tensor]][tensor]
    return merged


def _check_totals(
    metadata: dict[str, Any],
    tree: dict[str, TensorRef],
    config: dict[str, Any],
    warnings: list[str],
) -> None:
    declared = metadata.get("total_size")
    stored = sum(t.nbytes for t in {id(t): t for t in tree.values()}.values())  # ties once
    if isinstance(declared, int) and declared != stored:
        warnings.append(f"index total_size is {declared:,} bytes, the tensors hold {stored:,}")
    wanted = config.get("torch_dtype") or config.get("dtype")
    floating = {t.dtype for t in tree.values() if dtypes.dtype(t.dtype).is_floating}
    if isinstance(wanted, str) and wanted in dtypes.DTYPES and floating and wanted not in floating:
        warnings.append(
            f"config.json says dtype {wanted}, the weights are {', '.join(sorted(floating))}"
        )


def _close_all(closers: list[Any]) -> None:
    for close in closers:
        close()


READER = FormatReader(Format.HF_DIR, sniff, read, ())
