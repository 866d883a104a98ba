"""How example inputs reach ``forward``: by position while they fill its arguments in order,
then by keyword.

``bind`` decides once; ``export`` and its exporters, the eager reference, the runtime that
checks the exported file and ``rebuild`` all call the model that one way (a ``Call``):

- inputs that ``forward`` does not name go first, by position, in the order given: a
  sequence's, or a name ``forward`` lacks (``{"images": x}`` for ``forward(x)``);
- named arguments follow by position while each is the next one ``forward`` declares;
- from the first argument left out on, the rest go by keyword (in ``forward``'s order), so
  ``input_ids`` and ``attention_mask`` feed GPT-2's
  ``forward(input_ids, past_key_values, cache_position, attention_mask, ...)`` as
  ``model(input_ids, attention_mask=...)``. A name ``forward`` lacks never goes by keyword,
  not even to ``**kwargs`` (where ``torch.export`` cannot make axes dynamic).

Inputs that fill the arguments in order are passed by position exactly as before, and a
``.pt2`` exported from them is still called ``program(x)``: ``torch.export`` fixes which
inputs its module takes by keyword. So compiled models keep the convention they were
compiled with: a TorchScript model and a module from ``torch.export.load`` take the inputs
they were compiled with by position as positional-only arguments (``forward_signature``),
and leaving one of those out is an error.

The exporters take the call as it is: ``torch.export`` and the dynamo ONNX exporter as
``args`` + ``kwargs`` (dynamic shapes keyed by argument name, ``Call.arrange``), ONNX inputs
named after the inputs; ``torch.jit.trace`` takes ``example_inputs`` or
``example_kwarg_inputs``, not both, so a mixed call is traced all by keyword (the traced
module takes either); the legacy ONNX exporter gets a wrapper that takes the same inputs by
position (given keywords, it would add ``forward``'s other defaults as graph inputs).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelport.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

_P = inspect.Parameter
_SLOTS = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)  # parameters a position can fill
_NAMED = (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)  # parameters a keyword can fill


@dataclass(frozen=True)
class Call:
    """How inputs are passed to ``forward``: the first ``positional`` by position, the rest
    by keyword under their names."""

    names: tuple[str, ...]
    positional: int
    signature: inspect.Signature | None = field(default=None, compare=False, repr=False)

    @property
    def keywords(self) -> tuple[str, ...]:
        return self.names[self.positional :]

    def split(self, values: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``values`` (one per input, in ``names`` order) as ``(args, kwargs)``."""
        rest = values[self.positional :]
        return tuple(values[: self.positional]), dict(zip(self.keywords, rest, strict=True))

    def __call__(self, model: Callable[..., Any], values: Sequence[Any]) -> Any:
        args, kwargs = self.split(values)
        return model(*args, **kwargs)

    def arrange(self, values: Sequence[Any]) -> tuple[Any, ...] | dict[str, Any]:
        """``values`` (e.g. dynamic-shape specs) shaped as ``torch.export`` matches them
        against the call: a tuple when every input goes by position, else a dict keyed by
        ``forward``'s argument names (torch binds the call to the signature the same way)."""
        args, kwargs = self.split(values)
        if not kwargs or self.signature is None:
            return args
        return dict(self.signature.bind(*args, **kwargs).arguments)

    def by_name(self, values: Sequence[Any]) -> dict[str, Any] | None:
        """``values`` all keyed by argument name, when every input is named after an
        argument ``forward`` takes by keyword (else None)."""
        if self.signature is None:
            return None
        parameters = self.signature.parameters
        if any(n not in parameters or parameters[n].kind not in _NAMED for n in self.names):
            return None
        return dict(zip(self.names, values, strict=True))


def bind(
    model: nn.Module, example: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
) -> tuple[Call, list[torch.Tensor]]:
    """The ``Call`` for ``example`` (a mapping names its inputs; a sequence is positional,
    named ``input0``, ``input1``, ...) and the tensors in the call's order."""
    import torch

    pairs: list[tuple[str, torch.Tensor]]
    if isinstance(example, Mapping):
        pairs = list(example.items())
    else:
        pairs = [(f"input{i}", t) for i, t in enumerate(example)]
    if not pairs:
        raise UsageError("export needs at least one example input")
    for name, tensor in pairs:
        if not isinstance(tensor, torch.Tensor):
            raise UsageError(f"example input {name!r} is not a torch.Tensor")
    signature = forward_signature(model)
    if signature is None:  # nothing to bind against: by position, as given
        return Call(tuple(n for n, _ in pairs), len(pairs)), [t for _, t in pairs]
    parameters = signature.parameters
    by_name = isinstance(example, Mapping)
    anonymous = {n for n, _ in pairs if not by_name or n not in parameters}
    unnamed = [(n, t) for n, t in pairs if n in anonymous]
    named = {n: t for n, t in pairs if n not in anonymous}
    slots = [p.name for p in parameters.values() if p.kind in _SLOTS]
    positional = list(unnamed)
    for name in slots[len(unnamed) :]:
        if name not in named:
            break
        positional.append((name, named.pop(name)))
    order = list(parameters)
    keyword = sorted(named.items(), key=lambda pair: order.index(pair[0]))
    described = describe(signature)
    stuck = [n for n, _ in keyword if n in parameters and parameters[n].kind is _P.POSITIONAL_ONLY]
    gaps = [n for n in slots[: slots.index(stuck[0])] if n not in dict(pairs)] if stuck else []
    if gaps:
        raise UsageError(
            f"{stuck[0]} comes after {', '.join(gaps)} in {described}, and this model takes it "
            f"by position only: give {', '.join(gaps)} as well"
        )
    try:
        signature.bind(*range(len(positional)), **{n: None for n, _ in keyword})
    except TypeError as exc:
        raise UsageError(
            f"example inputs {', '.join(n for n, _ in pairs)} do not fit {described}: {exc}"
        ) from exc
    ordered = positional + keyword
    call = Call(tuple(n for n, _ in ordered), len(positional), signature)
    return call, [t for _, t in ordered]


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """``forward``'s signature as the model can be called, or None when it cannot be read.

    A TorchScript model's comes from its compiled schema, every argument positional-only
    (torch's TorchScript converters take no keywords); a module from ``torch.export.load``
    takes exactly the call it was exported with: the inputs it took by position as
    positional-only arguments, the others keyword-only."""
    schema = getattr(getattr(model, "forward", None), "schema", None)
    if schema is not None:  # TorchScript: self first
        return inspect.Signature(
            [
                _P(a.name, _P.POSITIONAL_ONLY, default=None if a.has_default_value() else _P.empty)
                for a in schema.arguments[1:]
                if not a.kwarg_only
            ],
            __validate_parameters__=False,
        )
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    spec = getattr(model, "_in_spec", None)  # torch.export's module: (args, kwargs) as exported
    if spec is None:
        return signature
    exported = spec.children_specs[0].num_children
    parameters = [
        p.replace(kind=_P.POSITIONAL_ONLY if i < exported else _P.KEYWORD_ONLY)
        for i, p in enumerate(signature.parameters.values())
    ]
    return inspect.Signature(parameters, __validate_parameters__=False)


def describe(signature: inspect.Signature) -> str:
    """``forward(x, mask, *args, **kwargs)``: the argument names only."""
    stars: dict[object, str] = {_P.VAR_POSITIONAL: "*", _P.VAR_KEYWORD: "**"}
    names = [stars.get(p.kind, "") + p.name for p in signature.parameters.values()]
    return f"forward({', '.join(names)})"
