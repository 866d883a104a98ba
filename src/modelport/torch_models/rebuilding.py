"""Rebuild a whole model from weights plus the class that uses them, and prove it loads back.

``rebuild`` builds the model (``pkg.module:Name`` or an HF directory, see ``modelport.models``),
loads the weights strictly (any format modelport reads; nothing in them is executed), puts it
in eval mode and writes one of:

- ``pickle`` (default): ``torch.save(model)``, the whole module. Loading it needs
  ``torch.load(path, weights_only=False)`` and the model's class importable under the same
  name; the report says which class.
- ``torchscript`` / ``pt2`` / ``executorch`` / ``tflite``: written and verified by
  ``modelport.export`` (needs example inputs); they load without the Python class.

Before success is reported the file is loaded back (the pickle with ``torch.load`` on the
file this call has just written, nothing else) and compared with the eager model: outputs on
the example inputs and random ones (``export``'s checks, other sizes along ``dynamic`` axes
included), and for the pickle also every state-dict tensor bit for bit (the only check when
no example inputs are given). Like ``export``, the file is built beside ``OUT`` and renamed
into place; an existing ``OUT`` is replaced only with ``overwrite``, the weights never.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import ConversionError, UsageError
from modelport.torch_models.agreement import OutputCheck, Runner, leaves, verify_outputs
from modelport.torch_models.binding import Call, bind
from modelport.torch_models.checking import resolve_fitting
from modelport.torch_models.exporting import check_targets, export
from modelport.transfer.placing import install_file, staging_folder

if TYPE_CHECKING:
    import torch
    from torch import nn

TARGETS = ("pickle", "torchscript", "pt2", "executorch", "tflite")
LOADING = {  # target -> (how to load the file, what that needs)
    "torchscript": ("torch.jit.load({!r})", "torch only"),
    "pt2": ("torch.export.load({!r}).module()", "torch only"),
    "executorch": ("executorch.runtime.Runtime.get().load_program({!r})", "ExecuTorch's runtime"),
    "tflite": ("ai_edge_litert.interpreter.Interpreter(model_path={!r})", "LiteRT's runtime"),
}
Inputs = Mapping[str, "torch.Tensor"] | Sequence["torch.Tensor"]


@dataclass(frozen=True)
class RebuildReport:
    """What ``rebuild`` wrote, how it was checked and what loading it needs."""

    path: Path
    format: str
    model: str
    weights: Path
    files: tuple[Path, ...]
    verified: bool
    method: str  # "outputs", "state_dict" or "outputs+state_dict"
    max_abs_error: float
    outputs: tuple[OutputCheck, ...]
    tensors_compared: int
    mismatched: tuple[str, ...]
    load_with: str
    requires: str
    seconds: float
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "model": self.model,
            "weights": str(self.weights),
            "files": [str(f) for f in self.files],
            "verified": self.verified,
            "method": self.method,
            "max_abs_error": self.max_abs_error if math.isfinite(self.max_abs_error) else None,
            "outputs": [o.to_json() for o in self.outputs],
            "tensors_compared": self.tensors_compared,
            "mismatched": list(self.mismatched),
            "load_with": self.load_with,
            "requires": self.requires,
            "seconds": self.seconds,
            "warnings": list(self.warnings),
        }


def rebuild(
    model: str | Path,
    weights: str | Path,
    path: str | Path,
    *,
    init: str | Mapping[str, Any] | list[Any] | None = None,
    to: str | None = None,
    example_inputs: Inputs | Callable[[nn.Module], Inputs] | None = None,
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
    allow_unsafe: bool = False,
    trust_code: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    overwrite: bool = False,
) -> RebuildReport:
    """Build ``model`` with ``weights`` and save it whole to ``path`` as ``to`` (by default
    from the name: ``.pt2``, ``.pte``, ``.tflite`` -> pt2, executorch, tflite, anything else
    a whole-model pickle); load the file back
    and compare it with the eager model before reporting ``verified``. ``example_inputs``
    are ``export``'s, or a function of the built model giving them (how the CLI matches an
    ``--example-inputs`` file to ``forward``'s arguments). ``dynamic`` names
    dynamic axes of the example inputs (as ``export``'s); ``trust_code`` and
    ``allow_unsafe`` are ``resolve_model``'s."""
    if to is None:
        to = {".pt2": "pt2", ".pte": "executorch", ".tflite": "tflite"}.get(
            Path(path).suffix, "pickle"
        )
    _check_options(to, example_inputs is not None and bool(example_inputs), bool(dynamic))
    started = time.perf_counter()
    path = Path(path)
    sources = [Path(weights)] + ([Path(model)] if Path(model).is_file() else [])
    check_targets(path, to, overwrite, sources)
    module = resolve_fitting(
        model, init=init, weights=weights, allow_unsafe=allow_unsafe, trust_code=trust_code
    )
    if callable(example_inputs):
        example_inputs = example_inputs(module)
    if to == "pickle":
        checks, compared, mismatched = _pickle(
            module, path, example_inputs, dynamic or {}, rtol, atol, overwrite
        )
        files: tuple[Path, ...] = (path,)
        method = "outputs+state_dict" if example_inputs else "state_dict"
        load_with, requires, notes = _pickle_needs(type(module), path)
    else:
        assert example_inputs is not None
        exported = export(
            module,
            path,
            example_inputs,
            to=to,
            dynamic=dynamic,
            rtol=rtol,
            atol=atol,
            overwrite=overwrite,
        )
        checks, compared, mismatched = exported.outputs, 0, []
        files, notes, method = exported.files, list(exported.warnings), "outputs"
        load_with, needs = LOADING[to][0].format(str(path)), LOADING[to][1]
        requires = f"{needs}; the Python class is not needed"
    verified = bool(checks or compared) and all(c.ok for c in checks) and not mismatched
    return RebuildReport(
        path=path,
        format=to,
        model=str(model),
        weights=Path(weights),
        files=files,
        verified=verified,
        method=method,
        max_abs_error=max((c.max_abs for c in checks), default=0.0),
        outputs=tuple(checks),
        tensors_compared=compared,
        mismatched=tuple(mismatched),
        load_with=load_with,
        requires=requires,
        seconds=time.perf_counter() - started,
        warnings=tuple(notes),
    )


def _check_options(to: str, has_inputs: bool, has_dynamic: bool) -> None:
    if to not in TARGETS:
        raise UsageError(f"unknown rebuild format {to!r}: expected one of {TARGETS}")
    if to != "pickle" and not has_inputs:
        raise UsageError(
            f"--to {to} traces the model: it needs example inputs (--input or --example-inputs)"
        )
    if has_dynamic and not has_inputs:
        raise UsageError("--dynamic names axes of example inputs: give them too")


def _pickle_needs(cls: type, path: Path) -> tuple[str, str, list[str]]:
    """How a whole-model pickle of ``cls`` is loaded, what that needs, and its caveats."""
    load_with = f"torch.load({str(path)!r}, weights_only=False)"
    requires = (
        f"the class {cls.__module__}.{cls.__qualname__} must be importable, and the file "
        "must be trusted: loading a whole-model pickle runs code"
    )
    notes = []
    if cls.__module__ == "__main__":
        notes.append("the class lives in __main__: only that same script can load the file")
    return load_with, requires, notes


def _pickle(
    module: nn.Module,
    path: Path,
    example_inputs: Inputs | None,
    dynamic: Mapping[str, Mapping[int, str]],
    rtol: float | None,
    atol: float | None,
    overwrite: bool,
) -> tuple[tuple[OutputCheck, ...], int, list[str]]:
    """``torch.save(module)`` beside ``path``, reloaded and compared, then renamed into
    place."""
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        raise ConversionError(
            "a TorchScript model cannot be pickled whole: rebuild it --to torchscript or pt2"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    building = staging_folder(path)
    try:
        staged = building / path.name
        try:
            torch.save(module, str(staged))
        except Exception as exc:  # local classes, lambdas, open handles: pickle refuses them
            first = " ".join(str(exc).split())[:300]
            raise ConversionError(
                f"torch.save could not pickle the model ({type(exc).__name__}: {first}); "
                "the class must be defined at module level"
            ) from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the file this call has just written from the user's own model; never a given file
            loaded = torch.load(str(staged), weights_only=False, map_location="cpu")
        if not isinstance(loaded, torch.nn.Module):
            raise ConversionError(f"{path}: reloaded as a {type(loaded).__name__}, not a module")
        loaded.eval()
        mismatched = _state_mismatches(module.state_dict(), loaded.state_dict())
        checks: tuple[OutputCheck, ...] = ()
        if example_inputs:
            call, inputs = bind(module, example_inputs)
            unknown = sorted(set(dynamic) - set(call.names))
            if unknown:
                raise UsageError(
                    f"dynamic axes for {unknown}, which are not inputs ({list(call.names)})"
                )
            runner = _runner_for(loaded, call)
            with contextlib.redirect_stdout(io.StringIO()):
                checks = tuple(verify_outputs(module, runner, call, inputs, dynamic, rtol, atol))
        install_file(staged, path, overwrite=overwrite)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return checks, len(module.state_dict()), mismatched


def _runner_for(loaded: nn.Module, call: Call) -> Runner:
    """Like ``export._runner``, for the module already loaded back from the pickle."""
    import torch

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return leaves(call(loaded, inputs))

    return run


def _state_mismatches(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]
) -> list[str]:
    """Names whose tensors differ in presence, dtype, shape or any byte."""
    import torch

    bad = sorted(set(expected) ^ set(actual))
    for name in sorted(set(expected) & set(actual)):
        a, b = expected[name], actual[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_raw(a), _raw(b)):
            bad.append(name)
    return bad


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so NaN payloads and -0.0 count), as uint8."""
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
