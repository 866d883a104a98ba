"""What the scanner accepts, and (from ``modelport.gadgets``) the gadgets it names. Every
table is immutable and exact.

Safety is decided by the allowlist and by how each global is used, never by the denylist:
the denylist only puts a name to a known exploit so the report can say what it would do.
No prefix matching anywhere: ``numpy.__builtins__.exec`` is not ``numpy``, and
``torch.nn.modules.linear.Linear`` is allowed because it is listed, not because it starts
with ``torch.``.
"""

from __future__ import annotations

import sys
from types import MappingProxyType
from typing import Final

from modelport.gadgets import DENYLIST as DENYLIST
from modelport.gadgets import gadget as gadget
from modelport.pickles.interface import Value, fill
from modelport.pickles.reading import CALLABLES, CONSTANTS
from modelport.pickles.symbols import Usage
from modelport.pickles.torch_nn_classes import TORCH_NN_CLASSES

# Globals whose call only rebuilds data; modelport's reader implements each one itself.
SAFE_CALLS: Final = frozenset(CALLABLES)

# Globals that are values (dtypes, storage types, layouts); calling one is never legitimate.
SAFE_VALUES: Final = frozenset(CONSTANTS)

# Library classes that legitimate files instantiate with NEWOBJ and fill with BUILD: loading
# them runs only their library's own __new__/__setstate__, whatever state the file gives.
SAFE_CLASSES: Final[MappingProxyType[tuple[str, str], str]] = MappingProxyType(
    {
        **{key: "torch.nn module, as torch.save(model) writes it" for key in TORCH_NN_CLASSES},
        ("torch.nn.parameter", "Parameter"): "torch parameter",
        ("torch.nn.parameter", "Buffer"): "torch buffer",
        ("torch", "Tensor"): "torch's own tensor type: _rebuild_from_type_v2 names it for a "
        "plain tensor carrying Python attributes (DeepSpeed's ds_id)",
        ("argparse", "Namespace"): "training scripts save their arguments",
        ("types", "SimpleNamespace"): "plain attribute bag",
        ("joblib.numpy_pickle", "NumpyArrayWrapper"): "joblib's array header",
        ("joblib.numpy_pickle", "NDArrayWrapper"): "joblib < 0.10's array header (side file)",
        ("joblib.numpy_pickle_compat", "NDArrayWrapper"): "the same, as joblib reads it today",
        ("torch.optim.adam", "Adam"): "optimizers saved whole",
        ("torch.optim.sgd", "SGD"): "optimizers saved whole",
        ("torch.optim.adamw", "AdamW"): "optimizers saved whole",
        **{
            ("torch.distributed.checkpoint.metadata", name): "DCP checkpoint metadata (dataclass)"
            for name in (
                "Metadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "MetadataIndex",
                "StorageMeta",
            )
        },
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): "DCP storage location",
    }
)

# Constructors of plain values (stdlib types, enums) that real checkpoints call.
SAFE_STDLIB_CALLS: Final[MappingProxyType[tuple[str, str], str]] = MappingProxyType(
    {
        ("datetime", "datetime"): "timestamps in checkpoints",
        ("datetime", "date"): "dates in checkpoints",
        ("datetime", "timedelta"): "durations in checkpoints",
        ("pathlib", "PosixPath"): "paths in saved configs",
        ("pathlib", "WindowsPath"): "paths in saved configs",
        ("pathlib", "PurePosixPath"): "paths in saved configs",
        ("pathlib", "Path"): "paths in saved configs",
        ("pathlib._local", "PosixPath"): "paths in saved configs (Python 3.13+)",
        ("pathlib._local", "WindowsPath"): "paths in saved configs (Python 3.13+)",
        ("pathlib._local", "PurePosixPath"): "paths in saved configs (Python 3.13+)",
        ("collections", "defaultdict"): "counters in training state",
        ("collections", "Counter"): "counters in training state",
        ("collections", "deque"): "history buffers",
        ("decimal", "Decimal"): "plain number",
        ("fractions", "Fraction"): "plain number",
        ("uuid", "UUID"): "run identifiers",
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): "an enum, by value",
    }
)

