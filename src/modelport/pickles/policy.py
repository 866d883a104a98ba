"""What the scanner accepts, and the gadgets it names. Every table is immutable and exact.

Safety is decided by the allowlist and by how each global is used, never by the denylist:
the denylist only puts a name to a known exploit so the report can say what it would do.
No prefix matching anywhere: ``numpy.__builtins__.exec`` is not ``numpy``, and
``torch.nn.modules.linear.Linear`` is allowed because it is listed, not because it starts
with ``torch.``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

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


@dataclass(frozen=True)
class PassedOn:
    """An argument an allowlisted reconstructor calls or instantiates, and where its own
    source does so."""

    index: int
    usage: Usage
    source: str


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


# Known gadgets: (module, name) or (module, "*") -> what calling it does.
_SHELL = "runs a shell command"
_CODE = "executes arbitrary Python code"
_LOADER = "loads another pickle, which can run code (a nested loader)"
_IMPORT = "imports arbitrary modules"
_ATTR = "reaches arbitrary attributes, the first step of most gadget chains"
_FILES = "reads, writes or deletes files"
_NET = "opens network connections"

DENYLIST: Final[MappingProxyType[tuple[str, str], str]] = MappingProxyType(
    {
        **{
            (m, "*"): _SHELL
            for m in ("os", "posix", "nt", "subprocess", "pty", "commands", "popen2")
        },
        ("platform", "popen"): _SHELL,
        ("asyncio.subprocess", "*"): _SHELL,
        ("builtins", "eval"): _CODE,
        ("builtins", "exec"): _CODE,
        ("builtins", "compile"): _CODE,
        ("builtins", "__import__"): _IMPORT,
        ("builtins", "getattr"): _ATTR,
        ("builtins", "setattr"): _ATTR,
        ("builtins", "delattr"): _ATTR,
        ("builtins", "globals"): _ATTR,
        ("builtins", "locals"): _ATTR,
        ("builtins", "vars"): _ATTR,
        ("builtins", "open"): _FILES,
        ("builtins", "breakpoint"): _CODE,
        ("builtins", "input"): "waits for terminal input",
        ("builtins", "memoryview"): "raw memory access",
        ("code", "*"): _CODE,
        ("codeop", "*"): _CODE,
        ("runpy", "*"): _CODE,
        ("timeit", "*"): _CODE,
        ("cProfile", "*"): _CODE,
        ("profile", "*"): _CODE,
        ("pdb", "*"): _CODE,
        ("bdb", "*"): _CODE,
        ("trace", "*"): _CODE,
        ("doctest", "*"): _CODE,
        ("types", "FunctionType"): _CODE,
        ("types", "CodeType"): _CODE,
        ("ctypes", "*"): "calls native code",
        ("marshal", "*"): _CODE,
        ("importlib", "*"): _IMPORT,
        ("importlib", "import_module"): _IMPORT,
        ("pkgutil", "*"): _IMPORT,
        ("sys", "*"): _ATTR,
        ("operator", "attrgetter"): _ATTR,
        ("operator", "methodcaller"): _ATTR,
        ("operator", "getitem"): _ATTR,
        ("functools", "partial"): "binds arguments for a later call (gadget chains)",
        ("functools", "reduce"): "calls a function repeatedly (gadget chains)",
        ("pickle", "*"): _LOADER,
        ("_pickle", "*"): _LOADER,
        ("cloudpickle", "*"): _LOADER,
        ("dill", "*"): _LOADER,
        ("shelve", "*"): _LOADER,
        ("joblib", "load"): _LOADER,
        ("numpy", "load"): _LOADER,
        ("numpy.lib.npyio", "load"): _LOADER,
        ("torch", "load"): _LOADER,
        ("torch.serialization", "load"): _LOADER,
        ("torch.storage", "_load_from_bytes"): _LOADER,
        ("torch.jit", "load"): _LOADER,
        ("torch.hub", "load"): "downloads and runs a repository's code",
        ("torch.hub", "load_state_dict_from_url"): _NET,
        ("shutil", "*"): _FILES,
        ("tempfile", "*"): _FILES,
        ("glob", "*"): _FILES,
        ("io", "open"): _FILES,
        ("socket", "*"): _NET,
        ("ssl", "*"): _NET,
        ("http.client", "*"): _NET,
        ("urllib.request", "*"): _NET,
        ("requests", "*"): _NET,
        ("httpx", "*"): _NET,
        ("webbrowser", "*"): "opens a browser",
        ("smtplib", "*"): _NET,
        ("ftplib", "*"): _NET,
        ("telnetlib", "*"): _NET,
        ("signal", "*"): "changes process signal handling",
        ("multiprocessing", "*"): _SHELL,
        ("threading", "*"): "starts threads",
        ("_thread", "*"): "starts threads",
        ("builtins", "exit"): "stops the process",
        ("builtins", "quit"): "stops the process",
        ("builtins", "__build_class__"): _CODE,
        ("builtins", "help"): _IMPORT,
        ("pydoc", "*"): _IMPORT,
        ("zipimport", "*"): _IMPORT,
        ("imp", "*"): _IMPORT,
        ("site", "*"): _IMPORT,
        ("ensurepip", "*"): _SHELL,
        ("venv", "*"): _SHELL,
        ("idlelib", "*"): _CODE,
        ("lib2to3", "*"): _FILES,
        ("distutils", "*"): _SHELL,
        ("setuptools", "*"): _SHELL,
        ("pip", "*"): _SHELL,
        ("logging.config", "*"): "evaluates configuration as code and opens sockets",
        ("logging", "FileHandler"): _FILES,
        ("logging.handlers", "*"): "writes files or opens sockets",
        ("codecs", "open"): _FILES,
        ("_io", "*"): _FILES,
        ("io", "FileIO"): _FILES,
        ("fileinput", "*"): _FILES,
        ("linecache", "*"): _FILES,
        ("zipfile", "*"): _FILES,
        ("tarfile", "*"): _FILES,
        ("gzip", "open"): _FILES,
        ("bz2", "open"): _FILES,
        ("lzma", "open"): _FILES,
        ("sqlite3", "*"): _FILES,
        ("dbm", "*"): _FILES,
        ("mmap", "*"): _FILES,
        ("xmlrpc", "*"): _NET,
        ("socketserver", "*"): _NET,
        ("http.server", "*"): _NET,
        ("asyncio", "*"): _SHELL,
        ("concurrent.futures", "*"): "starts threads or processes",
        ("_posixsubprocess", "*"): _SHELL,
        ("_ctypes", "*"): "calls native code",
        ("uuid", "_popen"): _SHELL,
        ("operator", "call"): _ATTR,
        ("builtins", "type"): "creates classes at load time (gadget chains)",
        ("copyreg", "__newobj_ex__"): "instantiates any class with arguments",
        ("numpy.testing._private.utils", "runstring"): _CODE,
        ("numpy.f2py", "*"): _SHELL,
        ("numpy.distutils", "*"): _SHELL,
        ("torch.utils.cpp_extension", "*"): "compiles and loads native code",
        ("torch.package", "*"): _IMPORT,
        ("torch._inductor.codecache", "*"): "compiles and loads native code",
        ("torch.ops", "load_library"): "loads a native library",
        ("torch.classes", "load_library"): "loads a native library",
        ("torch.utils.data.datapipes.utils.decoder", "*"): _LOADER,
        ("pandas", "read_pickle"): _LOADER,
        ("pandas.io.pickle", "*"): _LOADER,
        ("yaml", "load"): _CODE,
        ("yaml", "unsafe_load"): _CODE,
        ("jinja2", "*"): "renders templates that can run code",
        ("IPython", "*"): _CODE,
        ("huggingface_hub", "*"): _NET,
        ("keras.models", "load_model"): _LOADER,
        ("dill", "loads"): _LOADER,
    }
)


def gadget(module: str, name: str) -> str | None:
    """What a known gadget does, or None. Module-wide entries end in ``*``."""
    return DENYLIST.get((module, name)) or DENYLIST.get((module, "*"))
