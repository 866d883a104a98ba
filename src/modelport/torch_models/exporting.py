"""Export a torch model to ONNX, TorchScript or ``.pt2``, and verify the result against eager.

Inputs reach ``forward`` by position while they fill its arguments in order, by keyword
after the first one left out (``modelport.binding``); every exporter, the eager reference
and the runtimes use that one call. Verification runs the exported file in its own runtime
(onnxruntime, ``torch.jit.load``, ``torch.export.load``) on the example inputs and two more
random inputs of the same shapes, dtypes and value ranges (for each dynamic axis, also at
two other sizes), and compares every output with eager PyTorch: per-output max absolute
and relative error, ``|exported - eager| <= atol + rtol * |eager|`` with tolerances by
dtype.

- ONNX: ``torch.onnx.export(dynamo=True)`` by default, ``exporter="legacy"`` for the
  TorchScript-based one (``dynamo=False``, dynamic axes as ``dynamic_axes``; a call with
  keywords goes through a wrapper that takes every input by position, so its weights are
  named ``model.*``). The ONNX inputs carry the inputs' names. ``OUT`` and ``OUT.data`` (external
  weights) are one bundle. bfloat16 models are exported in float32 (onnxruntime's CPU
  provider has no bfloat16 kernels), with a warning.
- TorchScript: ``torch.jit.trace`` (a call with keywords is traced all by keyword, as
  ``example_kwarg_inputs``; a TorchScript model is saved as it is); deprecated in torch 2.13,
  so a warning recommends .pt2.
- pt2: ``torch.export.export`` + ``torch.export.save``. A TorchScript model goes through
  torch's TorchScript-to-``torch.export`` converter first (pt2, and ONNX with dynamo).

The bundle is written into a new directory beside ``OUT``, verified there, then renamed
into place (data first): an error leaves nothing behind, and an existing ``OUT`` or
``OUT.data`` is only replaced with ``overwrite`` (convert's rule and message).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import ConversionError, MissingDependencyError, ModelportError, UsageError
from modelport.torch_models.agreement import OutputCheck, Runner, leaves, verify_outputs
from modelport.torch_models.binding import Call, bind
from modelport.torch_models.building import eval_mode
from modelport.torch_models.export_report import ExampleInput, ExportReport
from modelport.transfer.placing import check_target, install_file, staging_folder

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ("onnx", "torchscript", "pt2")
EXPORTERS = ("dynamo", "legacy")  # ONNX: torch.export-based, or TorchScript-based


def export(
    model: nn.Module,
    path: str | Path,
    example_inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    *,
    to: str = "onnx",
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
    exporter: str = "dynamo",
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export ``model`` (put in eval mode) to ``path`` and verify it against eager.

    A mapping of ``example_inputs`` names them (ONNX input names; keys of ``dynamic``, e.g.
    ``{"x": {0: "batch"}}``). Inputs named after ``forward``'s arguments go by position while
    they fill them in order, then by keyword (``{"input_ids": ..., "attention_mask": ...}``
    for GPT-2, whose ``past_key_values`` is left out); a sequence, and names ``forward``
    lacks, go by position (see ``modelport.binding``).
    ``exporter`` picks the ONNX exporter (``"dynamo"`` or ``"legacy"``). An existing ``path``
    (or ``path.data`` for ONNX) is replaced only with ``overwrite``.
    """
    import torch

    started = time.perf_counter()
    call, inputs = bind(model, example_inputs)
    dynamic = dict(dynamic or {})
    _check_options(to, exporter, list(call.names), dynamic)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_targets(path, to, overwrite)
    notes: list[str] = []
    model = eval_mode(model)
    described = _describe(model)
    if to == "onnx" and any(p.dtype == torch.bfloat16 for p in model.parameters()):
        notes.append(
            "bfloat16 model exported and verified in float32: onnxruntime's CPU provider has "
            "no bfloat16 kernels"
        )
        model = copy.deepcopy(model).float()
        inputs = [t.float() if t.dtype == torch.bfloat16 else t for t in inputs]
    shapes = _dynamic_shapes(call, inputs, dynamic)
    notes.extend(_option_notes(to, opset, exporter))
    building = staging_folder(path)  # the bundle is built and verified here, then moved
    try:
        staged = building / path.name
        with _export_failure(to):
            files = _write(to, model, staged, call, inputs, shapes, dynamic, opset, exporter)
        checks: tuple[OutputCheck, ...] = ()
        verified: bool | None = None
        if verify:
            runner = _runner(to, staged, call)
            checks = tuple(verify_outputs(model, runner, call, inputs, dynamic, rtol, atol))
            verified = all(c.ok for c in checks)
        files = _install(files, path, to, overwrite)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    worst = max((c.max_abs for c in checks), default=0.0)
    return ExportReport(
        path=path,
        format=to,
        files=files,
        verified=verified,
        max_abs_error=worst,
        outputs=checks,
        seconds=time.perf_counter() - started,
        warnings=tuple(notes),
        model=described,
        exporter=exporter if to == "onnx" else None,
        opset=opset if to == "onnx" else None,
        inputs=_described_inputs(call, inputs, dynamic),
        sizes=tuple(f.stat().st_size for f in files),
    )


