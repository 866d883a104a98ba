"""Comparing the weights of two model files, in any formats, in bounded memory.

``diff(a, b)`` pairs the tensors of A and B by name and reports:

- ``only_in_a`` / ``only_in_b``: names one side lacks;
- ``changed``: common names whose dtype or shape differ;
- ``tensors``: for every common name of equal shape, value statistics (B is the
  reference, as in ``numpy.isclose(a, b)``):
  ``max_abs = max |a - b|``, ``max_rel = max |a - b| / |b|`` (``inf`` where ``b == 0`` and
  ``a != b``), ``cosine`` of the flattened tensors, ``bit_equal`` (same dtype and identical
  bytes), ``within_tolerance`` (every element has ``|a - b| <= atol + rtol * |b|``) and
  ``mismatched`` (elements outside it).

Choices and edge cases:

- the two tensors are streamed side by side (``streaming.paired_chunks``), chunk by
  chunk, with statistics accumulated in float64 (complex128 when either side is
  complex); memory is bounded by the chunk size, never by the file;
- different dtypes are compared after both are upcast (``bit_equal`` is then False; int64
  values past 2**53 lose precision there);
- NaN equals NaN at the same position; NaN against a number, or ``inf`` against anything
  but the same ``inf``, is a difference of ``inf``;
- two zero vectors have cosine 1.0, a zero vector against a non-zero one 0.0;
- block-quantized (GGUF) and torch-quantized tensors, and tensors saved without data, are
  compared by bytes only (their statistics are None);
- ``same`` holds when no name is missing, nothing changed, and every common tensor is
  bit-equal (``atol == rtol == 0``) or within tolerance (otherwise);
- ``strip_prefix="auto"`` strips from each side the wrapper prefixes every one of its
  names carries (``tree.names.wrapper_prefix``, as ``convert`` does), except where keeping
  a side's names as they are pairs more names; a given string is removed from every name
  of both sides that starts with it (unless that would make two names collide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelport import dtypes
from modelport.loading import model_file as api
from modelport.tensors import NDArray, TensorRef
from modelport.transfer.streaming import paired_chunks
from modelport.tree import names as trees

DIFF_CHUNK = 4 << 20  # bytes per chunk and side; float64 copies are a few times this


@dataclass(frozen=True)
class TensorChange:
    """A name both files hold with a different dtype or shape."""

    name: str
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(
            kind
            for kind, differs in (
                ("dtype", self.dtype_a != self.dtype_b),
                ("shape", self.shape_a != self.shape_b),
            )
            if differs
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kinds": list(self.kinds),
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "shape_a": list(self.shape_a),
            "shape_b": list(self.shape_b),
        }


@dataclass(frozen=True)
class TensorDiff:
    """Value statistics of one common tensor of equal shape."""

    name: str
    dtype_a: str
    dtype_b: str
    shape: tuple[int, ...]
    bit_equal: bool
    within_tolerance: bool
    mismatched: int
    max_abs: float | None
    max_rel: float | None
    cosine: float | None
    note: str = ""

    def matches(self, *, exact: bool) -> bool:
        return self.bit_equal if exact else self.within_tolerance

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "shape": list(self.shape),
            "bit_equal": self.bit_equal,
            "within_tolerance": self.within_tolerance,
            "mismatched": self.mismatched,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "cosine": _json_float(self.cosine),
            "note": self.note,
        }


@dataclass(frozen=True)
class DiffReport:
    """How the weights of A differ from those of B."""

    a: str
    b: str
    format_a: str
    format_b: str
    atol: float
    rtol: float
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    changed: tuple[TensorChange, ...]
    tensors: tuple[TensorDiff, ...]
    notes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return self.atol == 0 and self.rtol == 0

    @property
    def same(self) -> bool:
        return (
            not self.only_in_a
            and not self.only_in_b
            and not self.changed
            and all(t.matches(exact=self.exact) for t in self.tensors)
        )

    @property
    def differing(self) -> tuple[TensorDiff, ...]:
        """Common tensors that do not match, the largest ``max_abs`` first."""
        found = [t for t in self.tensors if not t.matches(exact=self.exact)]
        return tuple(sorted(found, key=_sort_key))

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "format_a": self.format_a,
            "format_b": self.format_b,
            "atol": self.atol,
            "rtol": self.rtol,
            "same": self.same,
            "counts": {
                "common": len(self.tensors) + sum("shape" in c.kinds for c in self.changed),
                "only_in_a": len(self.only_in_a),
                "only_in_b": len(self.only_in_b),
                "changed": len(self.changed),
                "differing": len(self.differing),
            },
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "changed": [c.to_json() for c in self.changed],
            "tensors": [t.to_json() for t in self.tensors],
            "notes": list(self.notes),
        }


def _sort_key(t: TensorDiff) -> tuple[float, str]:
    value = math.inf if t.max_abs is None or math.isnan(t.max_abs) else t.max_abs
    return (-value, t.name)


def _json_float(value: float | None) -> float | str | None:
    """JSON has no inf or NaN: those become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def diff(
    a: str | Path,
    b: str | Path,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    strip_prefix: str | None = None,
    allow_unsafe: bool = False,
    weights_only: bool = True,
) -> DiffReport:
    """Compare the weights of two model files (any formats); see the module docstring.

    Both files are scanned first: ``unsafe`` raises ``UnsafeModelError`` unless
    ``allow_unsafe``. ``weights_only=False`` compares every tensor in the files.
    """
    if not (atol >= 0 and rtol >= 0):  # also refuses NaN
        raise ValueError(f"atol and rtol must be non-negative numbers, got {atol}, {rtol}")
    api.check_safety(a, allow_unsafe=allow_unsafe)
    api.check_safety(b, allow_unsafe=allow_unsafe)
    notes: list[str] = []
    with api.open(a) as model_a, api.open(b) as model_b:
        tensors_a = _chosen(model_a, weights_only, "A", notes)
        tensors_b = _chosen(model_b, weights_only, "B", notes)
        tensors_a, tensors_b = _normalise(tensors_a, tensors_b, strip_prefix, notes)
        only_a = tuple(n for n in tensors_a if n not in tensors_b)
        only_b = tuple(n for n in tensors_b if n not in tensors_a)
        changed: list[TensorChange] = []
        compared: list[TensorDiff] = []
        for name, ta in tensors_a.items():
            tb = tensors_b.get(name)
            if tb is None:
                continue
            if ta.dtype != tb.dtype or ta.shape != tb.shape:
                changed.append(TensorChange(name, ta.dtype, tb.dtype, ta.shape, tb.shape))
            if ta.shape == tb.shape:
                compared.append(compare(name, ta, tb, atol=atol, rtol=rtol))
        return DiffReport(
            a=str(model_a.path),
            b=str(model_b.path),
            format_a=model_a.format.value,
            format_b=model_b.format.value,
            atol=float(atol),
            rtol=float(rtol),
            only_in_a=only_a,
            only_in_b=only_b,
            changed=tuple(changed),
            tensors=tuple(compared),
            notes=tuple(notes),
        )


