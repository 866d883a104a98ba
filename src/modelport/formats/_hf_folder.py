"""One Hugging Face model folder: a config plus weights in one file or in shards.

Layout (transformers and diffusers ``save_pretrained``, PEFT adapters; huggingface_hub
``split_torch_state_dict_into_shards``):

- ``config.json`` MAY be present: a JSON object (``model_type``, ``architectures``,
  ``torch_dtype`` or ``dtype`` for transformers; ``_class_name`` and ``_diffusers_version``
  for a diffusers model); a PEFT adapter has ``adapter_config.json`` instead;
- the weights MUST be, in the order transformers and diffusers prefer them: a
  ``*.safetensors.index.json``, a single ``model.safetensors`` (diffusers:
  ``diffusion_pytorch_model.safetensors``, PEFT: ``adapter_model.safetensors``), a
  ``*.bin.index.json``, a single ``pytorch_model.bin`` (``diffusion_pytorch_model.bin``,
  ``adapter_model.bin``); any other ``*.index.json`` with a ``weight_map`` counts too;
  a variant (``diffusion_pytorch_model.fp16.safetensors``) is read when the plain name is
  absent, and otherwise listed among the weights left aside;
- an index MUST be ``{"metadata": {...}, "weight_map": {tensor: shard file}}``; every
  entry MUST be present in its shard, no tensor may appear in two shards, and shard names
  MUST stay inside the directory (``../x`` and absolute names are refused, never opened);
  transformers 4.x's TF index (``tf_model.h5.index.json``) names each variable with its
  model scope (``tf_bert_model/bert/...:0``), which its HDF5 shards leave out;
- ``metadata.total_size`` SHOULD equal the bytes of the stored tensors (tied weights are
  stored once);
- safetensors ``__metadata__`` MAY record aliases ``{removed: kept}``
  (``safetensors.torch.save_model`` drops shared tensors so).

Each shard is read by whichever modelport reader its content calls for. The tree is a
flat dict ``name -> TensorRef`` in ``weight_map`` order (file order without an index).
``details["layout"]`` names the library whose layout the folder follows: ``transformers``,
``diffusers`` or ``peft-adapter``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Final

from modelport import dtypes, limits
from modelport.errors import CorruptFileError, LimitExceededError, ModelportError
from modelport.formats import adapters
from modelport.formats.protocol import Contents, Format
from modelport.formats.registry import FILE_SLOTS, detect
from modelport.tensors import TensorRef
from modelport.tree import names as trees

CONFIG_NAME: Final = "config.json"
INDEX_SUFFIX: Final = ".index.json"
DIFFUSERS_STEM: Final = "diffusion_pytorch_model"
SAFETENSORS_NAMES: Final = (
    "model.safetensors",
    f"{DIFFUSERS_STEM}.safetensors",
    "adapter_model.safetensors",
)
BIN_NAMES: Final = (
    "pytorch_model.bin",
    f"{DIFFUSERS_STEM}.bin",
    "adapter_model.bin",
    "flax_model.msgpack",
)
VARIANT: Final = re.compile(
    rf"(model|pytorch_model|{DIFFUSERS_STEM}|adapter_model)\.[A-Za-z0-9_-]+\.(safetensors|bin)"
)
SNIFF_BYTES = 64 * 1024
TF_INDEX: Final = "tf_model.h5.index.json"  # transformers 4.x TF shards: tf_model-00001-of-N.h5
CONFIG_FIELDS: Final = ("model_type", "architectures", "torch_dtype", "dtype")
DIFFUSERS_FIELDS: Final = {"_class_name": "class", "_diffusers_version": "diffusers_version"}


def has_index(path: Path) -> bool:
    """A ``*.index.json`` with a ``weight_map`` (or too large to tell from its head)."""
    for index in path.glob("*" + INDEX_SUFFIX):
        if index.is_file():
            with open(index, "rb") as handle:
                head = handle.read(SNIFF_BYTES)
            if b'"weight_map"' in head or index.stat().st_size > SNIFF_BYTES:
                return True
    return False


def weight_files(path: Path) -> list[str]:
    """The single weight files of the folder's libraries, variants included."""
    return sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and (p.name in SAFETENSORS_NAMES + BIN_NAMES or VARIANT.fullmatch(p.name))
    )


