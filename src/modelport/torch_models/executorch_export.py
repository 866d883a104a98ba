"""ExecuTorch's part of ``export``: a ``.pte`` program, lowered to XNNPACK where it applies,
and the runner that executes it in ExecuTorch's own runtime.

Writing: ``torch.export.export``, then ``executorch.exir.to_edge_transform_and_lower`` with
the XNNPACK partitioner (the subgraphs XNNPACK supports become delegate blobs; every other
operator runs on ExecuTorch's portable kernels), then ``to_executorch()``. A program the
XNNPACK lowering refuses is lowered with plain ``to_edge`` instead: all portable kernels.

A transformers model whose fused attention the edge lowering cannot decompose is exported
again with its eager attention (``eager_attention``).

Dynamic axes: ExecuTorch plans every tensor's memory ahead of time, for the largest size
an axis may take, and an axis torch leaves unbounded is planned at the example's size (a
larger input is then refused at run time). Each dynamic axis is therefore bounded at
``GROWTH`` times its example size, which covers the larger sizes verification runs
(``agreement.samples``: size + 1 and 2 x size + 1); LiteRT's converter needs a bound too
(``tflite_export``).

Running: ``executorch.runtime.Runtime`` loads the file and executes ``forward`` with the
inputs flattened as ``torch.export`` flattened them: positional ones, then keywords in the
call's order (``binding.Call.split``). Its outputs come back flat, in pytree order, as
``agreement.leaves`` lists eager's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import MissingDependencyError
from modelport.formats.executorch_pte import READER as PTE_READER
from modelport.formats.sniffing import probe_model
from modelport.torch_models.agreement import Runner
from modelport.torch_models.binding import Call

if TYPE_CHECKING:
    import torch
    from torch import nn

GROWTH = 4  # a dynamic axis is bounded at GROWTH x its example size
XNNPACK = "XnnpackBackend"  # the delegate id ExecuTorch records in the program

Shapes = tuple[Any, ...] | dict[str, Any] | None


def write_pte(
    model: nn.Module, path: Path, call: Call, inputs: list[torch.Tensor], shapes: Shapes
) -> tuple[Path, ...]:
    """Export ``model`` (called as ``call`` says) to the ExecuTorch program ``path``."""
    import torch

    try:
        from executorch.exir import to_edge, to_edge_transform_and_lower
    except ImportError as exc:
        raise MissingDependencyError("executorch", "executorch", "exporting to ExecuTorch") from exc
    args, kwargs = call.split(inputs)

    def lowered() -> Any:
        with torch.no_grad():
            program = torch.export.export(
                model, args, kwargs, dynamic_shapes=bounded(shapes, call, inputs)
            )
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )

            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            return edge.to_executorch()
        except Exception:  # XNNPACK refused the graph: every operator on portable kernels
            return to_edge(program).to_executorch()

    try:
        manager = lowered()
    except Exception:
        if not eager_attention(model):
            raise
        manager = lowered()
    with open(path, "wb") as out:
        manager.write_to_file(out)
    return (path,)


def eager_attention(model: nn.Module) -> bool:
    """Switch a transformers model on torch's fused attention (``sdpa``) to its own eager
    attention; False when it is not one. The edge lowering decomposes
    ``scaled_dot_product_attention`` into a result whose strides GPT-2's next ``view``
    cannot take (torch 2.13: "Cannot view a tensor with shape ..."); the eager attention
    computes the same values from plain matmuls and softmax, which lower. ``model`` is the
    copy the exporter traces (``tracing_copy``): the eager reference keeps its own."""
    config = getattr(model, "config", None)
    switch = getattr(model, "set_attn_implementation", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not callable(switch):
        return False
    switch("eager")
    return True


def bounded(shapes: Shapes, call: Call, inputs: list[torch.Tensor]) -> Shapes:
    """``shapes`` (``torch.export``'s dynamic shapes for the call) with every dynamic axis
    bounded at ``GROWTH`` times its example size; the same name stays one ``Dim``."""
    if shapes is None:
        return None
    import torch

    specs = _flat(shapes, call)
    sizes: dict[str, int] = {}
    for spec, tensor in zip(specs, inputs, strict=True):
        for axis, dim in (spec or {}).items():
            sizes[dim.__name__] = max(sizes.get(dim.__name__, 0), int(tensor.shape[axis]))
    dims = {name: torch.export.Dim(name, max=GROWTH * size) for name, size in sizes.items()}
    return call.arrange(
        [
            {axis: dims[dim.__name__] for axis, dim in spec.items()} if spec else spec
            for spec in specs
        ]
    )


def _flat(shapes: tuple[Any, ...] | dict[str, Any], call: Call) -> list[Mapping[int, Any] | None]:
    """One spec per input, in the call's order (``Call.arrange`` undone)."""
    if isinstance(shapes, dict):
        return [shapes.get(name) for name in call.names]
    return list(shapes)


def bound_note(dynamic: Mapping[str, Mapping[int, str]], runtime: str) -> list[str]:
    """What the report says about the bound ``bounded`` put on dynamic axes."""
    if not dynamic:
        return []
    return [
        f"{runtime} plans memory for the largest input: each dynamic axis is bounded at "
        f"{GROWTH}x its example size"
    ]


def pte_runner(path: Path) -> Runner:
    """The program at ``path`` in ExecuTorch's runtime: list of input tensors (in the
    call's order) -> its outputs."""
    import torch

    try:
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise MissingDependencyError(
            "executorch", "executorch", "verifying an ExecuTorch export"
        ) from exc
    method = Runtime.get().load_program(path).load_method("forward")

    def run_pte(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = method.execute([t.contiguous() for t in inputs])
        # the runtime reuses its planned memory: copy before the next call overwrites it
        return [o.clone() for o in outputs if isinstance(o, torch.Tensor)]

    return run_pte


def pte_notes(path: Path, dynamic: Mapping[str, Mapping[int, str]]) -> list[str]:
    """What the report says about the program written: which backend runs it, as
    modelport's own reader finds it in the file."""
    contents = PTE_READER.contents(probe_model(path))
    delegates = [d for m in contents.details.get("methods", []) for d in m["delegates"]]
    if XNNPACK in delegates:
        backend = (
            f"XNNPACK runs {delegates.count(XNNPACK)} delegated part(s) of the program; "
            "any other operator runs on ExecuTorch's portable kernels"
        )
    else:
        backend = "nothing is delegated to XNNPACK: ExecuTorch's portable kernels run it all"
    return [backend, *bound_note(dynamic, "ExecuTorch")]
