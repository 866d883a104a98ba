"""Does a model agree with eager PyTorch? Samples, tolerances and per-output errors.

``verify_outputs`` runs the eager model (called as ``binding.bind`` decided: by position,
then by keyword after an argument left out) and a ``runner`` (the exported or reloaded model, called
the same way: list of input tensors -> list of output tensors) on the example inputs,
``EXTRA_SAMPLES`` random inputs of the same shapes, dtypes and value ranges, and, for each
dynamic axis, two other sizes; every output is compared as
``|got - eager| <= atol + rtol * |eager|``, with tolerances by dtype unless given.
``export`` and ``rebuild`` share it.

Positions an ``attention_mask`` input (Hugging Face's name; 0 marks padding) hides are not
compared in outputs that start with its ``[batch, sequence]`` shape: a fully masked query
row has no defined value, and eager and onnxruntime legitimately differ there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelport.errors import ConversionError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from modelport.torch_models.binding import Call

Runner = Callable[[list["torch.Tensor"]], list["torch.Tensor"]]
TOLERANCES: dict[str, tuple[float, float]] = {  # dtype -> (atol, rtol)
    "float64": (1e-7, 1e-6),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
EXTRA_SAMPLES = 2
SEED = 1234


@dataclass(frozen=True)
class OutputCheck:
    """One output compared on one input set."""

    name: str
    sample: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    padded: int = 0  # positions left out of the comparison (padding, see the module doc)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sample": self.sample,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "max_abs": finite(self.max_abs),
            "max_rel": finite(self.max_rel),
            "atol": self.atol,
            "rtol": self.rtol,
            "ok": self.ok,
            "padded_positions_not_compared": self.padded,
        }


def finite(value: float) -> float | None:
    """JSON has no infinity or NaN: those become null."""
    return value if math.isfinite(value) else None


def leaves(output: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in pytree order."""
    import torch
    from torch.utils import _pytree

    return [x for x in _pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def named_leaves(output: Any) -> list[tuple[str, torch.Tensor]]:
    """Eager outputs named by where they sit, as the ONNX export names its outputs: a key
    of a dict or ``ModelOutput`` (``last_hidden_state``), a tuple position
    (``output_0``), deeper levels joined by dots (``output_1.scores``), ``output`` for
    a lone tensor."""
    import torch
    from torch.utils import _pytree

    try:
        flat, _ = _pytree.tree_flatten_with_path(output)
    except ValueError:  # a type registered without key paths: diffusers' outputs
        flat, _ = _pytree.tree_flatten_with_path(_plain(output))
    return [(leaf_name(key), value) for key, value in flat if isinstance(value, torch.Tensor)]


def _plain(output: Any) -> Any:
    """``output`` with every mapping a dict and every sequence a tuple, which pytree names
    by key and position (diffusers' ``BaseOutput`` is a mapping registered without them)."""
    if isinstance(output, Mapping):
        return {key: _plain(value) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        return tuple(_plain(value) for value in output)
    return output


def leaf_name(path: Sequence[Any]) -> str:
    """The name of the output at pytree key ``path`` (see ``named_leaves``)."""
    parts = [
        str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path
    ]
    if not parts:
        return "output"
    if not hasattr(path[0], "key") and not hasattr(path[0], "name"):  # a tuple position
        parts[0] = f"output_{parts[0]}"
    return ".".join(parts)


def samples(
    names: list[str], inputs: list[torch.Tensor], dynamic: Mapping[str, Mapping[int, str]]
) -> list[tuple[str, list[torch.Tensor]]]:
    """The labelled input sets: the example, random ones, other sizes on dynamic axes."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    found = [("example", inputs)]
    for i in range(EXTRA_SAMPLES):
        found.append((f"random{i + 1}", [like(t, t.shape, generator) for t in inputs]))
    for dim_name in sorted({d for axes in dynamic.values() for d in axes.values()}):
        base = next(
            inputs[names.index(n)].shape[a]
            for n, axes in dynamic.items()
            for a, d in axes.items()
            if d == dim_name
        )
        for size in (base + 1, 2 * base + 1):
            batch = []
            for name, tensor in zip(names, inputs, strict=True):
                shape = list(tensor.shape)
                for axis, d in dynamic.get(name, {}).items():
                    if d == dim_name:
                        shape[axis] = size
                batch.append(like(tensor, torch.Size(shape), generator))
            found.append((f"{dim_name}={size}", batch))
    return found


def like(tensor: torch.Tensor, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A random tensor with ``tensor``'s dtype and value range (token ids stay in range)."""
    import torch

    if tensor.dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if tensor.is_floating_point():
        return torch.randn(shape, generator=generator).to(tensor.dtype)
    low = int(tensor.min()) if tensor.numel() else 0
    high = int(tensor.max()) if tensor.numel() else 1
    return torch.randint(low, high + 1, shape, generator=generator, dtype=tensor.dtype)


def verify_outputs(
    model: nn.Module,
    runner: Runner,
    call: Call,
    inputs: list[torch.Tensor],
    dynamic: Mapping[str, Mapping[int, str]],
    rtol: float | None,
    atol: float | None,
) -> list[OutputCheck]:
    """Every output of ``runner`` against eager ``model`` (called as ``call`` says) on every
    sample."""
    import torch

    checks: list[OutputCheck] = []
    for label, sample in samples(list(call.names), inputs, dynamic):
        with torch.no_grad():
            labelled = named_leaves(call(model, sample))
        expected = [tensor for _, tensor in labelled]
        try:
            got = runner(sample)
        except Exception as exc:  # the exported program refused an input eager accepts
            why = " ".join(str(exc).split())[:200]
            checks.append(
                OutputCheck(f"(failed: {why})", label, (), "", math.inf, math.inf, 0, 0, False)
            )
            continue
        if len(got) != len(expected):
            raise ConversionError(
                f"the exported model gave {len(got)} outputs, eager gave {len(expected)}"
            )
        padding = padding_of(list(call.names), sample)
        for (name, ref), out in zip(labelled, got, strict=True):
            checks.append(compare(name, label, ref, out, rtol, atol, padding))
    return checks


PADDING_MASK = "attention_mask"


def padding_of(names: list[str], inputs: list[torch.Tensor]) -> torch.Tensor | None:
    """Where an ``attention_mask`` input (2-d, integers or bools of 0 and 1) marks padding."""

    for name, tensor in zip(names, inputs, strict=False):
        if name != PADDING_MASK or tensor.dim() != 2 or tensor.is_floating_point():
            continue
        if bool(((tensor == 0) | (tensor == 1)).all()):
            padding: torch.Tensor = tensor == 0
            return padding
    return None


def compare(
    name: str,
    sample: str,
    ref: torch.Tensor,
    out: torch.Tensor,
    rtol: float | None,
    atol: float | None,
    padding: torch.Tensor | None = None,
) -> OutputCheck:
    """One output against its eager reference, under the dtype's tolerances (or given),
    leaving out the positions ``padding`` marks when the output starts with its shape."""
    dtype = str(ref.dtype).removeprefix("torch.")
    default_atol, default_rtol = TOLERANCES.get(dtype, (0.0, 0.0))
    a = default_atol if atol is None else atol
    r = default_rtol if rtol is None else rtol
    shape = tuple(ref.shape)
    if tuple(out.shape) != shape:
        return OutputCheck(name, sample, shape, dtype, math.inf, math.inf, a, r, False)
    expected = ref.detach().double()
    actual = out.detach().to(ref.dtype).double()
    if expected.numel() == 0:
        return OutputCheck(name, sample, shape, dtype, 0.0, 0.0, a, r, True)
    error = (actual - expected).abs()
    both_nan = expected.isnan() & actual.isnan()
    same_inf = expected.isinf() & (actual == expected)
    error = error.masked_fill(both_nan | same_inf, 0.0).nan_to_num(nan=math.inf)
    padded = 0
    if padding is not None and shape[:2] == tuple(padding.shape):
        hidden = padding.reshape(*padding.shape, *([1] * (len(shape) - 2))).expand(shape)
        error = error.masked_fill(hidden, 0.0)
        padded = int(padding.sum())
    bound = a + r * expected.abs().nan_to_num(nan=0.0, posinf=0.0)
    ok = bool((error <= bound).all())
    relative = error / expected.abs().clamp_min(max(a, 1e-12))
    return OutputCheck(
        name, sample, shape, dtype, float(error.max()), float(relative.max()), a, r, ok, padded
    )