def _check_options(
    to: str, exporter: str, names: list[str], dynamic: Mapping[str, Mapping[int, str]]
) -> None:
    if to not in FORMATS:
        raise UsageError(f"unknown export format {to!r}: expected one of {FORMATS}")
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown ONNX exporter {exporter!r}: expected one of {EXPORTERS}")
    for name in dynamic:
        if name not in names:
            raise UsageError(f"dynamic axes for {name!r}, which is not an input ({names})")


def _option_notes(to: str, opset: int | None, exporter: str) -> list[str]:
    """What the report says about the options chosen for ``to``."""
    notes = []
    if to == "torchscript":
        notes.append(
            "TorchScript is deprecated in torch 2.13 and traces one path through the code; "
            "prefer --to pt2"
        )
    if opset is not None and to != "onnx":
        notes.append(f"--opset applies to ONNX only; ignored for {to}")
    if exporter != "dynamo" and to != "onnx":
        notes.append(f"--exporter applies to ONNX only; ignored for {to}")
    return notes


@contextlib.contextmanager
def _export_failure(to: str) -> Iterator[None]:
    """torch's exporters raise many kinds of exception: each becomes a ConversionError that
    names the step and the first line of torch's message."""
    try:
        yield
    except ModelportError:
        raise
    except Exception as exc:
        first = " ".join(str(exc).strip().splitlines()[:1])[:300]
        raise ConversionError(
            f"torch could not export the model to {to}: {type(exc).__name__}: {first}"
        ) from exc


def _described_inputs(
    call: Call, inputs: Sequence[torch.Tensor], dynamic: Mapping[str, Mapping[int, str]]
) -> tuple[ExampleInput, ...]:
    return tuple(
        ExampleInput(
            name,
            tuple(tensor.shape),
            str(tensor.dtype).removeprefix("torch."),
            tuple(sorted(dynamic.get(name, {}).items())),
            name in call.keywords,
        )
        for name, tensor in zip(call.names, inputs, strict=True)
    )


def _describe(model: nn.Module) -> str:
    """The model's class as a user would name it."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        return f"{getattr(model, 'original_name', type(model).__name__)} (TorchScript)"
    if isinstance(model, torch.fx.GraphModule):
        return "torch.fx.GraphModule"  # e.g. torch.export.load(...).module()
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def bundle(path: Path, to: str) -> tuple[Path, ...]:
    """The files an export to ``path`` may write: ONNX's external data beside it too."""
    return (path, path.with_name(path.name + ".data")) if to == "onnx" else (path,)


def check_targets(path: Path, to: str, overwrite: bool, sources: Sequence[Path] = ()) -> None:
    """``convert``'s rule for every file of the bundle: an existing one is replaced only
    with ``overwrite``, and none of ``sources`` (the inputs) is ever overwritten."""
    for target in bundle(path, to):
        check_target(None, target, overwrite)
        for source in sources:
            check_target(Path(source), target, overwrite)


def _install(staged: tuple[Path, ...], path: Path, to: str, overwrite: bool) -> tuple[Path, ...]:
    """Move a built bundle into place, the file that names the data last; an older
    ``OUT.data`` the new ONNX export does not have is removed (it would be a stale half)."""
    main, *rest = staged
    installed = []
    for file in rest:
        target = path.with_name(file.name)
        install_file(file, target, overwrite=overwrite)
        installed.append(target)
    install_file(main, path, overwrite=overwrite)
    for stale in bundle(path, to)[1:]:
        if stale not in installed and stale.exists():
            stale.unlink()
    return (path, *installed)


