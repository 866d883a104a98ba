"""Plain pickles (protocols 0-5) and joblib dumps, uncompressed or compressed.

Layout (Lib/pickletools.py; joblib/numpy_pickle.py, compressor.py, numpy_pickle_compat.py):

- a pickle MUST be one opcode program ending at STOP; protocols 2-5 MUST open with PROTO
  (``0x80``, then the protocol); protocols 0/1 start with any opcode. Bytes after STOP are
  ignored with a warning;
- joblib (>= 0.10) pickles each numpy array as a ``joblib.numpy_pickle.NumpyArrayWrapper``
  (NEWOBJ, then BUILD with ``{subclass, shape, order, dtype, allow_mmap,
  numpy_array_alignment_bytes?}``) and writes the array right after that BUILD, in the
  stream and outside any pickle frame: when ``numpy_array_alignment_bytes`` is in the state
  (joblib >= 1.2), one byte ``p`` then ``p`` padding bytes; then ``prod(shape) * itemsize``
  raw bytes in ``order``. Arrays whose dtype holds objects are instead a nested protocol-5
  pickle of the array, in the same place;
- compressed joblib: that whole stream in one zlib (``78``), gzip (``1f 8b``), bz2
  (``BZh``), xz (``fd 37 7a 58 5a 00``) or lzma-alone (``5d 00 00``) stream; joblib < 0.10
  wrote ``ZF`` + a 19-character hex length + zlib data;
- joblib < 0.10 kept arrays in side files next to the pickle (``<name>_NN.npy``, or
  zlib-compressed ``<name>_NN.npy.z`` with ``compress``; see ``_joblib_side_files``); they
  are read with modelport's own readers when present, else reported; a ``.npy.z`` file on
  its own holds bytes without dtype or shape and is refused as no model;
- ``pickle.dumps(tensor)`` stores each storage as ``torch.storage._load_from_bytes(b)``
  with ``b`` a whole ``torch.save`` blob (see ``_torch_blob``).

Edge cases: a torch legacy file (first pickle is torch's magic number) and ``.npy`` files
are never claimed; decompression stops at ``limits.MAX_PICKLE_INFLATED`` (or half the RAM),
and at ``limits.MAX_INFLATION_RATIO`` times the compressed size, with
``LimitExceededError``; nothing named by the pickle is imported or called.
"""

from __future__ import annotations

import math
import mmap
import re
from pathlib import Path
from typing import Any, Final

from modelport import limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    MissingDependencyError,
    ModelportError,
    NotAModelError,
    TruncatedFileError,
    UnsupportedDtypeError,
)
from modelport.formats import npy
from modelport.formats._compressed import (
    Compression,
    InflationCap,
    compression_of,
    decompression_cap,
    inflate,
    stream_cap,
)
from modelport.formats._joblib_side_files import side_file_array, side_file_owner
from modelport.formats._legacy_stream import MAGIC_NUMBER
from modelport.formats._torch_blob import read_torch_blob
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.pickles.interface import Limits, Step
from modelport.pickles.machine import run
from modelport.pickles.numpy_types import NumpyArray, NumpyDType, tensor_from_raw
from modelport.pickles.reading import ReadingResolver
from modelport.pickles.records import ByteSpan, CallRecord, GlobalRef, ObjectRecord
from modelport.pickles.torch_types import TypedStorage

SNIFF_INFLATE = 4096
SNIFF_BZ2_INPUT = 1 << 20  # a bz2 block (at most 900 kB of input) must be whole to inflate
MAX_NAMED = 20  # globals listed in warnings

_JOBLIB = ("joblib", "sklearn.externals.joblib")
WRAPPERS: Final = frozenset(f"{m}.numpy_pickle.NumpyArrayWrapper" for m in _JOBLIB)
OLD_WRAPPERS: Final = frozenset(
    f"{m}.{sub}.{cls}"
    for m in _JOBLIB
    for sub in ("numpy_pickle", "numpy_pickle_compat")
    for cls in ("NDArrayWrapper", "ZNDArrayWrapper")
)
ALL_WRAPPERS: Final = WRAPPERS | OLD_WRAPPERS
LOAD_FROM_BYTES: Final = "torch.storage._load_from_bytes"
_START_OPCODES: Final = frozenset(b"(}])cNIJKLMFGSTUVXP")
_VALID_OPCODES: Final = frozenset(b"(.0123FIJKLMNPQRSTUVXabcdeghijlopqrstuBCG}])") | frozenset(
    range(0x80, 0x99)
)
_DTYPE_SPEC = re.compile(r"^[<>|=]?([biufcSaUVMm?])(\d*)(\[\w+\])?$")