def _chosen(
    model: api.ModelFile, weights_only: bool, side: str, notes: list[str]
) -> dict[str, TensorRef]:
    if not weights_only:
        return dict(model.tensors)
    selection = model.weights()
    if selection.note:
        notes.append(f"{side}: {selection.note}")
    return dict(selection.tensors)


# --- names ---------------------------------------------------------------------------------


def _normalise(
    a: dict[str, TensorRef],
    b: dict[str, TensorRef],
    strip_prefix: str | None,
    notes: list[str],
) -> tuple[dict[str, TensorRef], dict[str, TensorRef]]:
    if not strip_prefix:
        return a, b
    if strip_prefix == "auto":
        options_a, options_b = _strip_options(list(a)), _strip_options(list(b))
        best = max(
            ((i, j) for i in range(len(options_a)) for j in range(len(options_b))),
            key=lambda ij: (_common(options_a[ij[0]][1], options_b[ij[1]][1]), ij[0] + ij[1]),
        )
        result = []
        for side, tensors, options, index in (
            ("A", a, options_a, best[0]),
            ("B", b, options_b, best[1]),
        ):
            removed, names = options[index]
            if removed:
                notes.append(f"{side}: stripped the prefix {removed!r} from every name")
            result.append(dict(zip(names, tensors.values(), strict=True)))
        return result[0], result[1]
    return (
        _strip_given(a, strip_prefix, "A", notes),
        _strip_given(b, strip_prefix, "B", notes),
    )


def _strip_options(names: list[str]) -> list[tuple[str, list[str]]]:
    """The names as they are, then without the wrapper prefix they all carry, if any."""
    wrapper = trees.wrapper_prefix(names)
    options = [("", names)]
    if wrapper:
        options.append((wrapper, [n[len(wrapper) :] for n in names]))
    return options


def _common(x: list[str], y: list[str]) -> int:
    return len(set(x) & set(y))


def _strip_given(
    tensors: dict[str, TensorRef], prefix: str, side: str, notes: list[str]
) -> dict[str, TensorRef]:
    result: dict[str, TensorRef] = {}
    stripped = 0
    for name, ref in tensors.items():
        short = name[len(prefix) :] if name.startswith(prefix) and name != prefix else name
        if short != name and (short in tensors or short in result):
            notes.append(f"{side}: kept {name!r}: without {prefix!r} it collides with {short!r}")
            short = name
        stripped += short != name
        result[short] = ref
    if stripped:
        notes.append(f"{side}: stripped {prefix!r} from {stripped} names")
    return result


