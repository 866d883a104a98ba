"""Which tensors of a file are "the model weights": one rule for ``load``, ``convert`` and
``inspect``'s parameter count, that knows how the common tools lay checkpoints out and
always says what it took and what it left out.

- A pickled ``nn.Module``: its state_dict.
- A checkpoint dict: the first of ``WEIGHT_KEYS`` that holds tensors (Lightning and most
  training loops: ``state_dict``; plain loops: ``model_state_dict``, ``model``).
- ultralytics keeps ``model: None`` and the trained model under ``ema`` when it strips a
  checkpoint: with no weights under a weight key, an EMA key's are the weights.
- Stable Diffusion (LDM) ``.ckpt`` keeps EMA copies inside its state_dict as ``model_ema.*``
  (LitEma: each ``model.<name>`` as ``model_ema.<name without dots>``): they are left out;
  with ``ema`` they replace the weights they copy, under the model's names.
- Keras keeps optimizer variables beside the layers' (``optimizer/vars/<i>``): left out.
- With ``ema``, a checkpoint's EMA key (``ema``, ``model_ema``, ...) is taken instead.
- A reader marks groups it lists beside the weights as ``Apart`` (a torch.export program's
  constants and example inputs): they are left out, and the rest is the weights.
Anything else gives every tensor in the file, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, methodcaller
from typing import Any

from modelport.pickles import modules
from modelport.pickles.records import ObjectRecord
from modelport.tensors import TensorRef
from modelport.tree.names import tensors_of, view_key

WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
EMA_KEYS = ("ema", "model_ema", "ema_state_dict", "state_dict_ema", "ema_model")
LDM_EMA_PREFIX = "model_ema."
LDM_MODEL_PREFIX = "model."
KERAS_OPTIMIZER_PREFIX = "optimizer/"
# torch's normalisation layers keep their running statistics as buffers under these names
# (torch/nn/modules/batchnorm.py _NormBase): in a state_dict, never in ``model.parameters()``.
BUFFER_NAMES = frozenset(("running_mean", "running_var", "num_batches_tracked"))
_BUFFER_SUFFIXES = tuple("." + name for name in sorted(BUFFER_NAMES))
_ENDS_LIKE_BUFFER = methodcaller("endswith", _BUFFER_SUFFIXES)
_STORAGE = attrgetter("storage")
# Names that either layout in ``_refined`` may concern.
_MARKED = methodcaller("startswith", (KERAS_OPTIMIZER_PREFIX, LDM_EMA_PREFIX))


class Apart(dict[str, Any]):
    """Tensors a reader lists beside the model weights, never among them; a dict otherwise."""


@dataclass(frozen=True)
class WeightSelection:
    """Which part of a file counts as the model weights, and what was left out."""

    tensors: dict[str, TensorRef]
    source: str  # "" for the whole file, else the key taken (or "module")
    note: str = ""
    left_out: list[str] = field(default_factory=list)


def select_weights(tree: Any, *, ema: bool = False) -> WeightSelection:
    if isinstance(tree, ObjectRecord) and modules.is_module(tree):
        return WeightSelection(
            tensors_of(tree), "module", f"state_dict of a pickled {tree.class_path}"
        )
    if not isinstance(tree, dict):
        return _refined(WeightSelection(tensors_of(tree), ""), ema)
    if any(map(isinstance, tree.values(), repeat(Apart))):
        apart = [str(k) for k, v in tree.items() if isinstance(v, Apart)]
        kept = {k: v for k, v in tree.items() if not isinstance(v, Apart)}
        note = f"left out {', '.join(apart)}: listed beside the model weights, not among them"
        return _refined(WeightSelection(tensors_of(kept), "", note, apart), ema)
    if ema:
        taken = _first_key(tree, EMA_KEYS, "took the EMA weights under '{key}'")
        if taken is not None:
            return taken
    taken = _first_key(tree, WEIGHT_KEYS, "took the weights under '{key}'")
    if taken is None and not ema:
        emptied = [k for k in WEIGHT_KEYS if k in tree and not tensors_of(tree[k])]
        if emptied:
            taken = _first_key(
                tree,
                EMA_KEYS,
                f"'{emptied[0]}' holds no tensors: took the weights under '{{key}}', where "
                "ultralytics keeps the trained model",
            )
    if taken is not None:
        return _refined(taken, ema)
    everything = tensors_of(tree)
    if everything and all(map(isinstance, tree.values(), repeat(TensorRef))):
        return _refined(WeightSelection(everything, ""), ema)
    note = "no state_dict key found: took every tensor in the file" if everything else ""
    return _refined(WeightSelection(everything, "", note), ema)


def parameter_tensors(tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The weights ``sum(p.numel() for p in model.parameters())`` counts: buffers left out by
    their names, and a tensor with several names (tied weights: one storage, offset, shape
    and dtype) counted under its first, as ``parameters()`` yields a shared one once."""
    if BUFFER_NAMES.isdisjoint(tensors) and not any(map(_ENDS_LIKE_BUFFER, tensors)):
        named = dict(tensors)
    else:
        named = {
            name: tensor
            for name, tensor in tensors.items()
            if not name.endswith(_BUFFER_SUFFIXES) and name not in BUFFER_NAMES
        }
    storages = list(map(_STORAGE, named.values()))
    if len(set(storages)) == len(storages):  # no two share one (storages equal by identity)
        return named
    kept: dict[str, TensorRef] = {}
    seen: set[tuple[Any, ...]] = set()
    for name, tensor in named.items():
        place = view_key(tensor)
        if place not in seen:
            seen.add(place)
            kept[name] = tensor
    return kept


