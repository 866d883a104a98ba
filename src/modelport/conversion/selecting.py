"""Which tensors a conversion takes and under which names.

By default the model weights (the rule ``modelport.load`` uses), or a subtree
(``--extract``), or everything (``--all``); then ``--include``/``--exclude`` globs. Names
may lose a wrapper prefix every key carries (DDP's ``module.``, ``torch.compile``'s
``_orig_mod.``), which is reported and stripped only when asked, and take regex renames
and an added prefix. A name map (``ConvertOptions.name_map``, e.g. a TensorFlow model's
weights under its PyTorch twin's names) comes first; it may also transpose a tensor, as a
strided view of the same bytes.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from modelport.errors import ConversionError, UsageError
from modelport.tensors import TensorRef, contiguous_strides
from modelport.tree import dequantizing, quantization
from modelport.tree import names as trees

if TYPE_CHECKING:
    from modelport.conversion.options import ConvertOptions, Relayout


def select(
    model: Any, options: ConvertOptions, plain: Any, nested: bool
) -> tuple[dict[str, TensorRef], str, list[str]]:
    """The chosen tensors by name, what was taken (said to the user), and what was left
    out. ``plain`` is the file's tree as plain data, ``nested`` whether it is more than a
    flat dict of tensors."""
    left_out: list[str] = []
    if options.extract:
        subtree = lookup(model.tree, options.extract)
        chosen, selection, left_out = (
            trees.tensors_of(subtree),
            f"extracted '{options.extract}'",
            [],
        )
    elif options.take_all:
        chosen = trees.tensors_of(plain)
        selection = (
            "every tensor in the file"
            if not nested
            else "the whole file: every tensor, and the values around them as typed JSON"
        )
    else:
        weights = model.weights(ema=options.ema)
        chosen, selection, left_out = (
            weights.tensors,
            weights.note or "the model weights",
            weights.left_out,
        )
    if options.include:
        chosen = {
            n: t
            for n, t in chosen.items()
            if any(fnmatch.fnmatchcase(n, p) for p in options.include)
        }
    if options.exclude:
        chosen = {
            n: t
            for n, t in chosen.items()
            if not any(fnmatch.fnmatchcase(n, p) for p in options.exclude)
        }
    if not chosen:
        raise ConversionError("nothing to convert: the selection holds no tensors")
    return chosen, selection, list(left_out)


def dequantized(
    model: Any, chosen: dict[str, TensorRef], options: ConvertOptions
) -> tuple[dict[str, TensorRef], list[str]]:
    """With ``--dequantize``, each MLX-quantized layer's weight as float values under its
    own name, its scales and biases left out; other quantized layers are copied packed, and
    the notes say so."""
    found = model.quantized(chosen)
    if not found.layers:
        return chosen, []
    if not options.dequantize:
        hint = (
            "; --dequantize unpacks MLX's" if any(la.scheme == "mlx" for la in found.layers) else ""
        )
        return chosen, [f"copied {quantization.describe(found.summary() or {})} packed{hint}"]
    result, unpacked = dequantizing.dequantized(chosen, found)
    notes = []
    if unpacked:
        notes.append(
            f"dequantized {len(unpacked)} MLX layers into float weights (scales and biases "
            "folded in): a config.json 'quantization' entry no longer applies to them"
        )
    packed = [layer for layer in found.layers if layer not in unpacked]
    if packed:
        kinds = ", ".join(sorted({quantization.NAMES.get(la.scheme, la.scheme) for la in packed}))
        notes.append(f"copied {len(packed)} {kinds} layers packed: --dequantize unpacks MLX's")
    return result, notes


def lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif part.isdigit() and (
            (isinstance(node, dict) and int(part) in node)
            or (isinstance(node, (list, tuple)) and int(part) < len(node))
        ):
            node = node[int(part)]
        else:
            raise UsageError(f"--extract {dotted!r}: no entry {part!r} in the file's tree")
    return node


def rename(
    chosen: dict[str, TensorRef], options: ConvertOptions, model: Any
) -> tuple[dict[str, TensorRef], list[str]]:
    chosen, notes = relaid(chosen, options.name_map)
    wrapper = trees.wrapper_prefix(chosen) or None
    strip = wrapper if options.strip_prefix == "auto" else options.strip_prefix
    if wrapper and strip != wrapper and _stripping_fits(wrapper, model, options):
        notes.append(
            f"every key starts with {wrapper!r} (a wrapper); --strip-prefix auto removes it"
        )
    renamed: dict[str, TensorRef] = {}
    for name, tensor in chosen.items():
        new = name.removeprefix(strip) if strip else name
        for pattern, replacement in options.renames:
            new = re.sub(pattern, replacement, new)
        new = (options.add_prefix or "") + new
        if new in renamed:
            raise UsageError(f"renaming gives two tensors the name {new!r}")
        renamed[new] = tensor
    if strip and strip == wrapper:
        notes.append(f"stripped the wrapper prefix {strip!r}")
    return renamed, notes


def relaid(
    chosen: dict[str, TensorRef], name_map: tuple[Relayout, ...]
) -> tuple[dict[str, TensorRef], list[str]]:
    """The tensors ``name_map`` places, under their new names and layouts (views of the same
    bytes); a chosen tensor it does not place is left out, and the notes say how many."""
    if not name_map:
        return chosen, []
    placed: dict[str, TensorRef] = {}
    used: set[str] = set()
    for move in name_map:
        tensor = chosen.get(move.source)
        if tensor is None:  # not selected (--include / --exclude)
            continue
        if move.target in placed:
            raise UsageError(f"the name map gives two tensors the name {move.target!r}")
        placed[move.target] = _relaid_tensor(tensor, move)
        used.add(move.source)
    changed = sum(1 for m in name_map if m.source in used and (m.axes or m.shape is not None))
    notes = [f"renamed {len(placed)} tensors by the name map ({changed} in a new layout)"]
    unplaced = [name for name in chosen if name not in used]
    if unplaced:
        notes.append(
            f"left out {len(unplaced)} tensors the name map does not place "
            f"({', '.join(unplaced[:3])}{', ...' if len(unplaced) > 3 else ''})"
        )
    return placed, notes


def _relaid_tensor(tensor: TensorRef, move: Relayout) -> TensorRef:
    """``tensor`` with its dimensions permuted and size-1 dimensions added or dropped: a
    strided view, no bytes copied (the writers gather strided views)."""
    shape = tensor.shape
    strides = tensor.strides or contiguous_strides(shape)
    if move.axes:
        if sorted(move.axes) != list(range(len(shape))):
            raise UsageError(f"{move.source}: axes {list(move.axes)} do not permute {list(shape)}")
        shape = tuple(shape[a] for a in move.axes)
        strides = tuple(strides[a] for a in move.axes)
    if move.shape is not None and move.shape != shape:
        kept = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
        if [n for n in move.shape if n != 1] != [n for n, _ in kept]:
            raise UsageError(
                f"{move.source}: shape {list(shape)} cannot become {list(move.shape)} by adding "
                "or dropping size-1 dimensions"
            )
        steps = iter(s for _, s in kept)
        shape, strides = move.shape, tuple(1 if n == 1 else next(steps) for n in move.shape)
    natural = contiguous_strides(shape)
    flat = strides == natural or (not move.axes and tensor.is_contiguous)
    return TensorRef(
        tensor.dtype,
        shape,
        tensor.storage,
        tensor.element_offset,
        None if flat else strides,
        tensor.note,
    )


LIGHTNING_KEYS = ("pytorch-lightning_version", "lightning_version", "hyper_parameters")


def _stripping_fits(wrapper: str, model: Any, options: ConvertOptions) -> bool:
    """Whether removing ``wrapper`` gives the names the model itself uses, which is when the
    hint to strip it helps. DDP's ``module.`` and torch.compile's ``_orig_mod.`` always do.
    ``model.`` is a wrapper only where Lightning lays it over a checkpoint's state_dict
    (``self.model`` of a LightningModule), taken whole; elsewhere it is the model's own name:
    a pickled module's state_dict (ultralytics), a transformers folder (``model.layers``), a
    selection narrowed to one part (Stable Diffusion's ``model.diffusion_model.*``)."""
    if trees.LIGHTNING_WRAPPER not in wrapper.split(".")[:-1]:
        return True
    if options.extract or options.include or options.take_all:
        return False
    tree = model.tree
    return (
        isinstance(tree, dict)
        and any(key in tree for key in LIGHTNING_KEYS)
        and model.weights(ema=options.ema).source == "state_dict"
    )


def unread(model: Any) -> list[str]:
    """What the reader listed in ``details["skipped_tensors"]`` (TFLite sparse tensors, a
    TensorFlow checkpoint's strings): said, since it cannot reach the output."""
    skipped = model.details.get("skipped_tensors")
    if not isinstance(skipped, dict) or not skipped:
        return []
    kinds = Counter(str(kind).split(" ")[0] for kind in skipped.values())
    listed = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    return [
        f"not in the output: {len(skipped)} tensors of the file that modelport does not read "
        f"({listed}); inspect lists them under details"
    ]
