"""Would ``torch.load(path, weights_only=True)`` accept this file? Decided without torch and
without running the file, from what modelport read of it (``inspect`` says it; the model
card shows ``torch.load`` only where it would).

torch's weights-only unpickler admits a fixed set of globals (containers, tensors and their
rebuild functions, dtypes, devices, shapes; ``TORCH_WEIGHTS_ONLY`` below mirrors torch 2.x's
``_get_allowed_globals``) and refuses every other. Two readings find what it would refuse:

- the file's tree: any object record (an ``argparse.Namespace``, a pickled ``nn.Module``), a
  bare class or function, a call modelport only recorded, a numpy array or dtype; these say
  *where* in the checkpoint the refused value sits;
- for a torch zip, every global its ``data.pkl`` names, read by the scanner's symbolic
  resolver: this catches what the reader turns into plain values (a numpy scalar becomes a
  float, ``torch.__version__``'s ``TorchVersion`` a str, ``frozenset`` and ``slice`` their
  Python values), which torch still refuses.

``add_safe_globals`` changes torch's answer at run time; the card assumes torch's defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from modelport import limits
from modelport.errors import ModelportError
from modelport.formats import torch_zip
from modelport.formats._zip import ZipDirectory
from modelport.pickles import modules
from modelport.pickles.judging import ScanResolver
from modelport.pickles.machine import run
from modelport.pickles.numpy_types import NumpyArray, NumpyDType, NumpyScalar
from modelport.pickles.records import CallRecord, GlobalRef, ObjectRecord
from modelport.tensors import TensorRef

_DTYPES: Final = (
    "float16",
    "float32",
    "float64",
    "bfloat16",
    "complex32",
    "complex64",
    "complex128",
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "qint8",
    "qint32",
    "quint8",
    "quint4x2",
    "quint2x4",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
)
_QSCHEMES: Final = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)
_REBUILDS: Final = (
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_nested_tensor",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_numpy",
    "_rebuild_device_tensor_from_cpu_tensor",
)
TORCH_WEIGHTS_ONLY: Final = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.set",
        "builtins.complex",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch._tensor._rebuild_from_type_v2",
        *(f"torch.{name}" for name in (*_DTYPES, *_QSCHEMES)),
        *(f"torch._utils.{name}" for name in _REBUILDS),
    }
)
# Legacy tensor and storage classes: torch.FloatTensor, torch.cuda.sparse.HalfTensor, ...
_LEGACY_CLASSES: Final = re.compile(r"torch\.(cuda\.)?(sparse\.)?[A-Z][A-Za-z0-9]*(Tensor|Storage)")

_MAX_REFUSALS: Final = 8


@dataclass(frozen=True)
class Refusal:
    """One global torch's weights-only unpickler would refuse, and where the file uses it
    (a dotted place in the tree; "" when only the pickle's names tell)."""

    name: str
    where: str = ""


def accepted_by_torch(name: str) -> bool:
    return name in TORCH_WEIGHTS_ONLY or bool(_LEGACY_CLASSES.fullmatch(name))


def refusals(tree: Any, path: Path, *, torch_zip_file: bool) -> list[Refusal]:
    """What ``torch.load(weights_only=True)`` would refuse in this file; empty when it would
    load it."""
    found = tree_refusals(tree)
    if torch_zip_file:
        named = {r.name for r in found}
        found += [Refusal(n) for n in pickle_refusals(path) if n not in named]
    return found[:_MAX_REFUSALS]


COMPUTED_CALL: Final = "a call the pickle computes"


def answer(tree: Any, path: Path, *, torch_zip_file: bool) -> dict[str, Any]:
    """``inspect``'s answer for a torch file: whether ``torch.load(weights_only=True)``
    loads it and, if not, what it refuses and whether ``add_safe_globals`` can admit that
    (a call whose function the pickle computes cannot be admitted by name)."""
    found = refusals(tree, path, torch_zip_file=torch_zip_file)
    names = [r.name for r in found]
    return {
        "accepted": not found,
        "refused": [{"global": r.name, "where": r.where} for r in found],
        "add_safe_globals": None if not found or COMPUTED_CALL in names else names,
    }


def tree_refusals(tree: Any) -> list[Refusal]:
    """The refused values of the tree, outermost first, one per global."""
    found: dict[str, str] = {}
    stack: list[tuple[str, Any, int]] = [("", tree, 0)]
    budget = limits.MAX_TREE_NODES
    while stack and len(found) < _MAX_REFUSALS and budget > 0:
        where, value, depth = stack.pop()
        budget -= 1
        refused = _refused_leaf(value)
        if refused:
            found.setdefault(refused, where)
        if depth >= limits.MAX_DEPTH:
            continue
        children = _children(value)
        stack.extend(
            (f"{where}.{key}" if where else key, child, depth + 1)
            for key, child in reversed(children)
        )
    return [Refusal(name, where) for name, where in found.items()]


def _refused_leaf(value: Any) -> str:
    if isinstance(value, ObjectRecord):
        return value.class_path
    if isinstance(value, GlobalRef):
        return value.path
    if isinstance(value, CallRecord):
        func = value.func
        return func.path if isinstance(func, GlobalRef) else COMPUTED_CALL
    if isinstance(value, NumpyArray):
        return "numpy.ndarray"
    if isinstance(value, (NumpyScalar, NumpyDType)):
        return "numpy.dtype"
    if isinstance(value, frozenset):
        return "builtins.frozenset"
    if isinstance(value, slice):
        return "builtins.slice"
    return ""


def _children(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [(str(i), v) for i, v in enumerate(value)]
    if isinstance(value, ObjectRecord) and not modules.is_module(value):
        return list(value.attributes().items())
    return []


def pickle_refusals(path: Path) -> list[str]:
    """The globals a torch zip's ``data.pkl`` names that torch would refuse, in the order
    named; a file modelport cannot parse this way tells nothing more."""
    try:
        directory = ZipDirectory.read(path)
        prefix = torch_zip.archive_prefix(directory)
        entry = None if prefix is None else directory.find(f"{prefix}/data.pkl")
        if entry is None:
            return []
        data = memoryview(directory.read_member(entry))
        resolver = ScanResolver(expect_persistent_ids=True, data=data)
        run(data, resolver)
    except ModelportError:
        return []
    names = dict.fromkeys(f"{s.module}.{s.name}" for s in resolver.symbols)
    return [name for name in names if not accepted_by_torch(name)]


def module_weights(tree: Any) -> bool:
    """Whether the tree is a pickled ``nn.Module`` (its weights are its state_dict)."""
    return isinstance(tree, ObjectRecord) and modules.is_module(tree)


def all_tensors(tree: Any) -> bool:
    """Whether ``tree`` is a flat ``{name: tensor}`` dict, as ``torch.save(state_dict)``."""
    return (
        isinstance(tree, dict)
        and bool(tree)
        and all(isinstance(v, TensorRef) for v in tree.values())
    )
