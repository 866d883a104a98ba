"""LiteRT's part of ``export``: a ``.tflite`` model written by LiteRT's PyTorch converter
(``litert_torch.convert``), and the runner that invokes it in LiteRT's interpreter.

Writing: ``litert_torch.convert(model, args, kwargs, dynamic_shapes=...)`` traces the model
with ``torch.export`` and lowers it to a TFLite flatbuffer, written as it comes. The
converter turns 64-bit inputs and outputs into 32-bit ones (its ``enable_x64=False``
default: most on-device runtimes have no 64-bit kernels); the runner feeds int64 token ids
as int32 and the comparison casts outputs back to eager's dtype. Dynamic axes are bounded
as for ExecuTorch (``executorch_export.bounded``); the converter needs a bound.

Running: ``ai_edge_litert.interpreter.Interpreter`` on the file. The converter names the
default signature's inputs ``args_0``, ``args_1``... for positional inputs and after the
argument for keywords: each input is fed to its tensor by that name, resized first when a
sample's shape differs from the one allocated. Outputs are read in the subgraph's order,
which is the pytree order of what ``forward`` returns (``agreement.leaves``).

The converter reports progress on stdout: that is dropped.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from modelport.errors import ConversionError, MissingDependencyError
from modelport.torch_models.agreement import Runner
from modelport.torch_models.binding import Call
from modelport.torch_models.executorch_export import Shapes, bound_note, bounded

if TYPE_CHECKING:
    import torch
    from torch import nn

NARROWED = {"int64": "int32", "float64": "float32"}  # the converter's 64 -> 32-bit types


def write_tflite(
    model: nn.Module, path: Path, call: Call, inputs: list[torch.Tensor], shapes: Shapes
) -> tuple[Path, ...]:
    """Convert ``model`` (called as ``call`` says) to the LiteRT model ``path``."""
    try:
        import litert_torch
    except ImportError as exc:
        raise MissingDependencyError("litert-torch", "litert", "exporting to LiteRT") from exc
    args, kwargs = call.split(inputs)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            converted = litert_torch.convert(
                model, args, kwargs or None, dynamic_shapes=bounded(shapes, call, inputs)
            )
            flatbuffer = converted.model_content()
    except Exception as exc:
        if shapes is None:
            raise
        first = " ".join(str(exc).strip().splitlines()[:1])[:200]
        raise ConversionError(
            f"LiteRT's converter failed with dynamic axes ({type(exc).__name__}: {first}); "
            "export without --dynamic: the model then takes the example's shapes"
        ) from exc
    path.write_bytes(flatbuffer)
    return (path,)


def input_names(call: Call) -> list[str]:
    """The converter's names for the call's inputs, in the call's order."""
    return [f"args_{i}" for i in range(call.positional)] + list(call.keywords)


def tflite_runner(path: Path, call: Call) -> Runner:
    """The model at ``path`` in LiteRT's interpreter: list of input tensors (in the call's
    order) -> its outputs."""
    import numpy as np
    import torch

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise MissingDependencyError(
            "ai-edge-litert", "litert", "verifying a LiteRT export"
        ) from exc
    interpreter = Interpreter(model_path=str(path))
    signature = interpreter.get_signature_runner().get_input_details()
    # (tensor index, dtype) per input of the call; None: one the converted graph dropped
    feeds = [signature.get(name) for name in input_names(call)]
    shapes = {d["index"]: list(d["shape"]) for d in signature.values()}  # as allocated
    interpreter.allocate_tensors()

    def run_tflite(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        fed = [(detail, t) for detail, t in zip(feeds, inputs, strict=True) if detail]
        resize = [
            (d["index"], list(t.shape)) for d, t in fed if shapes[d["index"]] != list(t.shape)
        ]
        for index, shape in resize:
            interpreter.resize_tensor_input(index, shape)
            shapes[index] = shape
        if resize:
            interpreter.allocate_tensors()
        for detail, tensor in fed:
            array = tensor.numpy().astype(detail["dtype"], copy=False)
            interpreter.set_tensor(detail["index"], array)
        interpreter.invoke()
        return [
            torch.from_numpy(np.array(interpreter.get_tensor(out["index"])))
            for out in interpreter.get_output_details()
        ]

    return run_tflite


def tflite_notes(inputs: list[torch.Tensor], dynamic: Mapping[str, Mapping[int, str]]) -> list[str]:
    """What the report says about the converted model: 64-bit inputs it narrowed, the
    bound on dynamic axes."""
    notes = []
    wide = sorted({str(t.dtype).removeprefix("torch.") for t in inputs} & set(NARROWED))
    if wide:
        narrowed = ", ".join(f"{w} -> {NARROWED[w]}" for w in wide)
        notes.append(f"LiteRT's converter narrows 64-bit inputs and outputs ({narrowed})")
    return [*notes, *bound_note(dynamic, "LiteRT")]
