"""What ``modelport.stats`` returns: per-tensor statistics, the flags raised over them, and
their JSON form (the contract of ``report --json`` and of the data inside the HTML report)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Histogram:
    """Counts of values by sign and power of two: bin ``i`` holds the values whose magnitude
    lies in ``[2**(low+i), 2**(low+i+1))``. Zeros, NaN and Inf are counted apart."""

    low: int
    negative: tuple[int, ...]
    positive: tuple[int, ...]

    @property
    def high(self) -> int:
        """The exponent of the last bin."""
        return self.low + len(self.positive) - 1

    def to_json(self) -> dict[str, Any]:
        return {"low": self.low, "negative": list(self.negative), "positive": list(self.positive)}


@dataclass(frozen=True)
class TensorStats:
    """One tensor's values. ``min``/``max``/``mean``/``std``/``rms`` describe its finite
    values (NaN and Inf are counted apart, so one bad element does not hide the rest);
    ``std`` is the population deviation, numpy's default. ``subnormal`` counts non-zero
    values below the smallest normal of the stored dtype; ``over_float16`` and
    ``over_bfloat16`` count finite values beyond the largest finite value of those types
    (what a cast would turn into Inf). ``computed`` is False when the values could not be
    read (``note`` says why); block-quantized tensors are dequantized as they are read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    computed: bool
    note: str = ""
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    rms: float | None = None
    nan: int = 0
    inf: int = 0
    zeros: int = 0
    subnormal: int = 0
    over_float16: int = 0
    over_bfloat16: int = 0
    histogram: Histogram | None = None
    flags: tuple[str, ...] = ()

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    def signature(self) -> tuple[Any, ...]:
        """What two tensors with the same bytes always share (sums rounded, since two
        layouts of the same values may add them in another order)."""
        return (
            self.dtype,
            self.shape,
            self.nan,
            self.inf,
            self.zeros,
            self.min,
            self.max,
            None if self.mean is None else float(f"{self.mean:.9g}"),
            None if self.rms is None else float(f"{self.rms:.9g}"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "computed": self.computed,
            "note": self.note,
            "min": json_float(self.min),
            "max": json_float(self.max),
            "mean": json_float(self.mean),
            "std": json_float(self.std),
            "rms": json_float(self.rms),
            "nan": self.nan,
            "inf": self.inf,
            "zeros": self.zeros,
            "subnormal": self.subnormal,
            "over_float16": self.over_float16,
            "over_bfloat16": self.over_bfloat16,
            "histogram": None if self.histogram is None else self.histogram.to_json(),
            "flags": list(self.flags),
        }


@dataclass(frozen=True)
class Flag:
    """Something about the values that deserves a look: ``kind`` (one of ``flags.KINDS``),
    the tensors it concerns and a sentence that says what was seen."""

    kind: str
    names: tuple[str, ...]
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names), "message": self.message}


@dataclass(frozen=True)
class StatsReport:
    """The statistics of every tensor in a file, in the file's order, and the flags."""

    path: str
    format: str
    tensors: tuple[TensorStats, ...]
    flags: tuple[Flag, ...]
    threads: int
    seconds: float

    def tensor(self, name: str) -> TensorStats:
        """The statistics of the tensor called ``name`` (``KeyError`` when there is none)."""
        for found in self.tensors:
            if found.name == name:
                return found
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "threads": self.threads,
            "seconds": round(self.seconds, 3),
            "flags": [f.to_json() for f in self.flags],
            "tensors": [t.to_json() for t in self.tensors],
        }


def json_float(value: float | None) -> float | str | None:
    """JSON has no Inf or NaN: those become the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if value is None or math.isfinite(value):
        return value
    return str(value)