def sniff(probe: Probe) -> bool:
    if probe.is_dir or not probe.head or probe.head.startswith(npy.MAGIC):
        return False
    kind = compression_of(probe.head)
    if kind is None:
        return _looks_like_pickle(
            probe.head, complete=probe.size <= len(probe.head), path=probe.path
        )
    return kind is Compression.JOBLIB_ZF or _holds_pickle(probe, kind)


def _holds_pickle(probe: Probe, kind: Compression) -> bool:
    """Whether the compressed stream starts with a pickle (a ``ZF`` file is joblib's either
    way: a pickle, or an array side file that ``read`` refuses with its diagnosis)."""
    head = probe.head
    if kind is Compression.BZ2 and probe.size > len(head):
        with open(probe.path, "rb") as handle:  # bz2 emits nothing before a whole block
            head = handle.read(SNIFF_BZ2_INPUT)
    try:
        inflated = inflate(memoryview(head), kind, InflationCap(SNIFF_INFLATE), partial=True)
    except MissingDependencyError:
        return True  # an LZ4 frame without lz4: reading it says what to install
    except ModelportError:
        return False
    return _looks_like_pickle(bytes(inflated), complete=False)


def _looks_like_pickle(data: bytes, *, complete: bool, path: Path | None = None) -> bool:
    if len(data) < 2:
        return False
    if data[0] == 0x80:  # PROTO 2-5, then an opcode: a pickle unless it is torch's magic
        if not (2 <= data[1] <= 5 and len(data) > 2 and data[2] in _VALID_OPCODES):
            return False
        return _first_value(data) is not _TORCH
    if data[0] not in _START_OPCODES:
        return False
    value = _first_value(data)
    if value is not _FAILED:
        return value is not _TORCH
    if complete or path is None:
        return False
    value = _first_value(_map(path), Limits(max_opcodes=1_000_000), limited_ok=True)
    return value is not _FAILED and value is not _TORCH


_FAILED = object()
_TORCH = object()


def _first_value(
    data: bytes | memoryview, limits: Limits | None = None, limited_ok: bool = False
) -> Any:
    """The first pickle's value, ``_FAILED``, or ``_TORCH`` for torch's magic number."""
    try:
        limits = limits or Limits()
        view = memoryview(data)
        resolver = PickleFileResolver(path=None, data=view, directory=None, limits=limits)
        value = run(view, resolver, limits=limits).value
    except LimitExceededError:
        return True if limited_ok else _FAILED
    except ModelportError:
        return _FAILED
    return _TORCH if isinstance(value, int) and value == MAGIC_NUMBER else value


# -- the resolver ----------------------------------------------------------------------------
class JoblibArray(NumpyArray):
    """A ``NumpyArrayWrapper`` (or joblib < 0.10 ``NDArrayWrapper``) becoming its array."""

    legacy: bool = False


