"""Resolve "the model" for ``export``, ``rebuild`` and ``check``: user code the user names, a
Hugging Face model directory built from its ``config.json``, or a saved whole model.

- ``pkg.module:Name`` (``Name`` may be dotted: ``pkg.mod:Outer.build``) is imported and
  called with the ``init`` keyword arguments. This runs the user's own code, by the user's
  explicit choice.
- A directory holding ``config.json`` is built with transformers from the config alone
  (``local_files_only``, ``trust_remote_code=False``: the hub is never contacted, no remote
  code runs), then its weights are read through ``modelport.load``.
- A file is recognised by content (``modelport.open``, which executes nothing), scanned, then:
  TorchScript is loaded with ``torch.jit.load`` (it runs the file's TorchScript, a language
  without Python imports; an ``unsafe`` verdict is refused unless ``allow_unsafe``); a
  ``.pt2`` with ``torch.export.load(...).module()`` when the scan says ``safe`` (torch unpickles
  some of its members with ``weights_only=False``, so any other verdict needs ``trust_code``);
  a whole-model pickle (``torch.save(model)``) only with ``trust_code``: it is
  ``torch.load(weights_only=False)``, which runs code from the file. That is the one place
  modelport runs a file's Python code: only the file named as the model, after the scan
  (whose verdict is reported as a ``CodeExecutionWarning``; ``unsafe`` also needs
  ``allow_unsafe``).
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

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".npz", ".gguf")
PICKLED = ("torch-zip", "torch-legacy", "pickle")  # formats whose whole-model form is a pickle


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
) -> nn.Module:
    """The model to export, in eval mode: built by ``build_model``, then given an HF
    directory's own weights, or ``weights`` (loaded strictly) when named. ``trust_code``
    allows a whole-model pickle as ``spec`` (it runs code from that file; see the module
    docstring); ``allow_unsafe`` reads files the scanner judged unsafe."""
    model = build_model(spec, init, trust_code=trust_code, allow_unsafe=allow_unsafe)
    path = Path(spec)
    if path.is_dir() and weights is None:
        _load_directory_weights(model, path, allow_unsafe=allow_unsafe)
    if weights is not None:
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
        raise ModelSpecError(
            f"{path} is a pickled nn.Module of class {cls}: loading it runs code from the file "
            "(torch.load(weights_only=False)). Pass --trust-code if you trust its source, or "
            f"keep code out of it: modelport convert {path} weights.safetensors, then "
            f"--model pkg.module:{name} --weights weights.safetensors"
        )
    _gate(
        path,
        runs="pickle (--trust-code)",
        allow_unsafe=allow_unsafe,
        trust_code=True,
        announce=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the one place modelport runs a file's code: the caller trusted this file
        loaded = torch.load(str(path), weights_only=False, map_location="cpu")
    return _require_module(loaded, str(path))


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


def _from_hf_config(path: Path) -> nn.Module:
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{path}: a model directory needs a config.json")
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "transformers", "hf", "building a model from config.json"
        ) from exc
    config = transformers.AutoConfig.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False
    )
    if getattr(config, "use_cache", False):
        # A decoder returns its KV cache (a DynamicCache, which torch.export cannot hold)
        # unless told not to: the whole-sequence forward is what gets exported.
        config.use_cache = False
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
    state = load(path, allow_unsafe=allow_unsafe)
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
