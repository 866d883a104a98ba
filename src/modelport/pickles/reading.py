"""The resolver that reads pickles: an exact allowlist of pure reconstructors, records for the rest.

``find_global`` returns one of three things: a constant (``torch.float32``), a ``Trusted``
reconstructor that modelport itself implements (``torch._utils._rebuild_tensor_v2``), or a
``GlobalRef`` record. Only ``Trusted`` values are ever called, and they are modelport's own
functions, never the named object. Every entry in the tables carries the reason it is there.
"""

from __future__ import annotations

import _compat_pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from modelport import dtypes
from modelport.errors import CorruptFileError, ModelportError
from modelport.pickles import numpy_types, torch_types
from modelport.pickles.interface import Limits, PickleResult, Step, Value, fill
from modelport.pickles.machine import run
from modelport.pickles.records import ByteSpan, CallRecord, GlobalRef, ObjectRecord
from modelport.tensors import Storage, byte_array

Reconstructor = Callable[["ReadingResolver", tuple[Any, ...]], Any]


class Trusted(Value):
    """An allowlisted global: calling it runs modelport's ``reconstruct``, nothing else."""

    FIELDS = ("module", "name", "reconstruct")
    __slots__ = FIELDS
    module: str
    name: str
    reconstruct: Reconstructor

    def __init__(self, module: str, name: str, reconstruct: Reconstructor) -> None:
        fill(self, module=module, name=name, reconstruct=reconstruct)

    def __repr__(self) -> str:
        return f"<trusted {self.module}.{self.name}>"


class PickledDict(OrderedDict[Any, Any]):
    """``collections.OrderedDict`` as pickled; BUILD state (torch's ``_metadata``) kept aside."""

    pickle_state: Any = None


class PersistentRef(Value):
    """A persistent id no storage loader claimed."""

    FIELDS = ("pid",)
    __slots__ = FIELDS
    pid: Any

    def __init__(self, pid: Any) -> None:
        fill(self, pid=pid)


def _plain(*types: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, types)


_SEQUENCE = _plain(list, tuple, set, frozenset)
_SMALL = 1 << 20