# numpy's own constructors and classes for objects models and pipelines keep (scikit-learn
# estimators hold RandomState and Generator objects; old code saves matrices and masked
# arrays). Each only builds numpy's object from plain data; any other global handed to one of
# them (a class to instantiate, a function to call) is judged by its own use.
_RANDOM_STATE = "numpy's random state, rebuilt from its name and plain state"
SAFE_LIBRARY_OBJECTS: Final[MappingProxyType[tuple[str, str], str]] = MappingProxyType(
    {
        ("numpy.random._pickle", "__randomstate_ctor"): _RANDOM_STATE,
        ("numpy.random", "__RandomState_ctor"): "numpy's random state as numpy < 1.17 pickled "
        "it: numpy/random/__init__.py returns RandomState(seed=0), whose state BUILD sets",
        ("numpy.random._pickle", "__generator_ctor"): _RANDOM_STATE,
        ("numpy.random._pickle", "__bit_generator_ctor"): _RANDOM_STATE,
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): _RANDOM_STATE,
        ("numpy.random.bit_generator", "SeedSequence"): _RANDOM_STATE,
        ("numpy.random._mt19937", "MT19937"): _RANDOM_STATE,
        ("numpy.random._pcg64", "PCG64"): _RANDOM_STATE,
        ("numpy.random._pcg64", "PCG64DXSM"): _RANDOM_STATE,
        ("numpy.random._philox", "Philox"): _RANDOM_STATE,
        ("numpy.random._sfc64", "SFC64"): _RANDOM_STATE,
        ("numpy", "matrix"): "numpy's matrix, an ndarray subclass rebuilt by _reconstruct",
        ("numpy.matrixlib.defmatrix", "matrix"): "numpy's matrix, under its defining module",
        ("numpy.ma.core", "_mareconstruct"): "numpy's masked array, rebuilt from plain data",
        ("numpy.ma", "MaskedArray"): "numpy's masked array class",
        ("numpy.ma.core", "MaskedArray"): "numpy's masked array class",
    }
)


class PassedOn(Value):
    """An argument an allowlisted reconstructor calls or instantiates, and where its own
    source does so."""

    FIELDS = ("index", "usage", "source")
    __slots__ = FIELDS
    index: int
    usage: Usage
    source: str

    def __init__(self, index: int, usage: Usage, source: str) -> None:
        fill(self, index=index, usage=usage, source=source)


_NUMPY_RECONSTRUCT = (PassedOn(0, Usage.INSTANTIATED, "ndarray.__new__(subtype, ...)"),)
_NUMPY_RANDOM_CTOR = (
    PassedOn(1, Usage.CALLED, "numpy/random/_pickle.py: bit_generator_ctor(name)"),
)

# What each allowlisted reconstructor does with its arguments, from its own source. An
# argument the reconstructor calls is judged as called (indirectly), one it instantiates as
# instantiated; every other argument is data.
PASSED_ON: Final[MappingProxyType[tuple[str, str], tuple[PassedOn, ...]]] = MappingProxyType(
    {
        ("copyreg", "_reconstructor"): (
            PassedOn(0, Usage.INSTANTIATED, "Lib/copyreg.py: base.__new__(cls, state)"),
            PassedOn(1, Usage.CALLED, "Lib/copyreg.py: base.__new__ and base.__init__(obj, state)"),
        ),
        ("copyreg", "__newobj__"): (
            PassedOn(0, Usage.INSTANTIATED, "Lib/copyreg.py: cls.__new__(cls, *args)"),
        ),
        ("torch._tensor", "_rebuild_from_type_v2"): (
            PassedOn(0, Usage.CALLED, "torch/_tensor.py: ret = func(*args)"),
            PassedOn(1, Usage.INSTANTIATED, "torch/_tensor.py: ret.as_subclass(new_type)"),
        ),
        ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
        ("numpy.core._internal", "_reconstruct"): _NUMPY_RECONSTRUCT,
        ("numpy.random._pickle", "__randomstate_ctor"): _NUMPY_RANDOM_CTOR,
        ("numpy.random._pickle", "__generator_ctor"): _NUMPY_RANDOM_CTOR,
        ("numpy.random._pickle", "__bit_generator_ctor"): (
            PassedOn(0, Usage.INSTANTIATED, "numpy/random/_pickle.py: bit_gen_class()"),
        ),
        ("numpy.ma.core", "_mareconstruct"): (
            PassedOn(0, Usage.INSTANTIATED, "numpy/ma/core.py: subtype.__new__(subtype, ...)"),
            PassedOn(1, Usage.INSTANTIATED, "numpy/ma/core.py: ndarray.__new__(baseclass, ...)"),
        ),
    }
)

# The argument of copyreg._reconstructor that means "no base class to call".
NO_BASE: Final = ("builtins", "object")


def is_standard_library(module: str) -> bool:
    return module.partition(".")[0] in sys.stdlib_module_names


def names_a_class(name: str) -> bool:
    """CapWords, Python's spelling of classes; a dotted path through a dunder attribute
    (``numpy.__builtins__.exec``) is attribute traversal, never a class."""
    parts = name.split(".")
    if any(p.startswith("__") and p.endswith("__") for p in parts):
        return False
    last = parts[-1].lstrip("_")
    return last[:1].isupper()
