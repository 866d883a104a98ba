"""TensorFlow weights of a transformers model (``tf_model.h5``) under its PyTorch names and layouts.

transformers 4.x saved a TF model with Keras 2 ``save_weights``: one HDF5 group per top
layer (``bert``) listing ``weight_names``, and each variable at ``<layer>/<variable name>``,
the name scoped by the Keras model (``bert/tf_bert_model/bert/encoder/layer_._0/attention/
self/query/kernel:0``). Its sharded files (``tf_model-00001-of-00002.h5`` with
``tf_model.h5.index.json``) hold the names without layer group and model scope; their folder
is read as one model (``formats._hf_folder``) and mapped the same way. transformers 5 reads
neither (``from_tf`` is gone), so modelport maps the names itself, by the rule transformers
4.x loaded them into PyTorch with, checked against the PyTorch model of ``config.json``'s
architecture built on the meta device (shapes only, nothing allocated; no table per model):

- ``:0`` is dropped, ``_._`` separates a level (``layer_._0`` is ``layer.0``), and a scope
  ``a___b`` is ``b`` (TF's ``mlm___cls`` holds PyTorch's ``cls``);
- the last part: ``kernel``, ``embeddings`` and ``gamma`` become ``weight``, ``beta``
  becomes ``bias``; ``pointwise_kernel`` / ``depthwise_kernel`` become ``pointwise.weight`` /
  ``depthwise.weight``;
- the layer group and the model scope lead the name: the fewest leading parts (none, one or
  two) are dropped that give a name of the PyTorch model, with or without the base model's
  prefix (``bert.``), as PyTorch's own head and base classes differ by it;
- a dense kernel (in, out) is transposed to (out, in); a 3-d convolution kernel (width, in,
  out) becomes (out, in, width), a 4-d one (h, w, in, out) becomes (out, in, h, w);
- the shapes must then equal the PyTorch model's, up to size-1 dimensions (TF keeps GPT-2's
  biases as (1, n)).

Keras stores a weight shared by two layer groups in both (``mlm___cls`` repeats BERT's
embeddings): the second copy is left out. A TF name with no place in the PyTorch model, or a
PyTorch name no TF name fills (tied weights aside: ``from_pretrained`` ties them), is refused
with the list, because the output is meant to load with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport.conversion.options import Relayout
from modelport.errors import ConversionError
from modelport.loading.model_file import open as open_model
from modelport.torch_models.building import build_model

TF_WEIGHTS = "tf_model.h5"
TF_INDEX = "tf_model.h5.index.json"
TF_SHARDS = "tf_model-*-of-*.h5"
CONFIG = "config.json"
OTHER_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5")
RENAMED_LAST = {"kernel": "weight", "embeddings": "weight", "gamma": "weight", "beta": "bias"}
SEPARABLE = {"pointwise_kernel": "pointwise", "depthwise_kernel": "depthwise"}
KERNEL_AXES = {3: (2, 1, 0), 4: (3, 2, 0, 1)}  # conv kernels: TF (..., in, out) -> (out, in, ...)
MAX_DROPPED = 2  # a layer group and a model scope
MAX_LISTED = 12


@dataclass(frozen=True)
class TorchTarget:
    """The PyTorch model the names are matched against: its parameter and buffer shapes, the
    base model's attribute name (``bert``), and the tied names ``from_pretrained`` fills."""

    architecture: str
    shapes: Mapping[str, tuple[int, ...]]
    base_prefix: str
    tied: Collection[str]


def tf_weights_file(source: Path) -> Path | None:
    """The TF weights to map: ``source`` itself (a ``tf_model.h5``), or the only weights in
    the folder ``source`` (a ``tf_model.h5``, or its shards with their index, which return
    the folder), with a ``config.json`` beside them; None for anything else."""
    if source.is_dir():
        if not (source / CONFIG).is_file():
            return None
        weights = {p for pattern in OTHER_WEIGHTS for p in source.glob(pattern)}
        if weights == {source / TF_WEIGHTS}:
            return source / TF_WEIGHTS
        shards = set(source.glob(TF_SHARDS))
        sharded = (source / TF_INDEX).is_file() and shards and weights == shards
        return source if sharded else None
    if source.name == TF_WEIGHTS and (source.parent / CONFIG).is_file():
        return source
    return None