def _builtin(kind: type, check: Callable[[Any], bool]) -> Reconstructor:
    """Call a builtin constructor only on plain, bounded data; anything else stays a record."""

    def reconstruct(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
        if all(check(a) for a in args) and all(
            len(a) <= _SMALL for a in args if isinstance(a, (list, tuple, set, frozenset, dict))
        ):
            return kind(*args)
        return CallRecord(GlobalRef("builtins", kind.__name__), args)

    return reconstruct


def _codecs_encode(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    if len(args) in (1, 2) and isinstance(args[0], str) and args[-1] in ("utf-8", "utf8"):
        return args[0].encode("utf-8")
    return CallRecord(GlobalRef("_codecs", "encode"), args)


def _copyreg_reconstructor(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
    cls = args[0] if args else None
    if isinstance(cls, GlobalRef):
        return ObjectRecord(cls, args[1:])
    return CallRecord(GlobalRef("copyreg", "_reconstructor"), args)


def _newobj(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
    if args and isinstance(args[0], GlobalRef):
        return ObjectRecord(args[0], args[1:])
    return CallRecord(GlobalRef("copyreg", "__newobj__"), args)


def _ordered_dict(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
    result = PickledDict()
    if args and isinstance(args[0], (list, tuple)):
        for pair in args[0]:
            if isinstance(pair, (list, tuple)) and len(pair) == 2:
                result[pair[0]] = pair[1]
    return result


def _args(fn: Callable[..., Any]) -> Reconstructor:
    return lambda resolver, args: fn(*args)


def _frombuffer(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
    if len(args) != 4:
        raise CorruptFileError("numpy pickle: _frombuffer takes (buffer, dtype, shape, order)")
    return numpy_types.frombuffer(*args, resolver.storage_of)


def _jit_list(name: str) -> Reconstructor:
    """``torch.jit._pickle.build_{int,double,bool,tensor}list(data)`` return ``data``."""

    def reconstruct(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
        if len(args) == 1 and isinstance(args[0], list):
            return args[0]
        return CallRecord(GlobalRef(_JIT_PICKLE, name), args)

    return reconstruct


def _jit_restore_type_tag(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
    """``restore_type_tag(value, type_str)`` returns ``value`` (the tag is for C++ only)."""
    if len(args) == 2 and isinstance(args[1], str):
        return args[0]
    return CallRecord(GlobalRef(_JIT_PICKLE, "restore_type_tag"), args)


def _jit_tensor_from_id(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
    """``build_tensor_from_id(data)`` returns ``data`` if it is an int, else None."""
    return args[0] if len(args) == 1 and type(args[0]) is int else None


def _layout(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
    """``torch.serialization._get_layout("torch.sparse_coo")``: a layout named by a string."""
    if len(args) == 1 and isinstance(args[0], str) and args[0] in _LAYOUTS:
        return torch_types.TorchConstant(args[0].removeprefix("torch."))
    return CallRecord(GlobalRef("torch.serialization", "_get_layout"), args)


_LAYOUTS = frozenset(
    f"torch.{name}"
    for name in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc")
)


def _version_text(resolver: ReadingResolver, args: tuple[Any, ...]) -> Any:
    """``torch.torch_version.TorchVersion('2.1.0')``: the text of a version, kept as text."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return CallRecord(GlobalRef("torch.torch_version", "TorchVersion"), args)


_JIT_PICKLE = "torch.jit._pickle"
_TORCH_UTILS = "torch._utils"
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")

CALLABLES: Final[MappingProxyType[tuple[str, str], tuple[Reconstructor, str]]] = MappingProxyType(
    {
        ("collections", "OrderedDict"): (_ordered_dict, "every torch state_dict is an OrderedDict"),
        ("torch.torch_version", "TorchVersion"): (
            _version_text,
            "torch.__version__ saved in checkpoints (Lightning's hyper_parameters): a str subclass",
        ),
        ("builtins", "set"): (_builtin(set, _SEQUENCE), "plain data"),
        ("builtins", "frozenset"): (_builtin(frozenset, _SEQUENCE), "plain data"),
        ("builtins", "bytearray"): (_builtin(bytearray, _plain(bytes, list)), "plain data"),
        ("builtins", "bytes"): (_builtin(bytes, _plain(bytes, list)), "plain data"),
        ("builtins", "complex"): (_builtin(complex, _plain(int, float)), "plain data"),
        ("builtins", "slice"): (_builtin(slice, _plain(int, type(None))), "plain data"),
        ("builtins", "range"): (
            _builtin(range, _plain(int)),
            "plain data: a range object (Python 2's xrange maps here), built in constant time",
        ),
        ("builtins", "list"): (_builtin(list, _SEQUENCE), "plain data"),
        ("builtins", "tuple"): (_builtin(tuple, _SEQUENCE), "plain data"),
        ("builtins", "dict"): (_builtin(dict, _plain(dict, list)), "plain data"),
        ("_codecs", "encode"): (_codecs_encode, "protocol-2 pickles spell bytes as latin-1 text"),
        ("copyreg", "_reconstructor"): (_copyreg_reconstructor, "protocol 0/1 object creation"),
        ("copyreg", "__newobj__"): (_newobj, "protocol 2 object creation"),
        (_TORCH_UTILS, "_rebuild_tensor"): (_args(torch_types.rebuild_tensor), "torch tensors"),
        (_TORCH_UTILS, "_rebuild_tensor_v2"): (
            _args(torch_types.rebuild_tensor_v2),
            "torch tensors",
        ),
        (_TORCH_UTILS, "_rebuild_tensor_v3"): (
            _args(torch_types.rebuild_tensor_v3),
            "torch tensors",
        ),
        (_TORCH_UTILS, "_rebuild_parameter"): (
            _args(torch_types.rebuild_parameter),
            "nn.Parameter",
        ),
        (_TORCH_UTILS, "_rebuild_parameter_with_state"): (
            _args(torch_types.rebuild_parameter),
            "nn.Parameter with Python attributes",
        ),
        (_TORCH_UTILS, "_rebuild_qtensor"): (
            _args(torch_types.rebuild_qtensor),
            "quantized tensors",
        ),
        (_TORCH_UTILS, "_rebuild_meta_tensor_no_storage"): (
            _args(torch_types.rebuild_meta_tensor),
            "tensors saved without data",
        ),
        (_TORCH_UTILS, "_rebuild_device_tensor_from_numpy"): (
            _args(torch_types.rebuild_from_numpy),
            "tensors of devices without storages",
        ),
        (_TORCH_UTILS, "_rebuild_device_tensor_from_cpu_tensor"): (
            _args(torch_types.rebuild_from_numpy),
            "tensors of devices without storages",
        ),
        (_TORCH_UTILS, "_rebuild_sparse_tensor"): (
            _args(torch_types.rebuild_sparse_tensor),
            "sparse tensors",
        ),
        ("torch._tensor", "_rebuild_from_type_v2"): (
            lambda r, a: (
                r.call(a[0], a[2], None)
                if len(a) >= 3 and isinstance(a[2], tuple)
                else CallRecord(GlobalRef("torch._tensor", "_rebuild_from_type_v2"), a)
            ),
            "tensor subclasses: rebuilds through an allowlisted function only",
        ),
        ("torch", "Size"): (_args(torch_types.torch_size), "tensor shapes"),
        ("torch.serialization", "_get_layout"): (_layout, "sparse tensor layouts, by name"),
        ("torch", "device"): (_args(torch_types.torch_device), "device names"),
        **{
            (_JIT_PICKLE, name): (_jit_list(name), "TorchScript typed lists (identity in torch)")
            for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")
        },
        (_JIT_PICKLE, "restore_type_tag"): (
            _jit_restore_type_tag,
            "TorchScript container type tags (identity in torch)",
        ),
        (_JIT_PICKLE, "build_tensor_from_id"): (
            _jit_tensor_from_id,
            "TorchScript tensor ids (an int or None in torch)",
        ),
        **{
            (m, "_reconstruct"): (_args(numpy_types.reconstruct), "numpy arrays")
            for m in _NUMPY_CORE
        },
        # numpy 1.0's home of the same function, which numpy still resolves for old pickles
        # (``numpy/core/_internal.py``: ``ndarray.__new__(subtype, shape, dtype)``)
        ("numpy.core._internal", "_reconstruct"): (
            _args(numpy_types.reconstruct),
            "numpy arrays pickled by numpy 1.0",
        ),
        **{(m, "scalar"): (_args(numpy_types.scalar), "numpy scalars") for m in _NUMPY_CORE},
        ("numpy", "dtype"): (_args(numpy_types.NumpyDType), "numpy dtypes"),
        ("numpy.core.numeric", "_frombuffer"): (_frombuffer, "numpy arrays, protocol 5"),
        ("numpy._core.numeric", "_frombuffer"): (_frombuffer, "numpy arrays, protocol 5"),
    }
)

# The names numpy's scalar types pickle under (``type.__name__``), numpy 1.x spellings too.
_NUMPY_SCALAR_TYPES = (
    *(f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)),
    *("float16", "float32", "float64", "longdouble", "complex64", "complex128", "clongdouble"),
    *("bool", "bool_", "longlong", "ulonglong", "str_", "bytes_", "unicode_", "string_"),
    *("object_", "datetime64", "timedelta64"),
)

CONSTANTS: Final[MappingProxyType[tuple[str, str], tuple[Any, str]]] = MappingProxyType(
    {
        **{
            ("torch", attr): (torch_types.TorchDType(name), "dtype")
            for attr, name in dtypes.TORCH_DTYPE_ATTRS.items()
        },
        **{
            ("torch", cls): (torch_types.StorageType(name), "storage type")
            for cls, name in dtypes.TORCH_STORAGE_TYPES.items()
        },
        **{
            ("torch.cuda", cls): (torch_types.StorageType(name), "storage type of a CUDA save")
            for cls, name in dtypes.TORCH_STORAGE_TYPES.items()
        },
        ("torch.storage", "UntypedStorage"): (torch_types.StorageType("uint8"), "storage type"),
        **{
            (module, f"{kind}Tensor"): (
                torch_types.TorchConstant(f"{kind}Tensor"),
                "legacy tensor type (torch 0.x saves)",
            )
            for module in ("torch", "torch.cuda")
            for kind in (
                "Float",
                "Double",
                "Half",
                "BFloat16",
                "Long",
                "Int",
                "Short",
                "Char",
                "Byte",
                "Bool",
            )
        },
        **{
            ("torch", name): (torch_types.TorchConstant(name), "layout, memory format or qscheme")
            for name in (
                "strided",
                "sparse_coo",
                "sparse_csr",
                "sparse_csc",
                "sparse_bsr",
                "sparse_bsc",
                "contiguous_format",
                "channels_last",
                "channels_last_3d",
                "preserve_format",
                "per_tensor_affine",
                "per_channel_affine",
                "per_tensor_symmetric",
                "per_channel_symmetric",
                "per_channel_affine_float_qparams",
            )
        },
        ("numpy", "ndarray"): (GlobalRef("numpy", "ndarray"), "the class _reconstruct receives"),
        **{
            ("numpy", name): (
                GlobalRef("numpy", name),
                "a numpy scalar type given as a dtype (scikit-learn's TfidfVectorizer keeps "
                "dtype=np.float64); numpy pickles scalars through its own scalar(), never by "
                "calling the type",
            )
            for name in _NUMPY_SCALAR_TYPES
        },
        ("builtins", "object"): (GlobalRef("builtins", "object"), "base class copyreg names"),
        **{
            ("builtins", name): (
                GlobalRef("builtins", name),
                "a builtin a model keeps as a setting (gensim's hashfxn=hash, a dtype given as "
                "int); pickle writes these types' values natively, never by calling them",
            )
            for name in ("int", "float", "bool", "str", "hash")
        },
    }
)

StorageLoader = Callable[[Any], Any]


class ReadingResolver:
    """Gives opcodes the meaning of a careful reader: reconstruct data, record everything else."""

    def __init__(
        self,
        *,
        storage_loader: StorageLoader | None = None,
        path: Path | None = None,
        base_offset: int = 0,
        data: bytes | memoryview | None = None,
    ) -> None:
        self.storage_loader = storage_loader
        self.path = path
        self.base_offset = base_offset
        self.data = data

    # names ---------------------------------------------------------------------------------
    def find_global(self, module: Any, name: Any, at: Step | None) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            return GlobalRef(str(module), str(name))
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in CONSTANTS:
            return CONSTANTS[module, name][0]
        if (module, name) in CALLABLES:
            return Trusted(module, name, CALLABLES[module, name][0])
        return GlobalRef(module, name)

    # calls -----------------------------------------------------------------------------------
    def call(self, func: Any, args: tuple[Any, ...], at: Step | None) -> Any:
        if isinstance(func, Trusted):
            try:
                return func.reconstruct(self, args)
            except ModelportError:
                raise
            except (TypeError, ValueError, IndexError, OverflowError, MemoryError) as exc:
                raise CorruptFileError(
                    f"pickle: {func.module}.{func.name} called with unexpected arguments ({exc})"
                ) from None
        return CallRecord(func, args)

    def new(
        self, cls: Any, args: tuple[Any, ...], kwargs: dict[Any, Any] | None, at: Step | None
    ) -> Any:
        if isinstance(cls, Trusted):
            return self.call(cls, args, at)
        if isinstance(cls, GlobalRef):
            return ObjectRecord(cls, args, kwargs)
        return CallRecord(cls, args)

    def build(self, obj: Any, state: Any, at: Step | None) -> Any:
        if isinstance(obj, (ObjectRecord, CallRecord)):
            if isinstance(obj.state, dict) and isinstance(state, dict):
                obj.state.update(state)
            else:
                obj.state = state
        elif isinstance(obj, numpy_types.NumpyArray):
            numpy_types.build_array(obj, state, self.storage_of)
        elif isinstance(obj, numpy_types.NumpyDType):
            obj.setstate(state)
        elif isinstance(obj, PickledDict):
            obj.pickle_state = state
        return obj

    def append(self, target: Any, items: list[Any], at: Step | None) -> None:
        if isinstance(target, (ObjectRecord, CallRecord)):
            target.list_items.extend(items)
        elif isinstance(target, set):
            target.update(items)
        else:
            raise CorruptFileError(f"pickle: APPEND to a {type(target).__name__}")

    def set_items(self, target: Any, pairs: list[tuple[Any, Any]], at: Step | None) -> None:
        if isinstance(target, (ObjectRecord, CallRecord)):
            target.dict_items.update(pairs)
        elif isinstance(target, dict):
            for key, value in pairs:
                try:
                    target[key] = value
                except TypeError:
                    raise CorruptFileError("pickle: unhashable dictionary key") from None
        else:
            raise CorruptFileError(f"pickle: SETITEM on a {type(target).__name__}")

    def persistent_load(self, pid: Any, at: Step | None) -> Any:
        if self.storage_loader is not None:
            return self.storage_loader(pid)
        return PersistentRef(pid)

    def extension(self, code: int, at: Step | None) -> Any:
        return GlobalRef("copyreg", f"<extension code {code}>")

    def next_buffer(self, at: Step | None) -> Any:
        raise CorruptFileError("pickle refers to out-of-band buffers, which a file cannot carry")

    # raw bytes --------------------------------------------------------------------------------
    def storage_of(self, raw: ByteSpan | bytes | bytearray) -> Storage:
        """A storage for array bytes found in the pickle: in place in the file when possible."""
        if isinstance(raw, ByteSpan):
            if self.path is not None:
                start = self.base_offset + raw.offset
                return Storage(self.path, start, raw.length, key=f"@{start}")
            if self.data is None:
                raise CorruptFileError("pickle: byte span without a source")
            chunk = memoryview(self.data)[raw.offset : raw.offset + raw.length]
            return Storage(None, 0, raw.length, reader=lambda: byte_array(chunk))
        frozen = bytes(raw)
        return Storage(None, 0, len(frozen), reader=lambda: byte_array(frozen))


def read_pickle(
    data: bytes | memoryview,
    *,
    start: int = 0,
    path: Path | None = None,
    base_offset: int = 0,
    storage_loader: StorageLoader | None = None,
    limits: Limits | None = None,
) -> PickleResult:
    """Interpret one pickle without executing it; ``path``/``base_offset`` locate ``data`` in a
    file so that large byte payloads (numpy arrays) become lazy storages there."""
    resolver = ReadingResolver(
        storage_loader=storage_loader, path=path, base_offset=base_offset, data=data
    )
    return run(data, resolver, start=start, limits=limits or Limits())