def _first_key(tree: dict[Any, Any], keys: tuple[str, ...], note: str) -> WeightSelection | None:
    for key in keys:
        if key in tree and not isinstance(tree[key], TensorRef):  # a tensor named "model"
            chosen = tensors_of(tree[key])
            if chosen:
                others = [str(k) for k in tree if k != key]
                return WeightSelection(chosen, key, note.format(key=key), others)
    return None


def _refined(selection: WeightSelection, ema: bool) -> WeightSelection:
    """Layouts inside the chosen tensors: LDM's EMA copies, Keras' optimizer variables."""
    tensors = selection.tensors
    notes = [selection.note] if selection.note else []
    left_out = list(selection.left_out)
    marked = list(filter(_MARKED, tensors))  # one pass over a million names, in C
    optimizer = [n for n in marked if n.startswith(KERAS_OPTIMIZER_PREFIX)]
    if optimizer and len(optimizer) < len(tensors):
        tensors = {n: t for n, t in tensors.items() if not n.startswith(KERAS_OPTIMIZER_PREFIX)}
        notes.append(f"left out {len(optimizer)} optimizer variables ({KERAS_OPTIMIZER_PREFIX}*)")
        left_out.append(KERAS_OPTIMIZER_PREFIX + "*")
    with_copies = any(n.startswith(LDM_EMA_PREFIX) for n in marked)
    if with_copies and any(n.startswith(LDM_MODEL_PREFIX) for n in tensors):
        tensors, note = _ldm_ema(tensors, ema)
        notes.append(note)
        left_out.append(LDM_EMA_PREFIX + "*")
    elif ema and selection.source not in EMA_KEYS:
        return WeightSelection(
            {}, "", "no EMA weights found (looked for " + ", ".join(EMA_KEYS) + ")"
        )
    return WeightSelection(tensors, selection.source, "; ".join(notes), left_out)


def _ldm_ema(tensors: dict[str, TensorRef], ema: bool) -> tuple[dict[str, TensorRef], str]:
    copies = {
        n.removeprefix(LDM_EMA_PREFIX): t
        for n, t in tensors.items()
        if n.startswith(LDM_EMA_PREFIX)
    }
    kept = {n: t for n, t in tensors.items() if not n.startswith(LDM_EMA_PREFIX)}
    if not ema:
        return kept, (
            f"left out {len(copies)} EMA copies ({LDM_EMA_PREFIX}*); --ema takes them under "
            "the model's names"
        )
    replaced = 0
    for name in list(kept):
        if name.startswith(LDM_MODEL_PREFIX):
            copy = copies.get(name.removeprefix(LDM_MODEL_PREFIX).replace(".", ""))
            if copy is not None and copy.shape == kept[name].shape:
                kept[name] = copy
                replaced += 1
    return kept, (
        f"took the EMA weights ({LDM_EMA_PREFIX}*) for {replaced} of the model's tensors, "
        "under the model's names"
    )
