"""Export a torch model to ONNX, TorchScript or ``.pt2``, and verify the result against eager.

Verification runs the exported file in its own runtime (onnxruntime, ``torch.jit.load``,
``torch.export.load``) on the example inputs and two more random inputs of the same
shapes, dtypes and value ranges (for each dynamic axis, also at two other sizes), and
compares every output with eager PyTorch: per-output max absolute and relative error,
``|exported - eager| <= atol + rtol * |eager|`` with tolerances by dtype.

- ONNX: ``torch.onnx.export(dynamo=True)``; ``OUT`` and ``OUT.data`` (external weights)
  are one bundle. bfloat16 models are exported in float32 (onnxruntime's CPU provider has
  no bfloat16 kernels), with a warning.
- TorchScript: ``torch.jit.trace``; deprecated in torch 2.13, so a warning recommends .pt2.
- pt2: ``torch.export.export`` + ``torch.export.save``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import ConversionError, MissingDependencyError, ModelportError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ("onnx", "torchscript", "pt2")
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

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sample": self.sample,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "max_abs": _finite(self.max_abs),
            "max_rel": _finite(self.max_rel),
            "atol": self.atol,
            "rtol": self.rtol,
            "ok": self.ok,
        }


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` wrote and how it compared with eager (``verified`` None: not checked)."""

    path: Path
    format: str
    files: tuple[Path, ...]
    verified: bool | None
    max_abs_error: float
    outputs: tuple[OutputCheck, ...]
    seconds: float
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "verified": self.verified,
            "max_abs_error": _finite(self.max_abs_error),
            "outputs": [o.to_json() for o in self.outputs],
            "seconds": self.seconds,
            "warnings": list(self.warnings),
        }


def _finite(value: float) -> float | None:
    """JSON has no infinity or NaN: those become null."""
    return value if math.isfinite(value) else None


def export(
    model: nn.Module,
    path: str | Path,
    example_inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    *,
    to: str = "onnx",
    dynamic: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
) -> ExportReport:
    """Export ``model`` (put in eval mode) to ``path`` and verify it against eager.

    ``example_inputs`` are passed positionally to ``forward``, in order; a mapping also names
    them (ONNX input names; keys of ``dynamic``, e.g. ``{"x": {0: "batch"}}``).
    """
    import torch

    if to not in FORMATS:
        raise ConversionError(f"unknown export format {to!r}: expected one of {FORMATS}")
    started = time.perf_counter()
    names, inputs = _named(example_inputs)
    dynamic = dict(dynamic or {})
    for name in dynamic:
        if name not in names:
            raise ConversionError(f"dynamic axes for {name!r}, which is not an input ({names})")
    notes: list[str] = []
    model = model.eval()
    if to == "onnx" and any(p.dtype == torch.bfloat16 for p in model.parameters()):
        notes.append(
            "bfloat16 model exported and verified in float32: onnxruntime's CPU provider has "
            "no bfloat16 kernels"
        )
        model = copy.deepcopy(model).float()
        inputs = [t.float() if t.dtype == torch.bfloat16 else t for t in inputs]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = _dynamic_shapes(names, inputs, dynamic)
    if to == "torchscript":
        notes.append(
            "TorchScript is deprecated in torch 2.13 and traces one path through the code; "
            "prefer --to pt2"
        )
    try:
        files = _write(to, model, path, names, inputs, shapes, opset)
    except ModelportError:
        raise
    except Exception as exc:  # torch's exporters raise many kinds; say which step failed
        first = " ".join(str(exc).strip().splitlines()[:1])[:300]
        raise ConversionError(
            f"torch could not export the model to {to}: {type(exc).__name__}: {first}"
        ) from exc
    if opset is not None and to != "onnx":
        notes.append(f"--opset applies to ONNX only; ignored for {to}")
    checks: tuple[OutputCheck, ...] = ()
    verified: bool | None = None
    if verify:
        runner = _runner(to, path, names)
        checks = tuple(_verify(model, runner, names, inputs, dynamic, rtol, atol))
        verified = all(c.ok for c in checks)
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
    )


def _named(
    example: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
) -> tuple[list[str], list[torch.Tensor]]:
    import torch

    if isinstance(example, Mapping):
        pairs = list(example.items())
    else:
        pairs = [(f"input{i}", t) for i, t in enumerate(example)]
    if not pairs:
        raise ConversionError("export needs at least one example input")
    for name, tensor in pairs:
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(f"example input {name!r} is not a torch.Tensor")
    return [n for n, _ in pairs], [t for _, t in pairs]


