"""What in a file's values deserves a look, found from the statistics alone (plus one digest
per duplicate candidate).

- ``all-zero`` / ``constant``: a tensor of one value (an initialisation never trained, a
  tensor zeroed by a bad conversion); single elements are exempt;
- ``nan`` / ``inf``: any, counted by ``accumulating``;
- ``float16-overflow`` / ``bfloat16-overflow``: finite values a cast to that type turns
  into Inf;
- ``duplicate``: separate tensors (not names of one tied tensor) with the same dtype,
  shape and bytes. Candidates share their statistics; only they are hashed (sha256, the
  weights digest's per-tensor hash). Tensors under ``DUPLICATE_MIN_ELEMENTS`` elements and
  constant ones are left out: equal biases and scalars are ordinary;
- ``norm-outlier``: a layer whose RMS differs from the median RMS of its neighbourhood
  (itself and up to ``NEIGHBOURS`` layers each side with the same role, e.g.
  ``layers.#.mlp.up.weight``, and the same shape) by more than ``NORM_FACTOR`` times.
  Trained layers drift slowly with depth; a jump that size marks a layer re-initialised,
  rescaled or corrupted. Judged on the model weights only;
- ``mixed-dtypes``: one module (the name up to its last dot) holding floating tensors of
  more than one dtype, which ``module.to(dtype)`` never produces (model weights only).
  Block-quantized GGML types are left out: a quantized weight beside a float bias is how
  GGUF files are made.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Final

from modelport import dtypes
from modelport.measuring.stats_records import Flag, TensorStats
from modelport.tensors import TensorRef
from modelport.transfer.hashing import tensor_digest

KINDS: Final = (
    "nan",
    "inf",
    "all-zero",
    "constant",
    "float16-overflow",
    "bfloat16-overflow",
    "duplicate",
    "norm-outlier",
    "mixed-dtypes",
)
DUPLICATE_MIN_ELEMENTS: Final = 256
NORM_FACTOR: Final = 3.0
NEIGHBOURS: Final = 2
_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")  # the first all-digit part of a dotted name


def find(
    stats: tuple[TensorStats, ...],
    refs: Mapping[str, TensorRef],
    model_names: Collection[str] | None = None,
) -> tuple[Flag, ...]:
    """Every flag over a file's statistics (``refs`` tells tied names from duplicates).
    Layer norms and module dtypes are judged on the model weights only (``model_names``,
    by default every name): a checkpoint's optimizer moments are indexed by parameter, not
    by layer, and are kept in float32 beside any weights."""
    model = stats if model_names is None else tuple(s for s in stats if s.name in model_names)
    found: list[Flag] = []
    for item in stats:
        found.extend(_value_flags(item))
    found.extend(_duplicates(stats, refs))
    found.extend(_norm_outliers(model))
    found.extend(_mixed_dtypes(model))
    return tuple(found)


def attach(stats: tuple[TensorStats, ...], raised: tuple[Flag, ...]) -> tuple[TensorStats, ...]:
    """Each tensor's statistics with the kinds of the flags that name it."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for flag in raised:
        for name in flag.names:
            if flag.kind not in kinds[name]:
                kinds[name].append(flag.kind)
    return tuple(replace(s, flags=tuple(kinds[s.name])) if s.name in kinds else s for s in stats)


def _value_flags(item: TensorStats) -> list[Flag]:
    names = (item.name,)
    found = []
    if item.nan:
        found.append(Flag("nan", names, f"{item.nan:,} NaN of {item.elements:,} values"))
    if item.inf:
        found.append(Flag("inf", names, f"{item.inf:,} Inf of {item.elements:,} values"))
    if item.computed and item.elements > 1 and item.min is not None and item.min == item.max:
        if item.min == 0:
            found.append(Flag("all-zero", names, f"all {item.elements:,} values are zero"))
        elif item.nan + item.inf == 0:
            found.append(Flag("constant", names, f"all {item.elements:,} values are {item.min:g}"))
    for kind, count, limit in (
        ("float16-overflow", item.over_float16, "65504"),
        ("bfloat16-overflow", item.over_bfloat16, "3.39e38"),
    ):
        if count:
            message = f"{count:,} finite values beyond ±{limit} become Inf in {kind[:-9]}"
            found.append(Flag(kind, names, message))
    return found