def sniff_folder(path: Path) -> bool:
    """A folder of one model: an index, or a config beside weights of a known name."""
    if has_index(path):
        return True
    configs = (path / CONFIG_NAME, path / adapters.ADAPTER_CONFIG)
    return any(c.is_file() for c in configs) and bool(weight_files(path))


def layout_of(path: Path) -> str:
    """Whose layout ``path`` (a folder) follows: ``peft-adapter`` (an adapter config and
    adapter weights, no ``config.json``), ``diffusers`` or ``transformers``, by its config
    files and weight names."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    adapter = adapters.ADAPTER_CONFIG in names and any(n.startswith("adapter_model") for n in names)
    if adapter and CONFIG_NAME not in names:  # beside a model's config, the model counts
        return "peft-adapter"
    if any(n.startswith(DIFFUSERS_STEM) for n in names):
        return "diffusers"
    config = path / CONFIG_NAME
    if config.is_file() and config.stat().st_size <= limits.MAX_HF_INDEX_JSON:
        with open(config, "rb") as handle:
            if b'"_diffusers_version"' in handle.read(SNIFF_BYTES):
                return "diffusers"
    return "transformers"


def read_folder(path: Path) -> Contents:
    """The folder as one model (see the module docstring)."""
    warnings: list[str] = []
    layout = layout_of(path)
    details: dict[str, Any] = {"layout": layout}
    if layout == "peft-adapter":
        details.update(adapters.adapter_details(_config(path, adapters.ADAPTER_CONFIG, warnings)))
        config: dict[str, Any] = {}
    else:
        config = _config(path, CONFIG_NAME, warnings)
        fields = DIFFUSERS_FIELDS if layout == "diffusers" else {k: k for k in CONFIG_FIELDS}
        details.update({shown: config[k] for k, shown in fields.items() if k in config})
    index_path, files, skipped = _choose(path)
    if skipped:
        details["ignored_weights"] = skipped
    metadata: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    if index_path is not None:
        index = load_json(index_path)
        weight_map = _weight_map(index, index_path)
        if index_path.name == TF_INDEX:
            weight_map = {tf_dataset_name(name): file for name, file in weight_map.items()}
        raw_meta = index.get("metadata") or {}
        metadata = dict(raw_meta) if isinstance(raw_meta, dict) else {}
        details["index"] = index_path.name
        files = list(dict.fromkeys(weight_map.values()))
    closers: list[Any] = []
    try:
        tree, aliases, formats, single_meta = _read_shards(
            path, files, weight_map, warnings, closers
        )
    except BaseException:
        close_all(closers)
        raise
    if index_path is None and len(files) == 1:
        metadata = single_meta
    details.update(files=files, shard_formats=sorted(formats))
    if aliases:
        details["aliases"] = aliases
    if layout == "peft-adapter":
        details["lora"] = adapters.lora_details(tree, metadata)
    _check_totals(metadata, tree, config, warnings)
    return Contents(
        Format.HF_DIR,
        tree,
        metadata=metadata,
        details=details,
        warnings=warnings,
        close=(lambda: close_all(closers)) if closers else None,
    )


def _read_shards(
    path: Path,
    files: list[str],
    weight_map: dict[str, str],
    warnings: list[str],
    closers: list[Any],
) -> tuple[dict[str, TensorRef], dict[str, str], set[str], dict[str, Any]]:
    """The merged tensors, the aliases the shards record, the shards' formats, and the
    metadata of the last shard read (less its alias records)."""
    shards: dict[str, dict[str, TensorRef]] = {}
    aliases: dict[str, str] = {}
    formats: set[str] = set()
    metadata: dict[str, Any] = {}
    for name in files:
        shard = _inside(path, name)
        tensors, shard_meta, fmt = _read_shard(shard, name, warnings, closers)
        formats.add(fmt)
        shards[name] = tensors
        for removed, kept in shard_meta.items():
            restored = tensors.get(removed) is tensors.get(kept)  # the reader re-tied it
            if kept in tensors and removed != "format" and (restored or removed not in tensors):
                aliases[removed] = kept
        metadata = {k: v for k, v in shard_meta.items() if k not in aliases}
    return _merge(shards, weight_map, warnings, path), aliases, formats, metadata


def _config(path: Path, name: str, warnings: list[str]) -> dict[str, Any]:
    config_path = path / name
    if not config_path.is_file():
        return {}
    try:
        config = load_json(config_path)
    except ModelportError as exc:
        warnings.append(f"{name} ignored: {exc}")
        return {}
    return config


def load_json_value(path: Path) -> Any:
    """Any JSON value from a small file, or ``CorruptFileError`` / ``LimitExceededError``."""
    size = path.stat().st_size
    if size > limits.MAX_HF_INDEX_JSON:
        raise LimitExceededError(f"{path.name} size", limits.MAX_HF_INDEX_JSON, size, path=path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{path.name} is not valid JSON ({exc})", path=path) from None


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from a small file, or ``CorruptFileError`` / ``LimitExceededError``."""
    value = load_json_value(path)
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path.name} is not a JSON object", path=path)
    return value