def _dynamic_shapes(
    names: list[str], inputs: list[torch.Tensor], dynamic: Mapping[str, Mapping[int, str]]
) -> tuple[dict[int, Any] | None, ...] | None:
    if not dynamic:
        return None
    import torch

    dims: dict[str, Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for name, tensor in zip(names, inputs, strict=True):
        axes = dynamic.get(name)
        if not axes:
            shapes.append(None)
            continue
        spec: dict[int, Any] = {}
        for axis, dim_name in axes.items():
            if not 0 <= axis < tensor.dim():
                raise ConversionError(f"{name}: axis {axis} is out of range for {tensor.dim()}-d")
            if tensor.shape[axis] < 2:
                raise ConversionError(
                    f"{name}: dynamic axis {axis} needs an example size of at least 2 "
                    f"(torch specializes sizes 0 and 1), got {tensor.shape[axis]}"
                )
            spec[axis] = dims.setdefault(dim_name, torch.export.Dim(dim_name))
        shapes.append(spec)
    return tuple(shapes)


def _write(
    to: str,
    model: nn.Module,
    path: Path,
    names: list[str],
    inputs: list[torch.Tensor],
    shapes: tuple[dict[int, Any] | None, ...] | None,
    opset: int | None,
) -> tuple[Path, ...]:
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if to == "onnx":
            return _export_onnx(model, path, names, inputs, shapes, opset)
        if to == "torchscript":
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                model, tuple(inputs), strict=False, check_trace=False
            )
            torch.jit.save(traced, str(path))
        else:
            program = torch.export.export(model, tuple(inputs), dynamic_shapes=shapes)
            torch.export.save(program, str(path))
    return (path,)


def _export_onnx(
    model: nn.Module,
    path: Path,
    names: list[str],
    inputs: list[torch.Tensor],
    shapes: tuple[dict[int, Any] | None, ...] | None,
    opset: int | None,
) -> tuple[Path, ...]:
    import torch

    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("onnxscript", "onnx", "exporting to ONNX") from exc
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # never leave a stale bundle half
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" and friends
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        torch.onnx.export(
            model,
            tuple(inputs),
            str(path),
            dynamo=True,
            input_names=names,
            dynamic_shapes=shapes,
            opset_version=opset,
            verbose=False,
        )
    finally:
        quiet.setLevel(level)
    return (path, data) if data.exists() else (path,)


def _runner(to: str, path: Path, names: list[str]) -> Any:
    """A callable running the exported file: list of input tensors -> list of outputs."""
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
            feed = {n: t.numpy() for n, t in zip(names, inputs, strict=True) if n in wanted}
            return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]

        return run_onnx
    if to == "torchscript":
        loaded = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    else:
        loaded = torch.export.load(str(path)).module()

    def run_torch(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return _leaves(loaded(*inputs))

    return run_torch


def _leaves(output: Any) -> list[torch.Tensor]:
    import torch
    from torch.utils import _pytree

    return [x for x in _pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def _samples(
    names: list[str], inputs: list[torch.Tensor], dynamic: Mapping[str, Mapping[int, str]]
) -> list[tuple[str, list[torch.Tensor]]]:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    samples = [("example", inputs)]
    for i in range(EXTRA_SAMPLES):
        samples.append((f"random{i + 1}", [_like(t, t.shape, generator) for t in inputs]))
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
                batch.append(_like(tensor, torch.Size(shape), generator))
            samples.append((f"{dim_name}={size}", batch))
    return samples


def _like(tensor: torch.Tensor, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A random tensor with ``tensor``'s dtype and value range (token ids stay in range)."""
    import torch

    if tensor.dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if tensor.is_floating_point():
        return torch.randn(shape, generator=generator).to(tensor.dtype)
    low = int(tensor.min()) if tensor.numel() else 0
    high = int(tensor.max()) if tensor.numel() else 1
    return torch.randint(low, high + 1, shape, generator=generator, dtype=tensor.dtype)


def _verify(
    model: nn.Module,
    runner: Any,
    names: list[str],
    inputs: list[torch.Tensor],
    dynamic: Mapping[str, Mapping[int, str]],
    rtol: float | None,
    atol: float | None,
) -> list[OutputCheck]:
    import torch

    checks: list[OutputCheck] = []
    for label, sample in _samples(names, inputs, dynamic):
        with torch.no_grad():
            expected = _leaves(model(*sample))
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
        for index, (ref, out) in enumerate(zip(expected, got, strict=True)):
            checks.append(_compare(f"output{index}", label, ref, out, rtol, atol))
    return checks


def _compare(
    name: str,
    sample: str,
    ref: torch.Tensor,
    out: torch.Tensor,
    rtol: float | None,
    atol: float | None,
) -> OutputCheck:
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
    bound = a + r * expected.abs().nan_to_num(nan=0.0, posinf=0.0)
    ok = bool((error <= bound).all())
    relative = error / expected.abs().clamp_min(max(a, 1e-12))
    return OutputCheck(
        name, sample, shape, dtype, float(error.max()), float(relative.max()), a, r, ok
    )
