"""Example inputs from a file (``--example-inputs``), matched to ``forward``'s arguments.

The file is any tensor file modelport reads, recognised by content (npz, a ``torch.save``
dict, safetensors, ...) and read through ``modelport.load``: the scanner's gate, then the
restricted reader, so nothing stored in it runs. The tensors come back as the mapping
``modelport.export`` takes, ordered as ``forward`` declares its arguments:

- each tensor's name is an argument of ``forward``; a file with one tensor for a ``forward``
  with one argument (or one required argument) may name it anything;
- names ``0``, ``1``, ... (``torch.save((x, y))``) or ``arr_0``, ``arr_1``, ...
  (``numpy.savez(f, x, y)``) are positions;
- every required argument must be there; the others may be left out anywhere: export
  passes the inputs after a gap by keyword (``input_ids`` and ``attention_mask`` for GPT-2,
  skipping ``past_key_values``; see ``modelport.binding``);
- anything else is a ``ConversionError`` that names the arguments ``forward`` expects.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.errors import ConversionError, UsageError
from modelport.loading.model_file import load
from modelport.torch_models.binding import forward_signature

if TYPE_CHECKING:
    import torch
    from torch import nn

_P = inspect.Parameter

_POSITION = re.compile(r"(?:arr_)?(\d+)")  # torch.save((x, y)) -> "0", "1"; np.savez -> "arr_0"


@dataclass(frozen=True)
class Argument:
    """One argument of ``forward``."""

    name: str
    required: bool
    keyword_only: bool = False  # no position feeds it (after ``*`` in the signature)


def read_example_inputs(
    path: str | Path, model: nn.Module | None = None, *, allow_unsafe: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors in ``path``, keyed and ordered as ``model.forward``'s arguments (in the
    file's order when ``model`` is None or its signature cannot be read)."""
    loaded = load(path, allow_unsafe=allow_unsafe)
    tensors = {name: tensor.clone() for name, tensor in loaded.items()}  # let go of the file
    if not tensors:
        raise ConversionError(f"{path}: holds no tensors to use as example inputs")
    arguments = forward_arguments(model) if model is not None else None
    return match_arguments(tensors, arguments, str(path))


def forward_arguments(model: nn.Module) -> list[Argument] | None:
    """``forward``'s tensor-passing arguments (no ``*args``/``**kwargs``), or None when the
    signature cannot be read (a TorchScript model's from its compiled schema)."""
    signature = forward_signature(model)
    if signature is None:
        return None
    kinds = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)
    return [
        Argument(p.name, p.default is _P.empty, p.kind is _P.KEYWORD_ONLY)
        for p in signature.parameters.values()
        if p.kind in kinds
    ]


def match_arguments(
    tensors: dict[str, Any], arguments: list[Argument] | None, where: str
) -> dict[str, Any]:
    """``tensors`` renamed and ordered for ``forward`` (see the module docstring)."""
    if arguments is None:
        return dict(tensors)
    names = [a.name for a in arguments]
    expected = f"forward({', '.join(names)})"
    positions = _positions(list(tensors))
    if positions is not None:
        slots = [a.name for a in arguments if not a.keyword_only]
        if len(tensors) > len(slots):
            raise UsageError(
                f"{where}: {len(tensors)} positional inputs, but {expected} takes {len(slots)}"
            )
        ordered = [tensors[key] for key in positions]
        return dict(zip(slots, ordered, strict=False))
    required = [a.name for a in arguments if a.required]
    only = next(iter(tensors)) if len(tensors) == 1 else None
    if only is not None and only not in names and (len(names) == 1 or len(required) == 1):
        return {(required or names)[0]: tensors[only]}
    unknown = [n for n in tensors if n not in names]
    if unknown:
        raise UsageError(
            f"{where}: {', '.join(map(repr, unknown))} "
            f"{'is not an argument' if len(unknown) == 1 else 'are not arguments'} of "
            f"{expected}; name each tensor after the argument it feeds"
        )
    missing = [n for n in required if n not in tensors]
    if missing:
        raise UsageError(f"{where}: no tensor for {', '.join(missing)}, required by {expected}")
    return {n: tensors[n] for n in names if n in tensors}


def _positions(keys: list[str]) -> list[str] | None:
    """The keys in position order when they are exactly 0..n-1 (or arr_0..arr_n-1)."""
    found: dict[int, str] = {}
    for key in keys:
        match = _POSITION.fullmatch(key)
        if match is None:
            return None
        found[int(match.group(1))] = key
    if sorted(found) != list(range(len(keys))):
        return None
    return [found[i] for i in range(len(keys))]