def _duplicates(stats: tuple[TensorStats, ...], refs: Mapping[str, TensorRef]) -> list[Flag]:
    candidates: dict[tuple[object, ...], list[TensorStats]] = defaultdict(list)
    for item in stats:
        constant = item.min is not None and item.min == item.max
        if item.computed and item.elements >= DUPLICATE_MIN_ELEMENTS and not constant:
            candidates[item.signature()].append(item)
    found = []
    for group in candidates.values():
        if len(group) < 2:
            continue
        by_place: dict[tuple[object, ...], list[str]] = defaultdict(list)
        for item in group:  # names of one tied tensor count once
            by_place[_place(refs[item.name])].append(item.name)
        if len(by_place) < 2:
            continue
        by_digest: dict[str, list[str]] = defaultdict(list)
        for names in by_place.values():
            by_digest[tensor_digest(refs[names[0]])].extend(names)
        for names in by_digest.values():
            if len(names) > 1 and len({_place(refs[n]) for n in names}) > 1:
                message = f"{len(names)} separate copies of the same {group[0].dtype} values"
                found.append(Flag("duplicate", tuple(names), message))
    return found


def _place(ref: TensorRef) -> tuple[object, ...]:
    return (id(ref.storage), ref.element_offset, ref.strides)


def layer_role(name: str) -> tuple[str, int] | None:
    """(role, layer index) of a name with a numeric part: ``h.3.mlp.w`` is (``h.#.mlp.w``, 3)."""
    match = _INDEX.search(name)
    if match is None:
        return None
    start, end = match.span(1)
    return name[:start] + "#" + name[end:], int(match.group(1))


def _norm_outliers(stats: tuple[TensorStats, ...]) -> list[Flag]:
    roles: dict[tuple[str, tuple[int, ...]], list[tuple[int, TensorStats]]] = defaultdict(list)
    for item in stats:  # one role is one name pattern and one shape
        found_role = layer_role(item.name)
        if found_role is not None and item.rms is not None and item.elements > 1:
            roles[(found_role[0], item.shape)].append((found_role[1], item))
    found = []
    for (role, _), members in roles.items():
        if len(members) < 2 * NEIGHBOURS:
            continue
        members.sort(key=lambda pair: pair[0])
        norms = [item.rms or 0.0 for _, item in members]
        for position, (layer, item) in enumerate(members):
            # the layer itself counts in the median, so one outlier cannot drag it and flag
            # the ordinary layers beside it as well
            window = norms[max(0, position - NEIGHBOURS) : position + 1 + NEIGHBOURS]
            reference = statistics.median(window)
            rms = norms[position]
            if reference <= 0 or NORM_FACTOR ** (-1) <= rms / reference <= NORM_FACTOR:
                continue
            message = (
                f"layer {layer} of {role}: RMS {rms:.3g} is {rms / reference:.2g}x the median "
                f"of its neighbourhood ({reference:.3g})"
            )
            found.append(Flag("norm-outlier", (item.name,), message))
    return found


def _mixed_dtypes(stats: tuple[TensorStats, ...]) -> list[Flag]:
    modules: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for item in stats:
        info = dtypes.dtype(item.dtype)
        if info.is_floating and info.block is None and "." in item.name:
            modules[item.name.rpartition(".")[0]][item.dtype].append(item.name)
    found = []
    for module, by_dtype in modules.items():
        if len(by_dtype) > 1:
            listed = ", ".join(f"{d} ({len(n)})" for d, n in sorted(by_dtype.items()))
            names = tuple(n for group in by_dtype.values() for n in group)
            found.append(Flag("mixed-dtypes", names, f"module {module} holds {listed}"))
    return found