# --- values --------------------------------------------------------------------------------


def _numeric(tensor: TensorRef) -> bool:
    info = dtypes.dtype(tensor.dtype)
    return (
        info.numpy is not None
        and info.block is None
        and not tensor.dtype.startswith(("q", "float4"))
        and tensor.storage is not None
    )


def compare(name: str, ta: TensorRef, tb: TensorRef, *, atol: float, rtol: float) -> TensorDiff:
    """Statistics of two tensors of equal shape, streamed side by side in float64."""
    same_dtype = ta.dtype == tb.dtype
    if ta.numel == 0:
        return TensorDiff(name, ta.dtype, tb.dtype, ta.shape, same_dtype, True, 0, 0.0, 0.0, 1.0)
    if not (_numeric(ta) and _numeric(tb)):
        return _compare_bytes(name, ta, tb)
    stats = _Stats(atol, rtol, complex_values=_is_complex(ta) or _is_complex(tb))
    bit_equal = same_dtype
    for ca, cb in paired_chunks(ta, tb, DIFF_CHUNK):
        if bit_equal and np.array_equal(_bytes(ca), _bytes(cb)):
            stats.add_equal(ca)
            continue
        bit_equal = False
        stats.add(ca, cb)
    return TensorDiff(
        name,
        ta.dtype,
        tb.dtype,
        ta.shape,
        bit_equal,
        stats.mismatched == 0,
        stats.mismatched,
        stats.max_abs,
        stats.max_rel,
        stats.cosine(),
    )


def _compare_bytes(name: str, ta: TensorRef, tb: TensorRef) -> TensorDiff:
    """Quantized blocks and data-less tensors: equal bytes or not, nothing more."""
    if ta.storage is None or tb.storage is None:
        equal = ta.storage is None and tb.storage is None and ta.dtype == tb.dtype
        note = "saved without data (meta tensor)"
    else:
        equal = ta.dtype == tb.dtype and all(
            np.array_equal(_bytes(x), _bytes(y)) for x, y in paired_chunks(ta, tb, DIFF_CHUNK)
        )
        note = "quantized: compared by bytes only"
    return TensorDiff(
        name,
        ta.dtype,
        tb.dtype,
        ta.shape,
        equal,
        equal,
        0 if equal else ta.numel,
        None,
        None,
        None,
        note,
    )


def _is_complex(tensor: TensorRef) -> bool:
    return tensor.dtype.startswith("complex")


def _bytes(chunk: NDArray) -> NDArray:
    return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)


class _Stats:
    """Running maxima, mismatch count, dot product and norms over paired chunks."""

    def __init__(self, atol: float, rtol: float, *, complex_values: bool) -> None:
        self.atol = atol
        self.rtol = rtol
        self.kind = np.complex128 if complex_values else np.float64
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.mismatched = 0
        self.dot = 0.0
        self.norm_a = 0.0
        self.norm_b = 0.0

    def add_equal(self, chunk: NDArray) -> None:
        """A chunk identical on both sides: no difference, only the norms move."""
        values = chunk.astype(self.kind)
        with np.errstate(all="ignore"):
            square = float(np.vdot(values, values).real)
        self.dot += square
        self.norm_a += square
        self.norm_b += square

    def add(self, chunk_a: NDArray, chunk_b: NDArray) -> None:
        a = chunk_a.astype(self.kind)
        b = chunk_b.astype(self.kind)
        with np.errstate(all="ignore"):
            equal = (a == b) | (np.isnan(a) & np.isnan(b))
            delta = np.abs(a - b)
            delta[equal] = 0.0
            delta[np.isnan(delta)] = math.inf
            magnitude = np.abs(b)
            relative = np.where(delta > 0, math.inf, 0.0)
            np.divide(delta, magnitude, out=relative, where=magnitude > 0)
            relative[np.isnan(relative)] = math.inf
            within = equal | (np.isfinite(delta) & (delta <= self.atol + self.rtol * magnitude))
            self.dot += float(np.vdot(a, b).real)
            self.norm_a += float(np.vdot(a, a).real)
            self.norm_b += float(np.vdot(b, b).real)
        self.max_abs = max(self.max_abs, float(delta.max()))
        self.max_rel = max(self.max_rel, float(relative.max()))
        self.mismatched += int(within.size - np.count_nonzero(within))

    def cosine(self) -> float:
        if self.norm_a == 0 and self.norm_b == 0:
            return 1.0
        if self.norm_a == 0 or self.norm_b == 0:
            return 0.0
        value = self.dot / (math.sqrt(self.norm_a) * math.sqrt(self.norm_b))
        return value if math.isnan(value) else min(1.0, max(-1.0, value))