def _choose(path: Path) -> tuple[Path | None, list[str], list[str]]:
    """(index, weight files, weight files left aside), safetensors first as in transformers,
    plain names before variants."""
    indexes = sorted(p for p in path.glob("*" + INDEX_SUFFIX) if p.is_file())
    st_indexes = [p for p in indexes if ".safetensors" in p.name]
    variants = [n for n in weight_files(path) if VARIANT.fullmatch(n)]
    singles_st = [n for n in SAFETENSORS_NAMES if (path / n).is_file()]
    singles_bin = [n for n in BIN_NAMES if (path / n).is_file()]
    ranked: list[tuple[Path | None, list[str]]] = [
        *((p, []) for p in st_indexes),
        *((None, [n]) for n in singles_st),
        *((None, [n]) for n in variants if n.endswith(".safetensors")),
        *((p, []) for p in indexes if p not in st_indexes),
        *((None, [n]) for n in singles_bin),
        *((None, [n]) for n in variants if n.endswith(".bin")),
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


def tf_dataset_name(name: str) -> str:
    """Where transformers 4.x's TF shards store the variable its index names: the name less
    its model scope (``tf_bert_model/``), unless it holds ``model.`` or has one part."""
    parts = name.split("/")
    return name if "model." in name or len(parts) == 1 else "/".join(parts[1:])


def _weight_map(index: dict[str, Any], index_path: Path) -> dict[str, str]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptFileError("index has no weight_map of names to files", path=index_path)
    return weight_map


def inside(root: Path, name: str, what: str = "weight file") -> Path:
    """``root / name``, refused when it would leave the directory (``what`` names it)."""
    if "\x00" in name:  # no file system accepts it; os calls would raise ValueError
        raise CorruptFileError(f"{what} name {name!r} holds a NUL byte", path=root)
    candidate = Path(name)
    if (
        not name
        or candidate.is_absolute()
        or ".." in candidate.parts
        or "\\" in name
        or ":" in name
    ):
        raise CorruptFileError(f"{what} {name!r} lies outside the directory", path=root)
    target = (root / candidate).resolve()
    if not target.is_relative_to(root.resolve()):
        raise CorruptFileError(f"{what} {name!r} lies outside the directory", path=root)
    return target


def _inside(root: Path, name: str) -> Path:
    """A shard named by the index: inside the directory, and present."""
    target = inside(root, name)
    if not target.is_file():
        raise CorruptFileError(f"weight file {name!r} is missing", path=root)
    return target


def _read_shard(
    shard: Path, name: str, warnings: list[str], closers: list[Any]
) -> tuple[dict[str, TensorRef], dict[str, Any], str]:
    reader, probe, notes = detect(shard, FILE_SLOTS)
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


def stored_bytes(tensors: dict[str, TensorRef]) -> int:
    """The bytes the tensors take on disk, a view stored twice (tied weights) once."""
    seen: dict[tuple[Any, ...], int] = {}
    for tensor in tensors.values():
        seen[trees.view_key(tensor)] = tensor.nbytes
    return sum(seen.values())


def _check_totals(
    metadata: dict[str, Any],
    tree: dict[str, TensorRef],
    config: dict[str, Any],
    warnings: list[str],
) -> None:
    declared = metadata.get("total_size")
    stored = stored_bytes(tree)
    if isinstance(declared, int) and declared != stored:
        warnings.append(f"index total_size is {declared:,} bytes, the tensors hold {stored:,}")
    wanted = config.get("torch_dtype") or config.get("dtype")
    floating = {t.dtype for t in tree.values() if dtypes.dtype(t.dtype).is_floating}
    if isinstance(wanted, str) and wanted in dtypes.DTYPES and floating and wanted not in floating:
        warnings.append(
            f"config.json says dtype {wanted}, the weights are {', '.join(sorted(floating))}"
        )


class Parts:
    """What reading a model made of several folders gathers, folder by folder."""

    def __init__(self, details: dict[str, Any]) -> None:
        self.tree: dict[str, TensorRef] = {}
        self.aliases: dict[str, str] = {}
        self.warnings: list[str] = []
        self.closers: list[Any] = []
        self.details = details


def read_prefixed(
    folder: Path,
    prefix: str,
    tree: dict[str, TensorRef],
    aliases: dict[str, str],
    warnings: list[str],
    closers: list[Any],
) -> Contents:
    """One model folder of a model made of several (a pipeline's component, a
    sentence-transformers module): its tensors and aliases join ``tree`` and ``aliases``
    under ``prefix``, its warnings under the folder's name; a name already taken is refused
    rather than silently replaced."""
    contents = read_folder(folder)
    if contents.close is not None:
        closers.append(contents.close)
    for name, tensor in contents.tree.items():
        if prefix + name in tree:
            raise CorruptFileError(f"tensor {prefix + name!r} is named twice", path=folder)
        tree[prefix + name] = tensor
    for alias, kept in contents.details.get("aliases", {}).items():
        aliases[prefix + alias] = prefix + kept
    label = f"{folder.name}/: " if prefix else ""
    warnings.extend(label + w for w in contents.warnings)
    return contents


def parts_contents(
    path: Path,
    parts: Parts,
    index_name: str,
    named: Collection[Path],
    holds_weights: Callable[[Path], bool],
) -> Contents:
    """The contents of a model made of several folders: ``parts`` as read (a pipeline's
    components, a sentence-transformers model's modules), closing every folder read, with a
    warning for each subfolder that ``holds_weights`` but ``index_name`` does not name
    (``named``: the folders it does, resolved)."""
    for sub in sorted(path.iterdir()):
        if sub.is_dir() and sub.resolve() not in named and holds_weights(sub):
            parts.warnings.append(
                f"{sub.name}/ holds weights that {index_name} does not name: ignored"
            )
    closers = parts.closers
    return Contents(
        Format.HF_DIR,
        parts.tree,
        details=parts.details,
        warnings=parts.warnings,
        close=(lambda: close_all(closers)) if closers else None,
    )


def close_all(closers: list[Any]) -> None:
    for close in closers:
        close()