class PickleFileResolver(ReadingResolver):
    """The reading resolver, plus joblib's in-stream arrays and torch's pickled storages."""

    def __init__(
        self, *, path: Path | None, data: memoryview, directory: Path | None, limits: Limits
    ) -> None:
        super().__init__(path=path, base_offset=0, data=data)
        self.directory = directory
        self.limits = limits
        self.warnings: list[str] = []
        self.named: set[str] = set()
        self.called: set[str] = set()
        self.facts: dict[str, int] = {}
        self.depth = 0
        self._dtype_flags: dict[int, tuple[NumpyDType, int]] = {}

    def _count(self, fact: str) -> None:
        self.facts[fact] = self.facts.get(fact, 0) + 1

    def find_global(self, module: Any, name: Any, at: Step | None) -> Any:
        found = super().find_global(module, name, at)
        if isinstance(found, GlobalRef):
            self.named.add(found.path)
        return found

    def call(self, func: Any, args: tuple[Any, ...], at: Step | None) -> Any:
        if isinstance(func, GlobalRef) and func.path == LOAD_FROM_BYTES and len(args) == 1:
            return self._torch_storage(args[0])
        result = super().call(func, args, at)
        return self._wrapper_or(result, at)

    def new(
        self, cls: Any, args: tuple[Any, ...], kwargs: dict[Any, Any] | None, at: Step | None
    ) -> Any:
        return self._wrapper_or(super().new(cls, args, kwargs, at), at)

    def _wrapper_or(self, result: Any, at: Step | None) -> Any:
        cls = result.cls if isinstance(result, ObjectRecord) else None
        if cls is None and isinstance(result, CallRecord) and isinstance(result.func, GlobalRef):
            cls = result.func
        if cls is not None and cls.path in ALL_WRAPPERS:
            array = JoblibArray()
            array.legacy = cls.path in OLD_WRAPPERS
            return array
        if isinstance(result, CallRecord) and isinstance(result.func, GlobalRef):
            self.called.add(result.func.path)
        return result

    def build(self, obj: Any, state: Any, at: Step | None) -> Any:
        if isinstance(obj, JoblibArray) and obj.tensor is None and obj.objects is None:
            if at is None:
                raise CorruptFileError("joblib array outside a pickle stream")
            if obj.legacy:
                return self._side_file(obj, state)
            return self._in_stream(obj, state, at)
        if (
            isinstance(obj, NumpyDType)
            and isinstance(state, tuple)
            and len(state) >= 8
            and isinstance(state[7], int)
        ):
            self._dtype_flags[id(obj)] = (obj, state[7])
        return super().build(obj, state, at)

    # joblib ------------------------------------------------------------------------------
    def _in_stream(self, array: JoblibArray, state: Any, at: Step) -> JoblibArray:
        if not isinstance(state, dict):
            raise CorruptFileError("joblib NumpyArrayWrapper state is not a dict")
        shape, order, dtype = state.get("shape"), state.get("order", "C"), state.get("dtype")
        if not isinstance(shape, tuple) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise CorruptFileError("joblib array shape must be a tuple of non-negative ints")
        if order not in ("C", "F") or not isinstance(dtype, NumpyDType):
            raise CorruptFileError("joblib array wrapper has no numpy dtype or a bad order")
        array.shape, array.dtype_text = shape, dtype.spec
        self._count("joblib_arrays")
        cursor = at.cursor
        if self._has_objects(dtype):
            return self._nested(array, cursor.position, at)
        if state.get("numpy_array_alignment_bytes") is not None:
            padding = cursor.read(1)[0]
            cursor.read(padding)
        itemsize = _itemsize(dtype)
        if itemsize is None:
            raise CorruptFileError(f"joblib array of unreadable dtype {dtype.spec!r}")
        start, nbytes = cursor.position, math.prod(shape) * itemsize
        cursor.read(nbytes)  # raises before anything is allocated when the file is short
        resolved = dtype.resolve()
        if resolved is None:
            self.warnings.append(f"joblib array of dtype {dtype.spec} left as a record")
            return array
        try:
            array.tensor = tensor_from_raw(
                ByteSpan(start, nbytes), resolved, shape, order == "F", self.storage_of
            )
        except UnsupportedDtypeError as exc:
            self.warnings.append(f"joblib array left as a record: {exc}")
        return array

    def _has_objects(self, dtype: NumpyDType) -> bool:
        if dtype.spec.lstrip("<>|=").startswith("O"):
            return True
        flags = self._dtype_flags.get(id(dtype))
        return flags is not None and bool(flags[1] & 1)  # NPY_ITEM_HASOBJECT

    def _nested(self, array: JoblibArray, start: int, at: Step) -> JoblibArray:
        if self.depth >= limits.MAX_PICKLE_NESTING:
            raise LimitExceededError(
                "nested joblib object arrays", limits.MAX_PICKLE_NESTING, self.depth + 1
            )
        if self.data is None:
            raise CorruptFileError("joblib object array without a source")
        self.depth += 1
        try:
            inner = run(self.data, self, start=start, limits=self.limits)
        finally:
            self.depth -= 1
        at.cursor.read(inner.end - start)
        if isinstance(inner.value, NumpyArray):
            array.tensor, array.objects = inner.value.tensor, inner.value.objects
        else:
            array.objects = [inner.value]
        return array

    def _side_file(self, array: JoblibArray, state: Any) -> JoblibArray:
        self._count("joblib_side_files")
        array.dtype_text = "side file"
        found = side_file_array(self.directory, state, self.warnings)
        if isinstance(found, NumpyArray):
            array.objects, array.shape = found.objects, found.shape
            array.dtype_text = found.dtype_text
        elif found is not None:
            array.tensor, array.shape, array.dtype_text = found, found.shape, found.dtype
        return array

    # torch -------------------------------------------------------------------------------
    def _torch_storage(self, raw: Any) -> Any:
        if isinstance(raw, ByteSpan) and self.data is not None:
            view = memoryview(self.data)[raw.offset : raw.offset + raw.length]
            offset = raw.offset if self.path is not None else None
        elif isinstance(raw, (bytes, bytearray)):
            view, offset = memoryview(bytes(raw)), None
        else:
            return CallRecord(GlobalRef("torch.storage", "_load_from_bytes"), (raw,))
        try:
            value, kind = read_torch_blob(view, path=self.path, file_offset=offset)
            if not isinstance(value, TypedStorage):
                raise CorruptFileError(f"the blob holds {value!r:.80}, not a storage")
        except ModelportError as exc:
            self.warnings.append(f"a pickled torch storage could not be read: {exc}")
            return CallRecord(GlobalRef("torch.storage", "_load_from_bytes"), (raw,))
        self._count(f"torch_{kind}_blobs")
        return value


