"""The arithmetic of tensor statistics: one chunk of values at a time, into running sums that
merge, so a tensor can be read in pieces, by several threads, in any number of chunks.

Values arrive in a *carrier* type, float32 or float64 (narrower floats and small integers are
widened to float32 exactly, wider integers to float64). Each chunk costs one ``bincount`` of
its sign-and-exponent bits and a few reductions:

- the histogram is that bincount: one bin per power of two, per sign, so it is log-spaced,
  exact, and the same bins for every chunk (nothing to agree on before reading);
- NaN and Inf live in the carrier's all-ones exponent bins, zeros and subnormals in its
  zero-exponent bins, values beyond float16's or bfloat16's largest finite value in the top
  few bins: each of those rarer questions is asked of a chunk only when its bins are not
  empty, so a chunk of ordinary weights pays for none of them;
- minimum, maximum, sum and sum of squares are taken over the finite values, the sums in
  float64 (a float32 square is exact in float64). The variance is ``E[x²] - E[x]²``, which
  loses digits only when the mean exceeds the spread by about 10⁸.

``bincount`` holds the GIL; every other step is a numpy loop that releases it. BLAS is left
out on purpose: ``np.dot`` hands a 1 MiB chunk to OpenBLAS's own threads, which fight these
threads for the cores (ten times slower on a busy two-core machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from modelport.tensors import NDArray

FLOAT16_MAX: Final = 65504.0  # numpy.finfo(float16).max
BFLOAT16_MAX: Final = 3.3895313892515355e38  # ml_dtypes.finfo(bfloat16).max, a float32 value


@dataclass(frozen=True)
class Layout:
    """Where a carrier float keeps its sign and exponent."""

    name: str
    unsigned: type[np.unsignedinteger[Any]]
    signed: type[np.signedinteger[Any]]
    mantissa_bits: int
    exponent_bits: int

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def top(self) -> int:
        """The all-ones exponent field: Inf and NaN."""
        return (1 << self.exponent_bits) - 1

    @property
    def fields(self) -> int:
        """Exponent fields per sign: the negative half of the bins starts here."""
        return 1 << self.exponent_bits


FLOAT32: Final = Layout("float32", np.uint32, np.int32, 23, 8)
FLOAT64: Final = Layout("float64", np.uint64, np.int64, 52, 11)
LAYOUTS: Final = {np.dtype(np.float32): FLOAT32, np.dtype(np.float64): FLOAT64}


@dataclass
class Accumulator:
    """Running statistics of the values seen so far, in one carrier layout."""

    layout: Layout
    count: int = 0
    finite: int = 0
    total: float = 0.0
    squares: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    nan: int = 0
    inf: int = 0
    zeros: int = 0
    negative_zeros: int = 0
    over_float16: int = 0
    over_bfloat16: int = 0
    bins: NDArray = field(init=False)  # counts per sign-and-exponent field

    def __post_init__(self) -> None:
        self.bins = np.zeros(2 * self.layout.fields, dtype=np.int64)

    def add(self, values: NDArray) -> None:
        """Take in one chunk: a 1-d array of the carrier dtype."""
        layout = self.layout
        if values.size == 0:
            return
        keys = (values.view(layout.unsigned) >> layout.mantissa_bits).view(layout.signed)
        counts = np.bincount(keys, minlength=self.bins.size)
        self.bins += counts
        self.count += values.size
        finite = values
        special = int(counts[layout.top] + counts[layout.fields + layout.top])
        if special:
            nan = int(np.count_nonzero(np.isnan(values)))
            self.nan += nan
            self.inf += special - nan
            finite = values[np.isfinite(values)]
        if counts[0] or counts[layout.fields]:  # zeros hide among the subnormals
            self.zeros += finite.size - int(np.count_nonzero(finite))
        if counts[layout.fields]:  # -0.0 sits in the negative half of the bins
            self.negative_zeros += int(np.count_nonzero((finite == 0) & np.signbit(finite)))
        self.over_float16 += _beyond(counts, layout, finite, FLOAT16_MAX)
        self.over_bfloat16 += _beyond(counts, layout, finite, BFLOAT16_MAX)
        if finite.size == 0:
            return
        self.finite += finite.size
        self.low = min(self.low, float(finite.min()))
        self.high = max(self.high, float(finite.max()))
        with np.errstate(over="ignore"):
            if finite.dtype == np.float64:
                self.total += float(finite.sum())
                squared = np.multiply(finite, finite)
            else:
                squared = finite.astype(np.float64)  # a copy of our own, squared in place
                self.total += float(squared.sum())
                np.multiply(squared, squared, out=squared)
            self.squares += float(squared.sum())

    def merge(self, other: Accumulator) -> None:
        """Add another piece of the same tensor (read by another thread)."""
        self.count += other.count
        self.finite += other.finite
        self.total += other.total
        self.squares += other.squares
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        self.nan += other.nan
        self.inf += other.inf
        self.zeros += other.zeros
        self.negative_zeros += other.negative_zeros
        self.over_float16 += other.over_float16
        self.over_bfloat16 += other.over_bfloat16
        self.bins += other.bins

    def moments(self) -> tuple[float, float, float] | None:
        """(mean, standard deviation, root mean square) of the finite values; population
        statistics, as numpy's defaults compute them."""
        if self.finite == 0:
            return None
        mean = self.total / self.finite
        mean_square = self.squares / self.finite
        variance = max(0.0, mean_square - mean * mean)
        return mean, math.sqrt(variance), math.sqrt(mean_square)

    def below(self, exponent: int) -> int:
        """Finite non-zero values of magnitude under ``2**exponent`` (a power of two, so the
        bins answer exactly): the subnormals of a type whose smallest normal that is."""
        layout = self.layout
        upto = max(0, min(layout.top, exponent + layout.bias))
        found = int(self.bins[:upto].sum() + self.bins[layout.fields : layout.fields + upto].sum())
        return found - self.zeros

    def histogram(self) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
        """(lowest exponent, negative counts, positive counts) over the exponents that hold
        values: bin ``i`` counts magnitudes in ``[2**(low+i), 2**(low+i+1))``. Zeros, NaN and
        Inf are left out (they are counted apart); the carrier's subnormals share the bin
        just under its smallest normal."""
        layout = self.layout
        positive = self.bins[: layout.top].copy()
        negative = self.bins[layout.fields : layout.fields + layout.top].copy()
        positive[0] -= self.zeros - self.negative_zeros  # zeros sit in field 0 of their sign
        negative[0] -= self.negative_zeros
        used = np.flatnonzero(positive + negative)
        if used.size == 0:
            return None
        first, last = int(used[0]), int(used[-1])
        return (
            first - layout.bias,
            tuple(int(c) for c in negative[first : last + 1]),
            tuple(int(c) for c in positive[first : last + 1]),
        )


def _beyond(counts: NDArray, layout: Layout, finite: NDArray, limit: float) -> int:
    """Finite values of magnitude above ``limit``: zero without a look when no value reaches
    the limit's power of two, an exact count (one pass) when some do."""
    field = math.frexp(limit)[1] - 1 + layout.bias  # the exponent field ``limit`` lies in
    if field >= layout.top:
        return 0
    reaching = counts[field : layout.top].sum() + counts[layout.fields + field : -1].sum()
    if not reaching:
        return 0
    return int(np.count_nonzero(np.abs(finite) > limit))