def pytorch_layout(
    h5_path: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> tuple[Relayout, ...]:
    """Each tensor of ``h5_path`` (a ``tf_model.h5``, or a folder of its shards; those
    ``include`` / ``exclude`` select, as ``convert`` selects them) with its PyTorch name and
    layout, for ``ConvertOptions.name_map``."""
    with open_model(h5_path) as model:
        tf_shapes = {name: t.shape for name, t in model.weights().tensors.items()}
    folder = h5_path if h5_path.is_dir() else h5_path.parent
    chosen = {
        n: s
        for n, s in tf_shapes.items()
        if (not include or _matches(n, include)) and not _matches(n, exclude)
    }
    left_out = [n for n in tf_shapes if n not in chosen]
    return relayouts(chosen, torch_target(folder), left_out)


def torch_target(folder: Path) -> TorchTarget:
    """The names and shapes of the model ``folder/config.json`` describes, built on the meta
    device by transformers (``config.architectures[0]``, else ``AutoModel``)."""
    model = build_model(folder, meta=True)
    tied: Any = getattr(model, "all_tied_weights_keys", None)
    if tied is None:
        tied = getattr(model, "_tied_weights_keys", None)
    return TorchTarget(
        type(model).__name__,
        {name: tuple(t.shape) for name, t in model.state_dict().items()},
        str(getattr(model, "base_model_prefix", "") or ""),
        frozenset(tied or ()),
    )


def relayouts(
    tf_shapes: Mapping[str, tuple[int, ...]],
    target: TorchTarget,
    left_out: Collection[str] = (),
) -> tuple[Relayout, ...]:
    """The mapping of every name in ``tf_shapes`` onto ``target``; a ``ConversionError`` lists
    what does not fit (no PyTorch name, another shape, PyTorch names left unfilled). The
    PyTorch names of the TF names in ``left_out`` (the user's --include / --exclude) may
    stay unfilled."""
    placed: dict[str, Relayout] = {}
    unmatched: list[str] = []
    misshapen: list[str] = []
    for name, shape in tf_shapes.items():
        found = _torch_name(name, len(shape), target)
        if found is None:
            unmatched.append(name)
            continue
        torch_name, axes = found
        laid = tuple(shape[a] for a in axes) if axes else tuple(shape)
        wanted = target.shapes[torch_name]
        if [n for n in laid if n != 1] != [n for n in wanted if n != 1]:
            misshapen.append(f"{name} {list(shape)} -> {torch_name} {list(wanted)}")
            continue
        if torch_name not in placed:  # a later one is a layer group's copy of a shared weight
            shape_change = wanted if laid != wanted else None
            placed[torch_name] = Relayout(name, torch_name, axes, shape_change)
    excused = {found[0] for n in left_out if (found := _torch_name(n, 0, target)) is not None}
    unfilled = [
        n for n in target.shapes if n not in placed and n not in target.tied and n not in excused
    ]
    problems = [
        _listed(f"TensorFlow weights with no place in {target.architecture}", unmatched),
        _listed("shapes that differ after the TF -> PyTorch transposes", misshapen),
        _listed(f"{target.architecture} weights no TensorFlow weight fills", unfilled),
    ]
    said = [p for p in problems if p]
    if said:
        hint = (
            "; leave TF weights out with --exclude GLOB (their names as in the file)"
            if unmatched
            else ""
        )
        raise ConversionError(
            "the TensorFlow weights do not map onto the PyTorch model of config.json "
            f"({target.architecture}): " + "; ".join(said) + hint
        )
    return tuple(placed.values())


def torch_parts(tf_name: str) -> tuple[list[str], bool]:
    """The name's parts after the TF -> PyTorch renames (every leading part still there), and
    whether it is a kernel, whose layout differs from PyTorch's."""
    name = re.sub(r":0$", "", tf_name)
    name = re.sub(r"(^|/)[^/]*___([^/]*)(?=/)", r"\1\2", name)
    name = re.sub(r"/+", "/", name.replace("_._", "/"))
    parts = name.split("/")
    last = parts[-1]
    kernel = last in ("kernel", *SEPARABLE) or any(p in ("emb_projs", "out_projs") for p in parts)
    if last in SEPARABLE:
        parts[-1:] = [SEPARABLE[last], "weight"]
    else:
        parts[-1] = RENAMED_LAST.get(last, last)
    return parts, kernel


def kernel_axes(tf_name: str, ndim: int) -> tuple[int, ...]:
    """How a kernel's dimensions are reordered for PyTorch: convolutions by ``KERNEL_AXES``,
    anything else reversed (a dense (in, out) becomes (out, in))."""
    if ndim < 2:
        return ()
    is_kernel = re.sub(r":0$", "", tf_name).rsplit("/", 1)[-1] == "kernel"
    return (KERNEL_AXES.get(ndim) if is_kernel else None) or tuple(reversed(range(ndim)))


def _torch_name(tf_name: str, ndim: int, target: TorchTarget) -> tuple[str, tuple[int, ...]] | None:
    parts, kernel = torch_parts(tf_name)
    axes = kernel_axes(tf_name, ndim) if kernel else ()
    prefix = target.base_prefix + "." if target.base_prefix else ""
    for dropped in range(min(MAX_DROPPED, len(parts) - 1) + 1):
        candidate = ".".join(parts[dropped:])
        for name in (candidate, candidate.removeprefix(prefix), prefix + candidate):
            if name in target.shapes:
                return name, axes
    return None


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _listed(what: str, names: list[str]) -> str:
    if not names:
        return ""
    more = f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else ""
    return f"{what}: {', '.join(names[:MAX_LISTED])}{more}"