def _itemsize(dtype: NumpyDType) -> int | None:
    match = _DTYPE_SPEC.match(dtype.spec)
    if match is None:
        return None
    kind, digits = match.group(1), match.group(2)
    if kind in "Mm":
        return 8
    if kind == "?":
        return 1
    if not digits:
        return None
    return int(digits) * (4 if kind == "U" else 1)


# -- reading ---------------------------------------------------------------------------------
def read(path: Path, probe: Probe) -> Contents:
    kind = compression_of(probe.head)
    details: dict[str, Any] = {}
    if kind is Compression.JOBLIB_ZF and not _holds_pickle(probe, kind):
        owner = side_file_owner(path)
        raise NotAModelError(
            "a joblib < 0.10 compressed array side file: zlib-compressed array bytes whose "
            "dtype and shape only the pickle naming it holds; open "
            + (f"{owner.name!r}, which does," if owner else "that pickle")
            + " instead",
            kind="joblib-side-file",
            path=path,
        )
    if kind is not None:
        with open(path, "rb") as handle:
            raw = handle.read()
        cap = stream_cap(len(raw), decompression_cap())
        inflated = inflate(memoryview(raw), kind, cap, partial=False)
        del raw
        details.update(compression=kind.value, decompressed_bytes=len(inflated))
        if not _looks_like_pickle(bytes(inflated[:SNIFF_INFLATE]), complete=False):
            raise CorruptFileError(f"{kind.value} stream does not hold a pickle", path=path)
        return _interpret(memoryview(inflated).toreadonly(), None, path, details)
    if probe.size == 0:
        raise TruncatedFileError("empty pickle", expected=1, actual=0, path=path)
    return _interpret(_map(path), path, path, details)


def _map(path: Path) -> memoryview:
    """The file as a read-only memory map. It closes when the last view of it goes: an
    explicit close would fail while results or tracebacks still hold slices."""
    with open(path, "rb") as handle:
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))


def _interpret(
    data: memoryview, source: Path | None, path: Path, details: dict[str, Any]
) -> Contents:
    limits = Limits()
    resolver = PickleFileResolver(path=source, data=data, directory=path.parent, limits=limits)
    try:
        result = run(data, resolver, limits=limits)
    except CorruptFileError as exc:
        if exc.path is None:
            raise CorruptFileError(str(exc), path=path) from None
        raise
    if isinstance(result.value, int) and result.value == MAGIC_NUMBER:
        raise CorruptFileError("a torch legacy checkpoint, not a plain pickle", path=path)
    warnings = list(resolver.warnings)
    if result.end < len(data):
        warnings.append(f"{len(data) - result.end} bytes after the pickle's STOP were not read")
    if resolver.called:
        names = sorted(resolver.called)
        warnings.append(
            f"the pickle calls {len(names)} function(s) modelport does not run (recorded as "
            "calls): " + ", ".join(names[:MAX_NAMED])
        )
    if "joblib_side_files" in resolver.facts:
        warnings.append("joblib < 0.10 format: arrays live in side files next to the pickle")
    details.update(
        pickle_protocol=result.protocol,
        opcodes=result.opcodes,
        globals=sorted(resolver.named)[: MAX_NAMED * 5],
        **resolver.facts,
    )
    if resolver.facts.get("joblib_arrays") or resolver.facts.get("joblib_side_files"):
        details["joblib"] = True
    return Contents(Format.PICKLE, result.value, details=details, warnings=warnings)


READER = FormatReader(Format.PICKLE, sniff, read, (".pkl", ".pickle", ".joblib", ".dat"))
