"""ONNX's part of ``export``: the graph's names, one file or two, and the onnxruntime runner.

Names. The graph's inputs take the inputs' names: the mapping's keys, or ``forward``'s
argument names for inputs given in order. Its outputs take the names the report gives the
eager outputs (``agreement.named_leaves``): the keys of a dict or ``ModelOutput``
(``last_hidden_state``, ``logits``), tuple positions as ``output_0``, ``output_1``,
deeper levels joined by dots (``output_1.scores``), ``output`` for a lone tensor; an
output name an input already has gets a ``_1`` suffix (a graph value has one name).
``input_names`` / ``output_names`` choose others, one per input or output. Both exporters
are handed the names (``torch.onnx.export(input_names=..., output_names=...)``); nothing
renames the file afterwards, so the file verified is the file installed.

Files. ``OUT`` alone while the weights fit in one protobuf (2 GB): the dynamo exporter is
called with ``external_data=False``, which still moves the weights out above its own
threshold (1.5 GB of initializers); the legacy one writes one file per tensor above the
limit, gathered here into ``OUT.data``. ``external_data`` puts the weights in ``OUT.data``
whatever their size (onnx keeps tensors under 1 KiB inline).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import ConversionError, MissingDependencyError, UsageError
from modelport.torch_models.agreement import OutputCheck, Runner, named_leaves
from modelport.torch_models.binding import Call, forward_signature

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class OnnxNames:
    """The graph's input names (one per input of the call, in its order) and output names
    (one per tensor the model returns, in pytree order)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def onnx_names(
    call: Call,
    eager_outputs: Sequence[str],
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> OnnxNames:
    """The names the graph gets: the ones chosen, else the call's and the eager outputs'."""
    inputs = _chosen("input_names (--input-names)", input_names, list(call.names), "inputs")
    outputs = _chosen(
        "output_names (--output-names)",
        output_names,
        _unique(eager_outputs, taken=set(inputs)),
        "outputs",
    )
    clash = sorted(set(inputs) & set(outputs))
    if clash:
        raise UsageError(
            f"{', '.join(clash)} would name both an input and an output of the ONNX graph: "
            "choose other output names"
        )
    return OnnxNames(tuple(inputs), tuple(outputs))


def _chosen(option: str, chosen: Sequence[str] | None, default: list[str], what: str) -> list[str]:
    if chosen is None:
        return default
    names = list(chosen)
    if len(names) != len(default):
        raise UsageError(
            f"{option} gives {len(names)} names; the model has {len(default)} {what}: "
            f"{', '.join(default)}"
        )
    if not all(names) or len(set(names)) != len(names):
        raise UsageError(f"{option}: names must be distinct and not empty, got {names}")
    return names


def _unique(names: Sequence[str], taken: set[str]) -> list[str]:
    unique = []
    for name in names:
        candidate, suffix = name, 0
        while candidate in taken:
            suffix += 1
            candidate = f"{name}_{suffix}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


def eager_output_names(model: nn.Module, call: Call, inputs: list[torch.Tensor]) -> list[str]:
    """The names of the eager outputs on the example inputs, which the ONNX graph's
    outputs take (``agreement.named_leaves``)."""
    import torch

    try:
        with torch.no_grad():
            output = call(model, inputs)
    except Exception as exc:
        first = " ".join(str(exc).strip().splitlines()[:1])[:300]
        raise ConversionError(
            f"the model failed on the example inputs: {type(exc).__name__}: {first}"
        ) from exc
    return [name for name, _ in named_leaves(output)]


def named_as_exported(
    checks: tuple[OutputCheck, ...], names: OnnxNames | None
) -> tuple[OutputCheck, ...]:
    """The checks under the ONNX graph's output names, where those were chosen or had to
    change (an output named like an input)."""
    if names is None:
        return checks
    order = list(dict.fromkeys(c.name for c in checks if not c.name.startswith("(failed")))
    if len(order) != len(names.outputs):
        return checks
    renamed = dict(zip(order, names.outputs, strict=True))
    return tuple(replace(c, name=renamed.get(c.name, c.name)) for c in checks)


def export_onnx(
    model: nn.Module,
    path: Path,
    call: Call,
    inputs: list[torch.Tensor],
    *,
    names: OnnxNames,
    shapes: tuple[Any, ...] | dict[str, Any] | None,
    dynamic: Mapping[str, Mapping[int, str]],
    opset: int | None,
    exporter: str,
    external_data: bool,
) -> tuple[Path, ...]:
    """Write ``path`` (and ``path.data`` when the weights go beside it) with ``exporter``
    (``"dynamo"``: ``model`` is something ``torch.export`` accepts; ``"legacy"``)."""
    import torch

    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError(
                "onnxscript", "onnx", "exporting to ONNX with the dynamo exporter"
            ) from exc
        args, kwargs = call.split(inputs)
        torch.onnx.export(
            model,
            args,
            str(path),
            kwargs=kwargs,
            dynamo=True,
            input_names=list(names.inputs),
            output_names=list(names.outputs),
            dynamic_shapes=shapes,
            opset_version=opset,
            external_data=external_data,
            verbose=False,
        )
    else:
        renamed = dict(zip(call.names, names.inputs, strict=True))
        torch.onnx.export(
            by_position(model, call) if _fills_defaults(model, call) else model,
            tuple(inputs),
            str(path),
            dynamo=False,
            input_names=list(names.inputs),
            output_names=list(names.outputs),
            dynamic_axes={renamed[n]: dict(axes) for n, axes in dynamic.items()} or None,
            opset_version=opset,
            verbose=False,
        )
        one_data_file(path, external=external_data)
    data = path.with_name(path.name + ".data")
    return (path, data) if data.exists() else (path,)


def _fills_defaults(model: nn.Module, call: Call) -> bool:
    """Whether the legacy exporter would pass ``model`` more than the inputs: a call
    with keywords, or a ``forward`` with defaults after the inputs, which it appends by
    position (transformers' models then get ``use_cache`` twice)."""
    if call.keywords:
        return True
    signature = forward_signature(model)
    if signature is None:
        return False
    rest = list(signature.parameters.values())[len(call.names) :]
    return any(p.default is not inspect.Parameter.empty for p in rest)


def by_position(model: nn.Module, call: Call) -> nn.Module:
    """``model`` taking every input by position, passing them on as ``call`` says: the
    legacy exporter binds keywords to ``forward``'s signature and adds every default it
    meets (``logits_to_keep=0``) as another argument, misnaming the graph inputs after it.
    Its weights are then named ``model.*``."""
    from torch import nn

    class ByPosition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.training = model.training  # the exporter sets (and restores) modes from here

        def forward(self, *inputs: torch.Tensor) -> Any:
            return call(self.model, inputs)

    return ByPosition()


def one_data_file(path: Path, *, external: bool = False) -> None:
    """The legacy exporter writes external data (above protobuf's 2 GB) as one file per
    tensor beside ``path``; gather them into ``path.data``, as the dynamo exporter does,
    and move the weights there when ``external`` asks for it although they fit."""
    strays = [p for p in path.parent.iterdir() if p != path]
    if not strays and not external:
        return
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("onnx", "onnx", "writing ONNX external data") from exc
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


def onnx_runner(path: Path, names: OnnxNames) -> Runner:
    """The exported file in onnxruntime: list of input tensors (in the call's order) ->
    its outputs, the inputs fed by their graph names (the legacy exporter drops the ones
    the graph does not use)."""
    import numpy as np
    import torch

    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "verifying an ONNX export") from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}

    def run_onnx(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feed = {n: t.numpy() for n, t in zip(names.inputs, inputs, strict=True) if n in wanted}
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]

    return run_onnx
