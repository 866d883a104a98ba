"""sentence-transformers models: ``modules.json`` and a folder per module.

Layout (sentence-transformers ``SentenceTransformer.save``, ``CrossEncoder`` and
``SparseEncoder`` alike), what ``SentenceTransformer(path)`` reads back:

- ``modules.json`` MUST be a JSON list of modules in the order they run, each
  ``{"idx": i, "name": str, "path": folder, "type": "package.module.Class"}``; ``type``
  names the class the library imports to load the module (a ``type`` outside
  ``sentence_transformers.`` is code from elsewhere: the scanner reports it, modelport never
  imports it); ``path`` is the module's folder relative to the model's, ``""`` for the
  model's own (where current releases keep a first Transformer module: ``config.json``,
  ``model.safetensors``, tokenizer files, ``sentence_bert_config.json``); early releases
  wrote every module in a subfolder (``0_BERT/``, ``0_Transformer/``); a path that would
  leave the folder is refused;
- a module folder holding weights is a Hugging Face model folder (``_hf_folder``): the
  Transformer module's as transformers saves it (sharded with an index when large), any
  other module's (``2_Dense/``: ``config.json`` with ``in_features``, ``out_features``,
  ``activation_function``; ``linear.weight``, ``linear.bias``) one ``model.safetensors`` or
  ``pytorch_model.bin``, which sentence-transformers reads unsharded;
- modules without weights keep only configuration (``1_Pooling/config.json``,
  ``3_Normalize/``); ``config_sentence_transformers.json`` (``model_type``, versions,
  prompts, similarity function) and ``README.md`` sit at the top;
- a Router module (sentence-transformers 5 and later: asymmetric query and document
  encoders, inference-free sparse encoders) routes inputs to modules of its own, each in a
  subfolder of the Router's folder that ``router_config.json`` (``config.json`` in early
  releases) names in ``types`` (folder to class, imported as a module's ``type`` is) and
  ``structure`` (route to folders): ``query_0_StaticEmbedding/``,
  ``document_0_SparseStaticEmbedding/``; such a folder is a module like any other, its path
  the Router's joined with its own.

Read as one model: each module folder that holds weights is read as a Hugging Face folder,
its tensors named ``<path>/<name>`` (``2_Dense/linear.weight``; a Transformer module at the
top keeps its own names, which hold no ``/``), modules in ``modules.json`` order.
``details["module_folders"]`` lists every module with its type and, for those with weights,
tensor count and files. Subfolders with weights that ``modules.json`` does not name
(``onnx/``, ``openvino/`` exports) are left out with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from modelport.errors import CorruptFileError, ModelportError
from modelport.formats import _hf_folder
from modelport.formats.protocol import Contents
from modelport.tensors import TensorRef

MODULES_JSON: Final = "modules.json"
MODEL_CONFIG: Final = "config_sentence_transformers.json"
ROUTER_CONFIGS: Final = ("router_config.json", "config.json")  # the current name first
MAX_ROUTER_DEPTH: Final = 8  # Routers inside Routers: real models nest none
SEPARATOR: Final = "/"  # between a module's folder and its tensors' names
TOP: Final = ""  # the model's own folder, as a module path


@dataclass(frozen=True)
class Module:
    """One entry of ``modules.json``: its folder relative to the model's (``TOP`` for the
    model's own), the class sentence-transformers imports for it, and the folder when it
    exists."""

    path: str
    type: str
    folder: Path | None

    @property
    def has_weights(self) -> bool:
        return self.folder is not None and holds_weights(self.folder)

    @property
    def prefix(self) -> str:
        """What the module's tensor names start with in the model read as one."""
        return self.path + SEPARATOR if self.path else ""

    @property
    def loads_shards(self) -> bool:
        """Whether the module's loader reads sharded weights: a Transformer module loads
        through transformers' ``from_pretrained``; every other one reads one file."""
        return self.type.rpartition(".")[2].endswith("Transformer")


def holds_weights(folder: Path) -> bool:
    """Weights of a Hugging Face name (or an index) in the folder itself."""
    return _hf_folder.has_index(folder) or bool(_hf_folder.weight_files(folder))


def sniff(path: Path) -> bool:
    """A folder with ``modules.json`` and weights at its top or in a subfolder."""
    if not (path / MODULES_JSON).is_file():
        return False
    return holds_weights(path) or any(
        sub.is_dir()
        and not sub.name.startswith(".")
        and (holds_weights(sub) or (sub / ROUTER_CONFIGS[0]).is_file())
        for sub in path.iterdir()
    )


