"""Resolve "the model" for ``export``, ``rebuild`` and ``check``: user code the user names, a
Hugging Face model directory built from its ``config.json``, or a saved whole model.

- ``pkg.module:Name`` (``Name`` may be dotted: ``pkg.mod:Outer.build``) is imported and
  called with the ``init`` keyword arguments. This runs the user's own code, by the user's
  explicit choice.
- A directory holding ``config.json`` is built from the config alone, then its weights are
  read through ``modelport.load``: with transformers (``local_files_only``,
  ``trust_remote_code=False``: the hub is never contacted, no remote code runs), or, for a
  diffusers component folder (``unet/``: ``_diffusers_version`` in its config), with the
  diffusers model class its ``_class_name`` names (looked up in diffusers only).
- A file is recognised by content (``modelport.open``, which executes nothing), scanned, then:
  TorchScript is loaded with ``torch.jit.load`` (it runs the file's TorchScript, a language
  without Python imports; an ``unsafe`` verdict is refused unless ``allow_unsafe``); a
  ``.pt2`` with ``torch.export.load(...).module()`` when the scan says ``safe`` (torch unpickles
  some of its members with ``weights_only=False``, so any other verdict needs ``trust_code``);
  a whole-model pickle (``torch.save(model)``) only with ``trust_code``: it is
  ``torch.load(weights_only=False)``, which runs code from the file. That is the one place
  modelport runs a file's Python code: only the file named as the model, after the scan
  (whose verdict is reported as a ``CodeExecutionWarning``; ``unsafe`` also needs
  ``allow_unsafe``). A checkpoint dict that holds a pickled module (ultralytics:
  ``{"model": None, "ema": module, "optimizer": ..., "train_args": ...}``) gives its
  ``model``, else its ``ema``, else its one module, under the same rule.
- ``weights`` (any format modelport reads) is loaded with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import (
    CodeExecutionWarning,
    ConversionError,
    MissingDependencyError,
    ModelSpecError,
    UnsafeModelError,
)
from modelport.loading.model_file import load
from modelport.loading.model_file import open as open_model
from modelport.scanning.scanner import scan
from modelport.torch_models.config_folders import build_from_folder, load_folder_weights

if TYPE_CHECKING:
    from torch import nn

PICKLED = ("torch-zip", "torch-legacy", "pickle")  # formats whose whole-model form is a pickle
# a checkpoint dict's module, in this order (ultralytics sets "model" to None after training)
CHECKPOINT_MODULE_KEYS = ("model", "ema")


def build_model(
    spec: str | Path,
    init: str | Mapping[str, Any] | list[Any] | None = None,
    *,
    meta: bool = False,
    trust_code: bool = False,
    allow_unsafe: bool = False,
) -> nn.Module:
    """The ``nn.Module`` named by ``spec`` (``pkg.module:Name`` called with ``init``: a JSON
    object as keyword arguments, a list as positional ones; an HF directory or its
    ``config.json``; a TorchScript, ``.pt2`` or, with ``trust_code``, whole-model pickle file),
    without weights. ``meta`` builds it on the meta device (shapes only, nothing allocated)
    when the code allows it; a file is always loaded as saved."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", "torch", "building a model") from exc
    path = Path(spec)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_file():
        if init:
            raise ModelSpecError("--init applies to --model pkg.module:Name, not a file")
        return load_model_file(path, trust_code=trust_code, allow_unsafe=allow_unsafe)
    if path.is_dir():
        if init:
            raise ModelSpecError("--init applies to --model pkg.module:Name, not a directory")
        if meta:
            with torch.device("meta"):
                return _require_module(build_from_folder(path), str(spec))
        return _require_module(build_from_folder(path), str(spec))
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
        called = f" with --init {init}" if init else ""
        raise ModelSpecError(
            f"--model {spec!r}: building it failed{called} ({type(exc).__name__}: {exc})"
        ) from exc
    return _require_module(built, str(spec))


def resolve_model(
    spec: str | Path,
    *,
    init: str | Mapping[str, Any] | list[Any] | None = None,
    weights: str | Path | None = None,
    allow_unsafe: bool = False,
    trust_code: bool = False,
    before_weights: Callable[[nn.Module, str | Path], None] | None = None,
) -> nn.Module:
    """The model to export, in eval mode: built by ``build_model``, then given an HF
    directory's own weights, or ``weights`` (loaded strictly) when named, after
    ``before_weights(model, weights)`` (which may refuse them). ``trust_code`` allows a
    whole-model pickle as ``spec`` (it runs code from that file; see the module
    docstring); ``allow_unsafe`` reads files the scanner judged unsafe."""
    model = build_model(spec, init, trust_code=trust_code, allow_unsafe=allow_unsafe)
    path = Path(spec)
    if path.is_dir() and weights is None:
        load_folder_weights(model, path, allow_unsafe=allow_unsafe)
    if weights is not None:
        if before_weights is not None:
            before_weights(model, weights)
        load_weights(model, weights, allow_unsafe=allow_unsafe)
    return eval_mode(model)