def _dynamic_shapes(
    call: Call, inputs: list[torch.Tensor], dynamic: Mapping[str, Mapping[int, str]]
) -> tuple[Any, ...] | dict[str, Any] | None:
    """``torch.export``'s ``dynamic_shapes`` for the call: one ``{axis: Dim}`` per input
    (None for a static one), keyed by argument name when some go by keyword."""
    if not dynamic:
        return None
    import torch

    dims: dict[str, Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for name, tensor in zip(call.names, inputs, strict=True):
        axes = dynamic.get(name)
        if not axes:
            shapes.append(None)
            continue
        spec: dict[int, Any] = {}
        for axis, dim_name in axes.items():
            if not 0 <= axis < tensor.dim():
                raise UsageError(f"{name}: axis {axis} is out of range for {tensor.dim()}-d")
            if tensor.shape[axis] < 2:
                raise UsageError(
                    f"{name}: dynamic axis {axis} needs an example size of at least 2 "
                    f"(torch specializes sizes 0 and 1), got {tensor.shape[axis]}"
                )
            spec[axis] = dims.setdefault(dim_name, torch.export.Dim(dim_name))
        shapes.append(spec)
    return call.arrange(shapes)


def _write(
    to: str,
    model: nn.Module,
    path: Path,
    call: Call,
    inputs: list[torch.Tensor],
    shapes: tuple[Any, ...] | dict[str, Any] | None,
    dynamic: Mapping[str, Mapping[int, str]],
    opset: int | None,
    exporter: str,
) -> tuple[Path, ...]:
    import torch

    args, kwargs = call.split(inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if to == "onnx":
            return _export_onnx(model, path, call, inputs, shapes, dynamic, opset, exporter)
        if to == "torchscript":
            if isinstance(model, torch.jit.ScriptModule):
                torch.jit.save(model, str(path))  # type: ignore[no-untyped-call]
                return (path,)
            named = call.by_name(inputs) if kwargs else None
            if kwargs and named is None:
                raise UsageError(
                    "torch.jit.trace takes example inputs all by position or all by keyword: "
                    f"name {', '.join(call.names[: call.positional])} after the forward "
                    "arguments they feed, or export --to pt2"
                )
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                model,
                None if named else args,
                strict=False,
                check_trace=False,
                example_kwarg_inputs=named,
            )
            torch.jit.save(traced, str(path))  # type: ignore[no-untyped-call]
        else:
            program = torch.export.export(
                _exportable(model, inputs), args, kwargs, dynamic_shapes=shapes
            )
            torch.export.save(program, str(path))
    return (path,)


def _exportable(model: nn.Module, inputs: list[torch.Tensor]) -> nn.Module:
    """``model``, or for a TorchScript model its ``torch.export`` translation (torch's own
    converter), which ``torch.export`` accepts where a ScriptModule is refused. A TorchScript
    model takes its inputs by position (``binding.forward_signature``): ``inputs`` are the
    converter's ``args``."""
    import torch

    if not isinstance(model, torch.jit.ScriptModule):
        return model
    from torch._export.converter import TS2EPConverter

    converted: nn.Module = TS2EPConverter(model, tuple(inputs)).convert().module()
    return converted


def _export_onnx(
    model: nn.Module,
    path: Path,
    call: Call,
    inputs: list[torch.Tensor],
    shapes: tuple[Any, ...] | dict[str, Any] | None,
    dynamic: Mapping[str, Mapping[int, str]],
    opset: int | None,
    exporter: str,
) -> tuple[Path, ...]:
    import torch

    args, kwargs = call.split(inputs)
    names = list(call.names)
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError(
                "onnxscript", "onnx", "exporting to ONNX with the dynamo exporter"
            ) from exc
    data = path.with_name(path.name + ".data")
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" and friends
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if exporter == "dynamo":
            torch.onnx.export(
                _exportable(model, inputs),
                args,
                str(path),
                kwargs=kwargs,
                dynamo=True,
                input_names=names,
                dynamic_shapes=shapes,
                opset_version=opset,
                verbose=False,
            )
        else:
            torch.onnx.export(
                _by_position(model, call) if kwargs else model,
                tuple(inputs),
                str(path),
                dynamo=False,
                input_names=names,
                dynamic_axes={n: dict(axes) for n, axes in dynamic.items()} or None,
                opset_version=opset,
                verbose=False,
            )
            _one_data_file(path)
    finally:
        quiet.setLevel(level)
    return (path, data) if data.exists() else (path,)


def _by_position(model: nn.Module, call: Call) -> nn.Module:
    """``model`` taking every input by position, passing them on as ``call`` says: the
    legacy exporter binds keywords to ``forward``'s signature and adds every default it
    meets (``logits_to_keep=0``) as another graph input, misnaming those after it."""
    from torch import nn

    class ByPosition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.training = model.training  # the exporter sets (and restores) modes from here

        def forward(self, *inputs: torch.Tensor) -> Any:
            return call(self.model, inputs)

    return ByPosition()


def _one_data_file(path: Path) -> None:
    """The legacy exporter writes external data (above protobuf's 2 GB) as one file per
    tensor beside ``path``; gather them into ``path.data``, as the dynamo exporter does."""
    strays = [p for p in path.parent.iterdir() if p != path]
    if not strays:
        return
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("onnx", "onnx", "gathering ONNX external data") from exc
    proto = onnx.load(str(path))  # reads the per-tensor files beside it
    for stray in strays:
        stray.unlink()
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
    )


def _runner(to: str, path: Path, call: Call) -> Runner:
    """A callable running the exported file: list of input tensors -> list of outputs
    (ONNX inputs fed by name, a torch module called as ``call`` says)."""
    import numpy as np
    import torch

    if to == "onnx":
        try:
            import onnxruntime
        except ImportError as exc:
            raise MissingDependencyError("onnxruntime", "onnx", "verifying an ONNX export") from exc
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}

        def run_onnx(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            feed = {n: t.numpy() for n, t in zip(call.names, inputs, strict=True) if n in wanted}
            return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]

        return run_onnx
    if to == "torchscript":
        loaded = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    else:
        loaded = torch.export.load(str(path)).module()

    def run_torch(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return leaves(call(loaded, inputs))

    return run_torch
