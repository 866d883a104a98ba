"""``modelport.check``: will these weights load into this model, and if not, why?

The weights are read by content through ``modelport.open`` (after the scanner's gate):
names, shapes and dtypes only, no tensor data. The model side is a mapping
``name -> (shape, dtype)``, or an ``nn.Module`` whose ``state_dict`` gives it, or a spec
resolved by ``models.build_model``: ``pkg.module:Name`` (user code the user names, imported and
called with ``--init`` JSON) or a Hugging Face directory holding ``config.json``
(instantiated on the meta device from the config alone; nothing is downloaded).

The answer is the one ``model.load_state_dict(weights, strict=True)`` would give: missing
keys, unexpected keys and shape mismatches (dtypes are cast on load, so they never block
it). Each likely cause is named with what to do about it:

- a prefix shift (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``, ``model.``
  from Lightning, or any prefix on one side only): the exact ``modelport convert``
  command, and ``fix=`` writes the renamed weights;
- a 2-D weight stored transposed (GPT-2's ``Conv1D`` keeps ``[in, out]``, ``nn.Linear``
  wants ``[out, in]``);
- a different vocabulary or class count (only the first dimension of an embedding or a
  head differs);
- tied weights stored once (the model ties the missing name to one the file holds, or the
  names are a usual tie pair such as ``lm_head.weight`` / ``wte.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.conversion.converting import convert
from modelport.conversion.options import ConvertOptions
from modelport.errors import ConversionError
from modelport.loading.model_file import check_safety
from modelport.loading.model_file import open as open_model
from modelport.torch_models.building import build_model, resolve_model
from modelport.tree import names as trees

if TYPE_CHECKING:
    from torch import nn

Shape = tuple[int, ...]
Keys = dict[str, tuple[Shape, str]]

HEAD = re.compile(
    r"(^|\.)(fc|head|heads|classifier|lm_head|logits|score|predictions|cls|output|out)"
    r"(\.\d+)?\.(weight|bias)$"
)
EMBEDDING = re.compile(
    r"(^|\.)(wte|embed_tokens|word_embeddings|embed_in|tok_embeddings|shared|embed|"
    r"embedding|embeddings|token_embedding)\.weight$"
)
LM_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.(weight|bias)$")  # rows are the vocabulary
TIE_HEAD = re.compile(r"(^|\.)(lm_head|head|decoder|output|embed_out)\.weight$")
SHOWN = 8  # keys listed per group in the human output


@dataclass(frozen=True)
class Suggestion:
    cause: str
    command: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"cause": self.cause, "command": self.command}


@dataclass(frozen=True)
class CheckReport:
    weights: str
    ok: bool
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, Shape, Shape], ...]  # name, expected shape, got shape
    suggestions: tuple[Suggestion, ...] = ()
    notes: tuple[str, ...] = ()
    fixed: str | None = None  # where fix= wrote renamed weights
    fixed_ok: bool | None = None  # whether those load strictly

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "ok": self.ok,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [
                {"name": n, "expected": list(e), "got": list(g)} for n, e, g in self.mismatched
            ],
            "suggestions": [s.to_json() for s in self.suggestions],
            "notes": list(self.notes),
            "fixed": self.fixed,
            "fixed_ok": self.fixed_ok,
        }

    def lines(self) -> list[str]:
        """The human answer: verdict, keys grouped by module, causes and commands."""
        if self.ok:
            out = [f"fits: every key of {self.weights} loads into the model (strict)"]
        else:
            out = [
                f"does not fit: {len(self.missing)} missing, {len(self.unexpected)} "
                f"unexpected, {len(self.mismatched)} with another shape"
            ]
        for title, names in (
            ("missing (in the model, not in the file)", self.missing),
            ("unexpected (in the file, not in the model)", self.unexpected),
        ):
            if names:
                out.append(f"{title}:")
                for prefix, leaves in group_by_prefix(names).items():
                    shown = ", ".join(leaves[:SHOWN])
                    more = f" (+{len(leaves) - SHOWN} more)" if len(leaves) > SHOWN else ""
                    out.append(f"  {prefix or '(top level)'}: {shown}{more}")
        if self.mismatched:
            out.append("shape mismatches (model expects, file has):")
            out.extend(f"  {n}: {list(e)} vs {list(g)}" for n, e, g in self.mismatched)
        for suggestion in self.suggestions:
            out.append(f"likely cause: {suggestion.cause}")
            if suggestion.command:
                out.append(f"  fix: {suggestion.command}")
        out.extend(f"note: {note}" for note in self.notes)
        if self.fixed is not None:
            verdict = "and it fits" if self.fixed_ok else "but it still does not fit"
            out.append(f"wrote {self.fixed} {verdict}")
        return out


def group_by_prefix(names: Iterable[str], depth: int = 2) -> dict[str, list[str]]:
    """``layer1.0.conv1.weight`` -> ``{"layer1.0": ["conv1.weight"]}`` (module path, ``depth``
    components at most, always leaving the parameter's own name)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        cut = min(depth, len(parts) - 1)
        groups.setdefault(".".join(parts[:cut]), []).append(".".join(parts[cut:]))
    return groups


# -- the model side ----------------------------------------------------------------------------
def model_keys(model: nn.Module) -> Keys:
    """What ``load_state_dict`` expects: each state_dict name, its shape and dtype."""
    return {
        name: (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for name, tensor in model.state_dict().items()
    }


def model_ties(model: nn.Module) -> list[list[str]]:
    """Groups of state_dict names the model ties to one parameter (or buffer)."""
    groups: dict[int, list[str]] = {}
    for name, value in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(value), []).append(name)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        groups.setdefault(id(buffer), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


# -- the check ---------------------------------------------------------------------------------
def check(
    weights_path: str | Path,
    model: Keys | nn.Module | str,
    *,
    init: str | Mapping[str, Any] | list[Any] | None = None,
    fix: str | Path | None = None,
    allow_unsafe: bool = False,
    trust_code: bool = False,
) -> CheckReport:
    """Compare the weights in ``weights_path`` with what ``model`` expects; with ``fix``,
    write the weights renamed (a detected prefix shift) to ``fix`` and check those too.
    ``trust_code`` lets ``model`` name a whole-model pickle (see ``models.build_model``)."""
    if isinstance(model, str):
        model = build_model(
            model, init, meta=True, trust_code=trust_code, allow_unsafe=allow_unsafe
        )
    ties: list[list[str]] = []
    if isinstance(model, dict):
        expected: Keys = dict(model)
    else:
        expected = model_keys(model)
        ties = model_ties(model)
    path = Path(weights_path)
    check_safety(path, allow_unsafe=allow_unsafe)
    with open_model(path) as opened:
        selection = opened.weights()
        got = {n: (tuple(t.shape), t.dtype) for n, t in selection.tensors.items()}
        file_ties = trees.aliases(selection.tensors)
    report = _compare(str(path), expected, got, ties, file_ties)
    if fix is None:
        return report
    prefix = _prefix_fix(expected, got)
    if prefix is None:
        notes = (*report.notes, "--fix: nothing modelport can rename; no file written")
        return _replace(report, notes=notes)
    strip, add = prefix
    convert(
        path, fix, ConvertOptions(strip_prefix=strip, add_prefix=add, allow_unsafe=allow_unsafe)
    )
    again = check(fix, expected, allow_unsafe=True)  # our own output, just written
    return _replace(report, fixed=str(fix), fixed_ok=again.ok)


def resolve_fitting(
    spec: str | Path,
    *,
    init: str | Mapping[str, Any] | list[Any] | None = None,
    weights: str | Path | None = None,
    allow_unsafe: bool = False,
    trust_code: bool = False,
) -> nn.Module:
    """``building.resolve_model``, except that ``weights`` that do not fit the model are
    refused with ``check``'s answer (keys grouped by module, the likely cause and the
    command that fixes it): ``load_state_dict``'s own message lists every key, which for a
    real model is kilobytes, and names no cause."""

    def refuse_misfit(model: nn.Module, named: str | Path) -> None:
        fit = check(named, model, allow_unsafe=allow_unsafe)
        if not fit.ok:
            lines = [f"{named}: the weights do not fit the model", *fit.lines()]
            raise ConversionError("\n".join(lines))

    return resolve_model(
        spec,
        init=init,
        weights=weights,
        allow_unsafe=allow_unsafe,
        trust_code=trust_code,
        before_weights=refuse_misfit,
    )


def _replace(report: CheckReport, **changes: Any) -> CheckReport:
    return replace(report, **changes)


def _compare(
    weights: str, expected: Keys, got: Keys, ties: list[list[str]], file_ties: list[list[str]]
) -> CheckReport:
    missing = [n for n in expected if n not in got]
    unexpected = [n for n in got if n not in expected]
    mismatched = [
        (n, expected[n][0], got[n][0]) for n in expected if n in got and expected[n][0] != got[n][0]
    ]
    suggestions: list[Suggestion] = []
    notes: list[str] = []
    prefix = _prefix_fix(expected, got)
    origin = {n: n for n in got}  # the name a cause sees -> the name in the file
    if prefix is not None:
        suggestions.append(_prefix_suggestion(weights, prefix, expected, got))
        strip, add = prefix
        origin = {(add or "") + n.removeprefix(strip or ""): n for n in got}
    view = {n: got[origin[n]] for n in origin}  # the file's keys once the prefix is fixed
    shifted = [
        (n, expected[n][0], view[n][0])
        for n in expected
        if n in view and expected[n][0] != view[n][0]
    ]
    suggestions.extend(_shape_causes(weights, shifted, origin))
    left = [n for n in expected if n not in view]
    suggestions.extend(_tie_causes(left, expected, view, ties))
    for group in file_ties:
        notes.append(f"the file stores {' and '.join(group)} once (tied; both names load)")
    dtypes = sorted(
        {(expected[n][1], got[n][1]) for n in expected if n in got and expected[n][1] != got[n][1]}
    )
    for want, have in dtypes:
        notes.append(f"the file holds {have} where the model has {want} (cast on load)")
    ok = not (missing or unexpected or mismatched)
    return CheckReport(
        weights,
        ok,
        tuple(missing),
        tuple(unexpected),
        tuple(mismatched),
        tuple(suggestions),
        tuple(notes),
    )


# -- causes ------------------------------------------------------------------------------------
def _prefix_fix(expected: Keys, got: Keys) -> tuple[str | None, str | None] | None:
    """``(strip, add)``: the one prefix whose removal from (or addition to) the file's names
    leaves fewer keys unmatched; None when no prefix helps."""
    missing = {n for n in expected if n not in got}
    unexpected = {n for n in got if n not in expected}
    if not missing or not unexpected:
        return None
    before = len(missing) + len(unexpected)
    best: tuple[int, tuple[str | None, str | None]] | None = None
    for strip in _candidates(unexpected, missing):
        renamed = {n.removeprefix(strip) for n in got}
        if len(renamed) < len(got):
            continue  # stripping would merge two names
        after = len(renamed ^ set(expected))
        if after < before and (best is None or after < best[0]):
            best = (after, (strip, None))
    for add in _candidates(missing, unexpected):
        after = len({add + n for n in got} ^ set(expected))
        if after < before and (best is None or after < best[0]):
            best = (after, (None, add))
    return None if best is None else best[1]


def _candidates(longer: set[str], shorter: set[str]) -> list[str]:
    """Prefixes ``p`` (ending with a dot) with ``p + s`` in ``longer`` for some ``s`` in
    ``shorter``, most frequent first."""
    counts: dict[str, int] = {}
    for name in longer:
        for i, char in enumerate(name):
            if char == "." and name[i + 1 :] in shorter:
                counts[name[: i + 1]] = counts.get(name[: i + 1], 0) + 1
    return sorted(counts, key=lambda p: (-counts[p], p))[:5]


def _prefix_suggestion(
    weights: str, prefix: tuple[str | None, str | None], expected: Keys, got: Keys
) -> Suggestion:
    strip, add = prefix
    if strip is not None:
        flag = "auto" if trees.wrapper_prefix(got) == strip else strip
        wrapper = trees.WRAPPER_PREFIXES.get(strip)
        cause = (
            f"prefix shift: the file's keys carry {strip!r}"
            f"{f' ({wrapper})' if wrapper else ''}, the model's do not"
        )
        command = f"modelport convert {weights} OUT --strip-prefix {flag}"
    else:
        cause = f"prefix shift: the model's keys start with {add!r}, the file's do not"
        command = f"modelport convert {weights} OUT --add-prefix {add}"
    return Suggestion(cause, command)


def _shape_causes(
    weights: str, mismatched: list[tuple[str, Shape, Shape]], origin: dict[str, str]
) -> list[Suggestion]:
    causes: list[Suggestion] = []
    transposed = [n for n, e, g in mismatched if len(e) == 2 and e != g and e == g[::-1]]
    if transposed:
        listed = ", ".join(transposed[:4]) + (" ..." if len(transposed) > 4 else "")
        causes.append(
            Suggestion(
                f"{len(transposed)} 2-D weights stored transposed ({listed}): a Conv1D layer "
                "(GPT-2 style, [in, out]) on one side and nn.Linear ([out, in]) on the other; "
                "transpose them (weight.t()) when loading"
            )
        )
    seen: set[tuple[str, int, int]] = set()
    for name, want, have in mismatched:
        if len(want) != len(have) or not want or want[0] == have[0] or want[1:] != have[1:]:
            continue
        if EMBEDDING.search(name) or LM_HEAD.search(name):
            kind = "vocabulary"
            what = "tokens"
        elif HEAD.search(name):
            kind = "class count"
            what = "classes"
        else:
            continue
        if (kind, want[0], have[0]) in seen:
            continue
        seen.add((kind, want[0], have[0]))
        module = origin[name].rsplit(".", 1)[0]  # --exclude sees the file's names
        command = (
            f"modelport convert {weights} OUT --exclude '{module}.*'  "
            "(then load with strict=False and train the new head)"
            if kind == "class count"
            else None
        )
        causes.append(
            Suggestion(
                f"different {kind}: the checkpoint has {have[0]} {what}, the model {want[0]} "
                f"({name}); build the model with {have[0]} {what} to use this checkpoint as is",
                command,
            )
        )
    return causes


def _tie_causes(
    missing: list[str], expected: Keys, got: Keys, ties: list[list[str]]
) -> list[Suggestion]:
    causes: list[Suggestion] = []
    for name in missing:
        partner = next(
            (
                other
                for group in ties
                if name in group
                for other in group
                if other != name and other in got and got[other][0] == expected[name][0]
            ),
            None,
        )
        if partner is None:
            partner = next(
                (
                    other
                    for other, (shape, _) in got.items()
                    if shape == expected[name][0]
                    and (
                        (TIE_HEAD.search(name) and EMBEDDING.search(other))
                        or (EMBEDDING.search(name) and TIE_HEAD.search(other))
                    )
                ),
                None,
            )
        if partner is None:
            continue
        tied = any(name in group and partner in group for group in ties)
        how = "the model ties them" if tied else "a usual tie pair"
        causes.append(
            Suggestion(
                f"tied weights stored once: {name} is missing but {partner} has its shape "
                f"{list(expected[name][0])} ({how}); the model re-ties them (from_pretrained, "
                "or load_state_dict(strict=False) then tie_weights()), so this key may be "
                "left missing",
            )
        )
    return causes