def eval_mode(model: nn.Module) -> nn.Module:
    """``model.eval()``, except for the modules ``torch.export.load(...).module()`` gives,
    which refuse it (they keep the mode they were exported in)."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


def load_model_file(path: Path, *, trust_code: bool, allow_unsafe: bool) -> nn.Module:
    """A whole model saved in ``path``, recognised by content (see the module docstring)."""
    import torch

    with open_model(path) as opened:  # the restricted reader: nothing in the file runs
        kind = opened.format.value
        tree = opened.module_tree()
        tensors = len(opened.tensors)
    if kind == "torchscript":
        _gate(path, runs="TorchScript code", allow_unsafe=allow_unsafe, trust_code=True)
        loaded = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        return _require_module(loaded, str(path))
    if kind == "torch-export":
        _gate(
            path,
            runs="pickled members (torch.export.load unpickles some with weights_only=False)",
            allow_unsafe=allow_unsafe,
            trust_code=trust_code,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _require_module(torch.export.load(str(path)).module(), str(path))
    cls = str(tree["class"]) if tree and isinstance(tree.get("class"), str) else None
    key = _checkpoint_module_key(tree) if kind in PICKLED and cls is None else None
    if tree is not None and key is not None:
        cls = str(tree[key].get("class", "?"))
    if kind not in PICKLED or (cls is None and (tensors or not trust_code)):
        if tensors:
            raise ModelSpecError(
                f"{path}: a {kind} file holding weights ({tensors} tensors), not a whole "
                f"model: name the class with --model pkg.module:Name --weights {path}"
            )
        raise ModelSpecError(
            f"{path}: a {kind} file that holds no model modelport recognises; --model takes "
            "pkg.module:Name, a directory with config.json, a TorchScript or .pt2 file, or a "
            "whole-model pickle"
            + (" (--trust-code torch.loads it anyway, running its code)" if kind in PICKLED else "")
        )
    if not trust_code:
        name = (cls or "").rpartition(".")[2] or "Name"
        held = "" if key is None else f"a checkpoint dict whose {key!r} is "
        raise ModelSpecError(
            f"{path} is {held}a pickled nn.Module of class {cls}: loading it runs code from "
            "the file (torch.load(weights_only=False)). Pass --trust-code if you trust its "
            f"source, or keep code out of it: modelport convert {path} weights.safetensors, "
            f"then --model pkg.module:{name} --weights weights.safetensors"
        )
    return _unpickled_module(path, key, allow_unsafe=allow_unsafe)


def _checkpoint_module_key(tree: Mapping[str, Any] | None) -> str | None:
    """Which module of a checkpoint dict is the model, from its module tree (key ->
    module): ``model``, else ``ema``, else the only one; None when it holds none, or
    several under other names."""
    if not tree:
        return None
    for key in CHECKPOINT_MODULE_KEYS:
        if isinstance(tree.get(key), Mapping):
            return key
    return next(iter(tree)) if len(tree) == 1 else None


def _unpickled_module(path: Path, key: str | None, *, allow_unsafe: bool) -> nn.Module:
    """``torch.load(weights_only=False)`` of the file the caller trusted, after the scan:
    the module it holds, or a checkpoint dict's module under ``key`` (said in the warning)."""
    import torch

    taken = ""
    if key is not None:
        taken = f" to take the module under {key!r}" + (
            "" if key == CHECKPOINT_MODULE_KEYS[0] else " (no module under 'model')"
        )
    _gate(
        path,
        runs=f"pickle (--trust-code){taken}",
        allow_unsafe=allow_unsafe,
        trust_code=True,
        announce=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the one place modelport runs a file's code: the caller trusted this file
        loaded = torch.load(str(path), weights_only=False, map_location="cpu")
    if key is None:
        return _require_module(loaded, str(path))
    held = loaded.get(key) if isinstance(loaded, dict) else None
    return _require_module(held, f"{path} [{key!r}]")


def _gate(
    path: Path, *, runs: str, allow_unsafe: bool, trust_code: bool, announce: bool = False
) -> None:
    """Scan ``path`` before a load that runs ``runs``: ``unsafe`` is refused unless
    ``allow_unsafe``, anything but ``safe`` unless ``trust_code``; the verdict is warned
    (``CodeExecutionWarning``) when it is not ``safe``, and always when ``announce``."""
    report = scan(path)
    summary = report.summary()
    if report.verdict not in ("safe", "suspicious") and not allow_unsafe:
        raise UnsafeModelError(
            path,
            summary,
            findings=report.serious,
            advice=f"Loading it as the model would run its {runs}; pass --allow-unsafe "
            "(allow_unsafe=True) as well to run it anyway",
        )
    if report.verdict != "safe" and not trust_code:
        raise ModelSpecError(
            f"{path}: loading it runs its {runs}, and modelport's scan says "
            f"{report.verdict}: {summary}. Pass --trust-code (trust_code=True) if you trust "
            "its source"
        )
    if announce or report.verdict != "safe":
        warnings.warn(
            f"{path}: running its {runs}; modelport's scan says {report.verdict}: {summary}",
            CodeExecutionWarning,
            stacklevel=2,
        )


def _require_module(model: Any, spec: str) -> nn.Module:
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"--model {spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, weights: str | Path, *, allow_unsafe: bool = False) -> None:
    """Load ``weights`` (any readable format) into ``model`` strictly, executing nothing."""
    state = load(weights, allow_unsafe=allow_unsafe)
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
