"""Resolve "the model" for ``export`` and ``check``: user code the user names, or a Hugging
Face model directory built from its ``config.json``.

- ``pkg.module:Name`` (``Name`` may be dotted: ``pkg.mod:Outer.build``) is imported and
  called with the ``init`` keyword arguments. This runs the user's own code, by the user's
  explicit choice; nothing stored in a model file is ever imported or executed.
- A directory holding ``config.json`` is built with transformers from the config alone
  (``local_files_only``, ``trust_remote_code=False``: the hub is never contacted, no remote
  code runs), then its weights are read through ``modelport.load``.
- ``weights`` (any format modelport reads) is loaded with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import ConversionError, MissingDependencyError, ModelSpecError

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".npz", ".gguf")


def build_model(
    spec: str | Path,
    init: str | Mapping[str, Any] | list[Any] | None = None,
    *,
    meta: bool = False,
) -> nn.Module:
    """The ``nn.Module`` named by ``spec`` (``pkg.module:Name`` called with ``init``: a JSON
    object as keyword arguments, a list as positional ones; or an HF directory or its
    ``config.json``), without weights. ``meta`` builds it on the meta device (shapes only,
    nothing allocated) when the code allows it."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", "torch", "building a model") from exc
    path = Path(spec)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        if init:
            raise ModelSpecError("--init applies to --model pkg.module:Name, not a directory")
        if meta:
            with torch.device("meta"):
                return _require_module(_from_hf_config(path), str(spec))
        return _require_module(_from_hf_config(path), str(spec))
    target, args, kwargs = _callable(str(spec), init)
    if meta:
        try:
            with torch.device("meta"):
                return _require_module(target(*args, **kwargs), str(spec))
        except ModelSpecError:
            raise
        except Exception:
            pass
    try:
        built = target(*args, **kwargs)
    except Exception as exc:
        raise ModelSpecError(
            f"--model {spec!r}: building it failed ({type(exc).__name__}: {exc})"
        ) from exc
    return _require_module(built, str(spec))


def resolve_model(
    spec: str | Path,
    *,
    init: str | Mapping[str, Any] | list[Any] | None = None,
    weights: str | Path | None = None,
    allow_unsafe: bool = False,
) -> nn.Module:
    """The model to export, in eval mode: built by ``build_model``, then given an HF
    directory's own weights, or ``weights`` (loaded strictly) when named."""
    model = build_model(spec, init)
    path = Path(spec)
    if path.is_dir() and weights is None:
        _load_directory_weights(model, path, allow_unsafe=allow_unsafe)
    if weights is not None:
        load_weights(model, weights, allow_unsafe=allow_unsafe)
    return model.eval()


def _require_module(model: Any, spec: str) -> nn.Module:
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"--model {spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, weights: str | Path, *, allow_unsafe: bool = False) -> None:
    """Load ``weights`` (any readable format) into ``model`` strictly, executing nothing."""
    import modelport

    state = modelport.load(weights, allow_unsafe=allow_unsafe)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise ConversionError(
            f"{weights}: weights do not fit the model: {' '.join(first)}"
        ) from exc


def _callable(
    spec: str, init: str | Mapping[str, Any] | list[Any] | None
) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelSpecError(
            f"--model {spec!r}: expected pkg.module:Name or a directory with config.json"
        )
    try:
        arguments = json.loads(init) if isinstance(init, str) else init
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"--init is not valid JSON: {exc}") from exc
    if arguments is not None and not isinstance(arguments, (dict, list, Mapping)):
        raise ModelSpecError("--init must be a JSON object (keyword arguments) or list")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # as `python -m` would: the user's own package
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"--model {spec!r}: cannot import {module_name}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelSpecError(f"--model {spec!r}: {module_name} has no {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelSpecError(f"--model {spec!r}: {attribute} is not a class or function")
    if isinstance(arguments, list):
        return target, tuple(arguments), {}
    return target, (), dict(arguments or {})


def _from_hf_config(path: Path) -> nn.Module:
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{path}: a model directory needs a config.json")
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "transformers", "test", "building a model from config.json"
        ) from exc
    config = transformers.AutoConfig.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False
    )
    architecture = _hf_class(transformers, config)
    model = (
        architecture._from_config(config)
        if architecture is not None
        else transformers.AutoModel.from_config(config, trust_remote_code=False)  # type: ignore[no-untyped-call]
    )
    return model  # type: ignore[no-any-return]


def _load_directory_weights(model: nn.Module, path: Path, *, allow_unsafe: bool) -> None:
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()):
        warnings.warn(f"{path}: no weights found; exporting random init", stacklevel=3)
        return
    import modelport

    state = modelport.load(path, allow_unsafe=allow_unsafe)
    _load_hf_state(model, state, path)


def _hf_class(transformers: Any, config: Any) -> Any:
    """The config's own architecture if transformers has it (a name looked up in
    transformers only, never imported from elsewhere), else None (AutoModel)."""
    for name in getattr(config, "architectures", None) or ():
        found = getattr(transformers, str(name), None)
        if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
            return found
    return None


def _load_hf_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
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
