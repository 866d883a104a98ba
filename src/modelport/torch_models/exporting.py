"""Export a torch model to ONNX, TorchScript or ``.pt2``, and verify the result against eager.

Inputs reach ``forward`` by position while they fill its arguments in order, by keyword
after the first one left out (``modelport.binding``); every exporter, the eager reference
and the runtimes use that one call. Inputs given as a sequence are named after the
``forward`` arguments they fill. Verification runs the exported file in its own runtime
(onnxruntime, ``torch.jit.load``, ``torch.export.load``) on the example inputs and two more
random inputs of the same shapes, dtypes and value ranges (for each dynamic axis, also at
two other sizes), and compares every output with eager PyTorch: per-output max absolute
and relative error, ``|exported - eager| <= atol + rtol * |eager|`` with tolerances by
dtype. Outputs are named by where they sit in what ``forward`` returns
(``last_hidden_state``, ``output_0``; ``agreement.named_leaves``). The exporters trace a
copy made before the model first runs (``tracing_copy``), so a ``forward`` that caches
values (ultralytics' anchors) is traced from its first call and verified against a module
no tracer has touched.

- ONNX (``onnx_export``): ``torch.onnx.export(dynamo=True)`` by default,
  ``exporter="legacy"`` for the TorchScript-based one (``dynamo=False``, dynamic axes as
  ``dynamic_axes``; a call with keywords goes through a wrapper that takes every input by
  position, so its weights are named ``model.*``). The graph's inputs and outputs carry
  the names above, or ``input_names`` / ``output_names``; the model runs once on the
  example inputs before the export to name its outputs. ``OUT`` alone while the weights
  fit in one protobuf, ``OUT`` and ``OUT.data`` above that or with ``external_data``: one
  bundle. bfloat16 models are exported in float32 (onnxruntime's CPU provider has no
  bfloat16 kernels), with a warning.
- TorchScript: ``torch.jit.trace`` (a call with keywords is traced all by keyword, as
  ``example_kwarg_inputs``; a TorchScript model is saved as it is); deprecated in torch 2.13,
  so a warning recommends .pt2.
- ExecuTorch (``executorch_export``): ``.pte`` lowered to XNNPACK where it applies, run in
  ExecuTorch's runtime; LiteRT (``tflite_export``): ``.tflite`` from LiteRT's PyTorch
  converter, run in LiteRT's interpreter. Dynamic axes get an upper bound there.
- pt2: ``torch.export.export`` + ``torch.export.save``. A TorchScript model goes through
  torch's TorchScript-to-``torch.export`` converter first (pt2, and ONNX with dynamo).

torch's loggers and every warning raised inside are silenced for the span of the export
(``quiet.quiet_libraries``): what matters reaches the report. The bundle is written into
a new directory beside ``OUT``, verified there, then renamed into place (data first): an
error leaves nothing behind, and an existing ``OUT`` or ``OUT.data`` is only replaced with
``overwrite`` (convert's rule and message).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import ConversionError, ModelportError, UsageError
from modelport.torch_models.agreement import (
    OutputCheck,
    Runner,
    leaves,
    verify_outputs,
)
from modelport.torch_models.binding import Call, bind, forward_signature
from modelport.torch_models.building import eval_mode
from modelport.torch_models.executorch_export import pte_notes, pte_runner, write_pte
from modelport.torch_models.export_report import RUNTIMES, ExampleInput, ExportReport
from modelport.torch_models.onnx_export import (
    OnnxNames,
    eager_output_names,
    export_onnx,
    named_as_exported,
    onnx_names,
    onnx_runner,
)
from modelport.torch_models.quiet import quiet_libraries
from modelport.torch_models.tflite_export import tflite_notes, tflite_runner, write_tflite
from modelport.torch_models.tracing_copy import tracing_copy
from modelport.transfer.placing import check_target, install_file, staging_folder

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ("onnx", "torchscript", "pt2", "executorch", "tflite")
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
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    external_data: bool = False,
) -> ExportReport:
    """Export ``model`` (put in eval mode) to ``path`` and verify it against eager.

    A mapping of ``example_inputs`` names them (ONNX input names; keys of ``dynamic``, e.g.
    ``{"x": {0: "batch"}}``); a sequence's are named after the ``forward`` arguments they
    fill. Inputs named after ``forward``'s arguments go by position while they fill them
    in order, then by keyword (``{"input_ids": ..., "attention_mask": ...}`` for GPT-2,
    whose ``past_key_values`` is left out); names ``forward`` lacks go by position (see
    ``modelport.binding``). ``exporter`` picks the ONNX exporter (``"dynamo"`` or
    ``"legacy"``); ``input_names`` and ``output_names`` rename the ONNX graph's inputs and
    outputs (``dynamic`` may use either name); ``external_data`` puts the weights in
    ``path.data`` even when they fit in ``path``. An existing ``path`` (or ``path.data``
    for ONNX) is replaced only with ``overwrite``.
    """
    started = time.perf_counter()
    path = Path(path)
    with quiet_libraries(every_warning=True):
        call, inputs = bind(model, _named_after_forward(model, example_inputs))
        dynamic = _by_call_name(dynamic or {}, call, input_names if to == "onnx" else None)
        _check_options(to, exporter, list(call.names), dynamic)
        path.parent.mkdir(parents=True, exist_ok=True)
        check_targets(path, to, overwrite)
        onnx_only = {
            "--input-names": input_names,
            "--output-names": output_names,
            "--external-data": external_data,
        }
        notes = _option_notes(to, opset, exporter, [k for k, v in onnx_only.items() if v])
        model = eval_mode(model)
        described = _describe(model)
        names = None
        if to == "onnx":
            model, inputs = _float32_for_onnxruntime(model, inputs, notes)
        traced = tracing_copy(model, notes)  # before anything runs or traces the model
        if to == "onnx":
            eager = eager_output_names(model, call, inputs)
            names = onnx_names(call, eager, input_names, output_names)
        shapes = _dynamic_shapes(call, inputs, dynamic)
        plan = _Plan(to, traced, call, inputs, dynamic, shapes, names, opset, exporter, model)
        files, checks = _build(plan, path, external_data, overwrite, verify, (rtol, atol))
        if to == "executorch":
            notes += pte_notes(path, dynamic)
        if to == "tflite":
            notes += tflite_notes(inputs, dynamic)
    return ExportReport(
        path=path,
        format=to,
        files=files,
        verified=all(c.ok for c in checks) if verify else None,
        max_abs_error=max((c.max_abs for c in checks), default=0.0),
        outputs=named_as_exported(checks, names),
        seconds=time.perf_counter() - started,
        warnings=tuple(notes),
        model=described,
        exporter=exporter if to == "onnx" else None,
        opset=opset if to == "onnx" else None,
        inputs=_described_inputs(call, inputs, dynamic, names),
        sizes=tuple(f.stat().st_size for f in files),
        runtime=RUNTIMES[to] if verify else "",
    )


@dataclass(frozen=True)
class _Plan:
    """One export, decided: the model and the call to export, and how (``names``: the
    ONNX graph's, None for the other formats). ``model`` is what the exporter traces,
    ``reference`` what the eager reference runs on (``tracing_copy``)."""

    to: str
    model: nn.Module
    call: Call
    inputs: list[torch.Tensor]
    dynamic: Mapping[str, Mapping[int, str]]
    shapes: tuple[Any, ...] | dict[str, Any] | None
    names: OnnxNames | None
    opset: int | None
    exporter: str
    reference: nn.Module


def _build(
    plan: _Plan,
    path: Path,
    external_data: bool,
    overwrite: bool,
    verify: bool,
    tolerances: tuple[float | None, float | None],
) -> tuple[tuple[Path, ...], tuple[OutputCheck, ...]]:
    """Write the bundle in a staging folder beside ``path``, verify it there (``verify``:
    with ``(rtol, atol)``), then move it into place: the files and the checks."""
    building = staging_folder(path)  # the bundle is built and verified here, then moved
    try:
        staged = building / path.name
        with _export_failure(plan.to):
            if plan.names is not None:
                files = export_onnx(
                    _exportable(plan.model, plan.inputs)
                    if plan.exporter == "dynamo"
                    else plan.model,
                    staged,
                    plan.call,
                    plan.inputs,
                    names=plan.names,
                    shapes=plan.shapes,
                    dynamic=plan.dynamic,
                    opset=plan.opset,
                    exporter=plan.exporter,
                    external_data=external_data,
                )
            else:
                files = _write(plan.to, plan.model, staged, plan.call, plan.inputs, plan.shapes)
        checks: tuple[OutputCheck, ...] = ()
        if verify:
            runner = _runner(plan.to, staged, plan.call, plan.names)
            rtol, atol = tolerances
            checks = tuple(
                verify_outputs(
                    plan.reference, runner, plan.call, plan.inputs, plan.dynamic, rtol, atol
                )
            )
        return _install(files, path, plan.to, overwrite), checks
    finally:
        shutil.rmtree(building, ignore_errors=True)


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


def _option_notes(to: str, opset: int | None, exporter: str, onnx_only: list[str]) -> list[str]:
    """What the report says about the options chosen for ``to`` (``onnx_only``: the
    ONNX-only options given)."""
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
    if onnx_only and to != "onnx":
        notes.append(f"{', '.join(onnx_only)} apply to ONNX only; ignored for {to}")
    return notes


def _named_after_forward(
    model: nn.Module, example: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
) -> Mapping[str, torch.Tensor] | Sequence[torch.Tensor]:
    """Inputs given in order, named after the ``forward`` arguments they fill (``x``,
    ``mask``): the names the ONNX graph and the report give them. More inputs than
    arguments keep ``bind``'s ``input0``, ``input1``... names."""
    if isinstance(example, Mapping):
        return example
    signature = forward_signature(model)
    if signature is None:
        return example
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    slots = [p.name for p in signature.parameters.values() if p.kind in kinds]
    if len(example) > len(slots):
        return example
    return dict(zip(slots, example, strict=False))


def _by_call_name(
    dynamic: Mapping[str, Mapping[int, str]], call: Call, input_names: Sequence[str] | None
) -> dict[str, Mapping[int, str]]:
    """``dynamic`` keyed by the call's input names, where it names an input by the ONNX
    name ``input_names`` gives it."""
    renamed = dict(zip(input_names or (), call.names, strict=False))
    return {
        name if name in call.names else renamed.get(name, name): axes
        for name, axes in dynamic.items()
    }


def _float32_for_onnxruntime(
    model: nn.Module, inputs: list[torch.Tensor], notes: list[str]
) -> tuple[nn.Module, list[torch.Tensor]]:
    """A bfloat16 model and its inputs in float32 (onnxruntime's CPU provider has no
    bfloat16 kernels), said in ``notes``; any other model as it is."""
    import torch

    if not any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return model, inputs
    notes.append(
        "bfloat16 model exported and verified in float32: onnxruntime's CPU provider has "
        "no bfloat16 kernels"
    )
    converted = [t.float() if t.dtype == torch.bfloat16 else t for t in inputs]
    return copy.deepcopy(model).float(), converted


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
    call: Call,
    inputs: Sequence[torch.Tensor],
    dynamic: Mapping[str, Mapping[int, str]],
    names: OnnxNames | None,
) -> tuple[ExampleInput, ...]:
    """The inputs as the report lists them, under their ONNX graph names for ONNX."""
    shown = names.inputs if names is not None else call.names
    return tuple(
        ExampleInput(
            label,
            tuple(tensor.shape),
            str(tensor.dtype).removeprefix("torch."),
            tuple(sorted(dynamic.get(name, {}).items())),
            name in call.keywords,
        )
        for name, label, tensor in zip(call.names, shown, inputs, strict=True)
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
) -> tuple[Path, ...]:
    """Write ``path`` as TorchScript, ``.pt2``, ExecuTorch or LiteRT (ONNX: ``onnx_export``)."""
    if to in ("executorch", "tflite"):
        write = write_pte if to == "executorch" else write_tflite
        return write(_exportable(model, inputs), path, call, inputs, shapes)
    import torch

    args, kwargs = call.split(inputs)
    with torch.no_grad():
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


def _runner(to: str, path: Path, call: Call, names: OnnxNames | None) -> Runner:
    """A callable running the exported file: list of input tensors -> list of outputs
    (ONNX inputs fed by their graph names, a torch module called as ``call`` says)."""
    import torch

    if names is not None:
        return onnx_runner(path, names)
    if to == "executorch":
        return pte_runner(path)
    if to == "tflite":
        return tflite_runner(path, call)
    if to == "torchscript":
        loaded = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    else:
        loaded = torch.export.load(str(path)).module()

    def run_torch(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return leaves(call(loaded, inputs))

    return run_torch
