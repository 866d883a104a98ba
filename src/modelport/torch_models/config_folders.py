"""A model built from a Hugging Face folder's ``config.json``, then given the folder's weights.

- transformers (``model_type`` / ``architectures`` in the config): ``AutoConfig`` with
  ``local_files_only`` and ``trust_remote_code=False`` (the hub is never contacted, no remote
  code runs), the architecture the config names when transformers has it, else
  ``AutoModel``; ``use_cache`` off, so a decoder's whole-sequence forward is what exports.
- diffusers (a component folder such as ``unet/`` or ``vae/``: ``_diffusers_version`` in its
  config): the class ``_class_name`` names, looked up in diffusers itself and accepted only
  when it is one of diffusers' models (``ModelMixin``), built with ``from_config``. diffusers
  is imported only here, and its absence is a ``MissingDependencyError``. A pipeline folder
  (``model_index.json``) holds several models and is refused, naming its components.

The weights are read by ``modelport.load`` (nothing in them runs) and loaded by name.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from modelport import limits
from modelport.errors import (
    ConversionError,
    CorruptFileError,
    LimitExceededError,
    MissingDependencyError,
    ModelSpecError,
)
from modelport.loading.model_file import load

if TYPE_CHECKING:
    import torch
    from torch import nn

CONFIG: Final = "config.json"
PIPELINE_INDEX: Final = "model_index.json"  # a diffusers pipeline: one folder per component
DIFFUSERS_MARK: Final = "_diffusers_version"  # present in every diffusers config
WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".npz", ".gguf")


def build_from_folder(path: Path) -> nn.Module:
    """The model ``path/config.json`` describes, with random weights (see the module
    docstring)."""
    if not (path / CONFIG).is_file():
        if (path / PIPELINE_INDEX).is_file():
            components = sorted(
                key for key in _json_object(path / PIPELINE_INDEX) if not key.startswith("_")
            )
            raise ModelSpecError(
                f"{path}: a diffusers pipeline holds several models "
                f"({', '.join(components)}); --model takes one component folder, such as "
                f"{path / (components[0] if components else 'unet')}"
            )
        raise ModelSpecError(f"{path}: a model directory needs a config.json")
    config = _json_object(path / CONFIG)
    if DIFFUSERS_MARK in config:
        return _from_diffusers_config(path, config)
    return _from_transformers_config(path)


def load_folder_weights(model: nn.Module, path: Path, *, allow_unsafe: bool) -> None:
    """The folder's own weights into ``model`` (a warning, and random weights, when it has
    none)."""
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()):
        warnings.warn(f"{path}: no weights found; exporting random init", stacklevel=3)
        return
    state = load(path, allow_unsafe=allow_unsafe)
    _load_state(model, state, path)


def _json_object(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > limits.MAX_HF_INDEX_JSON:
        raise LimitExceededError(f"{path.name} size", limits.MAX_HF_INDEX_JSON, size, path=path)
    try:
        found = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{path.name} is not valid JSON ({exc})", path=path) from None
    if not isinstance(found, dict):
        raise CorruptFileError(f"{path.name} is not a JSON object", path=path)
    return found


def _from_diffusers_config(path: Path, config: Mapping[str, Any]) -> nn.Module:
    """The diffusers model class the config names, built from the config alone."""
    try:
        import diffusers
    except ImportError as exc:
        raise MissingDependencyError(
            "diffusers", "diffusers", f"building the diffusers model in {path}"
        ) from exc
    name = config.get("_class_name")
    found = (
        getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    )
    if not (isinstance(found, type) and issubclass(found, diffusers.ModelMixin)):
        raise ModelSpecError(
            f"{path / CONFIG}: _class_name {name!r} is not one of diffusers' models "
            f"(diffusers {diffusers.__version__})"
        )
    model: nn.Module = found.from_config(dict(config))  # type: ignore[no-untyped-call]
    return model


def _from_transformers_config(path: Path) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "transformers", "hf", "building a model from config.json"
        ) from exc
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except (ValueError, KeyError, OSError) as exc:  # no model_type, one it does not know
        first = " ".join(str(exc).split())[:300]
        raise ModelSpecError(
            f"{path / CONFIG}: transformers {transformers.__version__} builds no model from "
            f"it ({type(exc).__name__}: {first})"
        ) from exc
    if getattr(config, "use_cache", False):
        # A decoder returns its KV cache (a DynamicCache, which torch.export cannot hold)
        # unless told not to: the whole-sequence forward is what gets exported.
        config.use_cache = False
    architecture = _transformers_class(transformers, config)
    model = (
        architecture._from_config(config)
        if architecture is not None
        else transformers.AutoModel.from_config(config, trust_remote_code=False)  # type: ignore[no-untyped-call]
    )
    return model  # type: ignore[no-any-return]


def _transformers_class(transformers: Any, config: Any) -> Any:
    """The config's own architecture if transformers has it (a name looked up in
    transformers only, never imported from elsewhere), else None (AutoModel)."""
    for name in getattr(config, "architectures", None) or ():
        found = getattr(transformers, str(name), None)
        if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
            return found
    return None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(model.state_dict())
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    if prefix and not expected & set(state):
        state = {k.removeprefix(prefix + "."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in result.missing_keys if k not in tied and not k.endswith("lm_head.weight")]
    if missing:
        raise ConversionError(f"{path}: weights missing for {', '.join(missing[:5])}")
    if result.unexpected_keys:
        warnings.warn(
            f"{path}: ignored {len(result.unexpected_keys)} tensors the model does not use "
            f"({', '.join(result.unexpected_keys[:3])})",
            stacklevel=4,
        )
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
