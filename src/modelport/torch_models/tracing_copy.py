"""The module an exporter traces: a copy of the model, made before anything runs or traces it.

A model may keep Python state that ``forward`` changes: ultralytics' ``Detect`` head caches
its anchors and the input shape it made them for (``if self.shape != shape:
self.anchors = make_anchors(...); self.shape = shape``). A tracer runs that code on symbolic
or fake tensors, so after an export such a module holds fake anchors and a symbolic shape,
and calling it eagerly fails (``GuardOnDataDependentSymNode``) or answers with values from
the trace. Each exporter therefore traces a copy; the eager reference runs on the model
itself, which no tracer touches, and the caller's module still works after the export.

The copy shares the parameters and buffers (the weights are never duplicated: a model that
fits in memory once must still export); every module object, attribute, list and dict is
its own, so what a tracer assigns lands on the copy. A TorchScript module holds no Python
state to change and is traced as it is, as is a model ``copy.deepcopy`` refuses (a lock, an
open file among its attributes), with a note in the report.
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def tracing_copy(model: nn.Module, notes: list[str]) -> nn.Module:
    """A copy of ``model`` for an exporter to trace, sharing its weights (see the module
    docstring); ``model`` itself when it cannot be copied, said in ``notes``."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        return model
    weights = itertools.chain(model.parameters(), model.buffers())
    shared: dict[int, Any] = {id(tensor): tensor for tensor in weights}
    try:
        copied: nn.Module = copy.deepcopy(model, shared)
    except Exception as exc:  # any attribute's own __deepcopy__ may refuse
        notes.append(
            f"the model could not be copied for tracing ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:120]}): the eager reference ran on the module "
            "the exporter traced, which is wrong for a forward that caches values"
        )
        return model
    return copied