def modules(path: Path) -> list[Module]:
    """The modules ``modules.json`` lists, in its order."""
    listed = _hf_folder.load_json_value(path / MODULES_JSON)
    if not isinstance(listed, list):
        raise CorruptFileError(f"{MODULES_JSON} is not a JSON list of modules", path=path)
    found: dict[str, Module] = {}
    for entry in listed:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("type"), str)
        ):
            raise CorruptFileError(
                f"{MODULES_JSON}: a module without a path and a type ({str(entry)[:80]})",
                path=path,
            )
        relative = _module_path(path, entry["path"])
        _add(path, Module(relative, entry["type"], _folder(path, relative)), found, 0)
    if not any(m.has_weights for m in found.values()):
        raise CorruptFileError(f"{MODULES_JSON} names no module folder holding weights", path=path)
    return list(found.values())


def _add(root: Path, module: Module, found: dict[str, Module], depth: int) -> None:
    """``module`` into ``found``, and after it, when it is a Router, the modules it routes to."""
    if module.path in found:
        raise CorruptFileError(f"{MODULES_JSON} lists {module.path!r} twice", path=root)
    found[module.path] = module
    routed = _routed(root, module)
    if routed and depth >= MAX_ROUTER_DEPTH:
        raise CorruptFileError(
            f"Routers nested more than {MAX_ROUTER_DEPTH} deep at {module.path!r}", path=root
        )
    for inner in routed:
        _add(root, inner, found, depth + 1)


def _routed(root: Path, router: Module) -> list[Module]:
    """The modules a Router module routes to, from its configuration's ``types``; none for
    any other module."""
    if router.folder is None or not router.type.endswith("Router"):
        return []
    config = next(
        (router.folder / n for n in ROUTER_CONFIGS if (router.folder / n).is_file()), None
    )
    if config is None:
        return []
    types = _hf_folder.load_json(config).get("types")
    if not isinstance(types, dict) or not all(isinstance(t, str) for t in types.values()):
        raise CorruptFileError(
            f"{config.name}: 'types' is not a map of folders to classes", path=config
        )
    routed = []
    for name, kind in types.items():
        relative = _module_path(root, f"{router.path}/{name}" if router.path else name)
        routed.append(Module(relative, kind, _folder(root, relative)))
    return routed


def _folder(root: Path, relative: str) -> Path | None:
    folder = root / relative if relative else root
    return folder if folder.is_dir() else None


def _module_path(root: Path, path: str) -> str:
    """The module's folder as a plain relative path (``""`` for the model's own), refused
    when it would leave the model's folder."""
    if path in ("", "."):
        return TOP
    _hf_folder.inside(root, path, "module folder")
    return PurePosixPath(path).as_posix()


def read(path: Path) -> Contents:
    listed = modules(path)
    parts = _hf_folder.Parts({"layout": "sentence-transformers"})
    try:
        described = [
            _module(m, parts.tree, parts.aliases, parts.warnings, parts.closers) for m in listed
        ]
    except BaseException:
        _hf_folder.close_all(parts.closers)
        raise
    kind = _model_type(path, parts.warnings)
    if kind is not None:
        parts.details["model_type"] = kind
    parts.details["module_folders"] = described
    if parts.aliases:
        parts.details["aliases"] = parts.aliases
    named = {m.folder.resolve() for m in listed if m.folder is not None}
    return _hf_folder.parts_contents(path, parts, MODULES_JSON, named, holds_weights)


def _module(
    module: Module,
    tree: dict[str, TensorRef],
    aliases: dict[str, str],
    warnings: list[str],
    closers: list[Any],
) -> dict[str, Any]:
    """One module's details; its tensors join ``tree`` under its prefix."""
    facts: dict[str, Any] = {"path": module.path, "type": module.type}
    if module.folder is None:
        facts["missing"] = True
        return facts
    if not module.has_weights:
        facts["files"] = sorted(p.name for p in module.folder.iterdir() if p.is_file())
        return facts
    contents = _hf_folder.read_prefixed(
        module.folder, module.prefix, tree, aliases, warnings, closers
    )
    facts["tensors"] = len(contents.tree)
    keep = ("files", "index", "ignored_weights", "model_type", "architectures")
    facts.update({k: contents.details[k] for k in keep if k in contents.details})
    return facts


def _model_type(path: Path, warnings: list[str]) -> str | None:
    """``model_type`` of ``config_sentence_transformers.json``: SentenceTransformer,
    CrossEncoder or SparseEncoder (absent before sentence-transformers 5)."""
    config = path / MODEL_CONFIG
    if not config.is_file():
        return None
    try:
        kind = _hf_folder.load_json(config).get("model_type")
    except ModelportError as exc:
        warnings.append(f"{MODEL_CONFIG} ignored: {exc}")
        return None
    return kind if isinstance(kind, str) else None
