"""torch zip checkpoints: what ``torch.save`` writes since torch 1.6.

Layout (torch/serialization.py; the prefix is the file's stem, ``archive`` for file objects):

- ``<prefix>/data.pkl``: the object tree as a pickle; each storage is a persistent id
  ``("storage", <torch.XStorage>, key, location, numel)``;
- ``<prefix>/data/<key>``: each storage's raw bytes, stored uncompressed, 64-byte aligned;
- ``<prefix>/byteorder`` (``little`` or ``big``), ``<prefix>/version``, ``.format_version``,
  ``.storage_alignment``, ``.data/serialization_id``: bookkeeping.

TorchScript archives (``code/``, ``constants.pkl``) and ``torch.export`` archives
(``models/``) are zips too; their own modules claim them first.

Writing (``write``) mirrors what torch 2.13's ``torch.save`` writes for a state_dict, so
that ``torch.load(path, weights_only=True)``, with or without ``mmap=True``, returns an
``OrderedDict`` equal bit for bit:

- the prefix is ``archive`` (torch's choice for file objects: the writer only sees a
  temporary file, never the final name);
- ``data.pkl`` is a protocol 2 pickle written opcode by opcode (torch is never imported):
  ``collections.OrderedDict()``, then for each tensor ``name ->
  torch._utils._rebuild_tensor_v2(<persistent id>, storage_offset, size, stride, False,
  OrderedDict())`` with the persistent id ``("storage", torch.<X>Storage, key, "cpu",
  numel)``; dtypes without a legacy storage class (float8, uint16/32/64, complex32,
  float4) use ``_rebuild_tensor_v3`` with ``torch.storage.UntypedStorage``, ``numel`` in
  bytes and the dtype (``torch.float8_e4m3fn``) as a last argument, as torch does;
- members in torch's order: ``data.pkl``, ``.format_version`` (``1``),
  ``.storage_alignment`` (``64``), ``byteorder`` (``little``), ``data/<key>`` (keys ``0``,
  ``1`` ... in order of first use), ``extra/modelport.json`` (the plan's metadata, only
  when there is some: ``torch.load`` ignores members it does not know, and the reader
  below returns it as the file's metadata), ``version`` (``3``), ``.data/serialization_id``
  (40 digits derived from ``data.pkl``, so equal plans give equal files);
- every member is stored and 64-byte aligned (``_zip_writer``), zip64 past 4 GiB;
- tensors that are not cast and share one source ``Storage`` (tied weights, views) share one
  record: it holds the span of the storage their elements reach, each keeps its offset in
  it and its strides, so ``torch.load`` returns tensors sharing memory as the original did.
  A cast tensor, an empty one, or one without a flat source gets a record of its own,
  contiguous;
- a plan with a ``tree`` (``convert --all`` of a nested checkpoint) pickles that tree
  instead of the flat ``OrderedDict`` (``_torch_tree``: dicts, lists, tuples, numbers,
  strings, bytes around the same tensor calls); its typed JSON copy in the metadata
  (``typed_json.KEY``) is not written again.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from modelport import dtypes, limits
from modelport.errors import (
    ConversionError,
    CorruptFileError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from modelport.formats._torch_tree import pickle_tree
from modelport.formats._zip import ZipDirectory, ZipEntry
from modelport.formats._zip_writer import ZipWriter
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.pickles.reading import read_pickle
from modelport.pickles.torch_types import StorageType, TypedStorage
from modelport.tensors import NDArray, Storage, TensorRef, byte_array, contiguous_strides
from modelport.transfer.streaming import write_tensor
from modelport.transfer.write_plan import OutputTensor, WritePlan
from modelport.tree.typed_json import KEY as TREE_KEY

PREFIX = "archive"
METADATA_MEMBER = "extra/modelport.json"
ALIGNMENT = 64
SETITEMS_BATCH = 1000  # what pickle's own batching uses
# torch's legacy typed storage classes; other dtypes are saved through _rebuild_tensor_v3
LEGACY_STORAGES = {
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "complex128": "ComplexDoubleStorage",
    "complex64": "ComplexFloatStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}
COPY_ONLY = frozenset({"complex32", "float4_e2m1fn_x2"})  # numpy cannot cast into these
UNTYPED_DTYPES = frozenset(
    {
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "uint16",
        "uint32",
        "uint64",
        "complex32",
        "float4_e2m1fn_x2",
    }
)


def archive_prefix(directory: ZipDirectory) -> str | None:
    """The folder holding ``data.pkl`` (torch takes the first record's top-level folder)."""
    names = directory.names()
    if not names:
        return None
    first = names[0].split("/", 1)[0]
    if f"{first}/data.pkl" in names:
        return first
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            return parts[0]
    return None


def sniff(probe: Probe) -> bool:
    return probe.zip is not None and archive_prefix(probe.zip) is not None


def check_byte_order(directory: ZipDirectory, prefix: str, path: Path, kind: str) -> None:
    """Little-endian data is all this reads; torch itself refuses a record that is neither
    byte order, so one is damage, not a big-endian file."""
    order = directory.find(f"{prefix}/byteorder")
    record = b"" if order is None else directory.read_member(order, 16).strip()
    if record == b"big":
        raise UnsupportedVersionError(f"big-endian {kind} are not supported yet", path=path)
    if record not in (b"little", b""):
        raise CorruptFileError(
            f"{prefix}/byteorder holds {record[:16]!r}, not 'little' or 'big' as torch writes "
            "it; the archive is damaged",
            path=path,
        )


def load_archive_pickle(
    directory: ZipDirectory, prefix: str, member: str, path: Path, *, data_dir: str = "data"
) -> tuple[Any, dict[str, Any]]:
    """Interpret ``<prefix>/<member>`` with storages resolved to ``<prefix>/<data_dir>/<key>``.

    Returns the tree and facts gathered on the way (storage locations). Shared by the
    TorchScript reader, whose archives use the same storage scheme (``constants.pkl`` keeps
    its storages under ``constants/``).
    """
    entry = directory.find(f"{prefix}/{member}")
    if entry is None:
        raise CorruptFileError(f"archive has no {prefix}/{member}", path=path)
    check_byte_order(directory, prefix, path, "torch archives")
    storages: dict[str, TypedStorage] = {}
    locations: set[str] = set()

    def load_storage(pid: Any) -> TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CorruptFileError(f"unexpected persistent id {pid!r:.80}", path=path)
        _, storage_type, key, location, numel = pid[:5]
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0:
            raise CorruptFileError(f"malformed storage id for key {key!r}", path=path)
        key = str(key)
        locations.add(str(location))
        cached = storages.get(key)
        if cached is not None:
            return cached
        record = directory.find(f"{prefix}/{data_dir}/{key}")
        if record is None:
            raise CorruptFileError(f"storage {key!r} is missing from the archive", path=path)
        nbytes = numel * dtypes.dtype(storage_type.dtype).itemsize
        if record.size < nbytes:
            raise TruncatedFileError(
                f"storage {key!r} holds {record.size} bytes, its tensors need {nbytes}",
                expected=nbytes,
                actual=record.size,
                path=path,
            )
        reader = None if record.is_stored else _inflating_reader(directory, record, nbytes)
        storage = Storage(path, record.data_offset, nbytes, key, reader, str(location))
        typed = TypedStorage(storage, storage_type.dtype, numel, str(location))
        storages[key] = typed
        return typed

    data = directory.read_member(entry)
    base = entry.data_offset if entry.is_stored else 0
    result = read_pickle(
        data, path=path if entry.is_stored else None, base_offset=base, storage_loader=load_storage
    )
    return result.value, {"storages": len(storages), "devices": sorted(locations)}


def _inflating_reader(
    directory: ZipDirectory, record: ZipEntry, nbytes: int
) -> Callable[[], NDArray]:
    """Storages written compressed (by zip tools, not torch) are inflated on first read."""

    def read_bytes() -> NDArray:
        return byte_array(directory.read_member(record)[:nbytes])

    return read_bytes


def read(path: Path, probe: Probe) -> Contents:
    directory: ZipDirectory = probe.zip_directory()
    prefix = archive_prefix(directory)
    if prefix is None:
        raise CorruptFileError("zip archive has no data.pkl", path=path)
    tree, facts = load_archive_pickle(directory, prefix, "data.pkl", path)
    version = directory.find(f"{prefix}/version")
    details: dict[str, Any] = {"archive_prefix": prefix, **facts}
    if version is not None:
        details["archive_version"] = (
            directory.read_member(version, 64).decode("ascii", "replace").strip()
        )
    warnings = [f"zip member name escapes the archive: {name!r}" for name in directory.unsafe_names]
    metadata = _metadata(directory, prefix, warnings)
    return Contents(Format.TORCH_ZIP, tree, metadata=metadata, details=details, warnings=warnings)


def _metadata(directory: ZipDirectory, prefix: str, warnings: list[str]) -> dict[str, Any]:
    """The string metadata modelport's writer stores in ``extra/modelport.json``, if any."""
    entry = directory.find(f"{prefix}/{METADATA_MEMBER}")
    if entry is None:
        return {}
    try:
        value = json.loads(
            directory.read_member(entry, limits.MAX_TORCH_ZIP_METADATA).decode("utf-8")
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        warnings.append(f"{METADATA_MEMBER} is not a JSON object of strings: ignored")
        return {}
    return value


def holds(dtype: str) -> bool:
    return dtype in LEGACY_STORAGES or dtype in UNTYPED_DTYPES


@dataclass(frozen=True)
class _Record:
    """One ``data/<key>`` member: which bytes it holds (as a tensor to stream) and its type."""

    key: str
    dtype: str
    content: OutputTensor

    @property
    def numel(self) -> int:
        return self.content.nbytes // dtypes.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class _Placed:
    """A tensor of the plan as the pickle describes it: a view of one record."""

    name: str
    record: _Record
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _extent(tensor: TensorRef) -> int:
    """Elements from the tensor's first one to one past its last, in its storage."""
    if tensor.strides is None:
        return tensor.numel
    return sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides, strict=True)) + 1


def place(plan: WritePlan) -> list[_Placed]:
    """Assign each tensor a record; uncast tensors over one source storage share one."""
    spans: dict[tuple[Storage, str], tuple[int, int]] = {}
    for tensor in plan.tensors:
        group = _group(tensor)
        if group is not None:
            start = tensor.source.element_offset
            end = start + _extent(tensor.source)
            low, high = spans.get(group, (start, end))
            spans[group] = (min(low, start), max(high, end))
    shared: dict[tuple[Storage, str], _Record] = {}
    placed: list[_Placed] = []
    count = 0
    for tensor in plan.tensors:
        source = tensor.source
        group = _group(tensor)
        if group is None:
            record = _Record(str(count), tensor.dtype, tensor)
            count += 1
            strides = contiguous_strides(tensor.shape)
            placed.append(_Placed(tensor.name, record, 0, tensor.shape, strides))
            continue
        low, high = spans[group]
        if group not in shared:
            shared[group] = _span_record(str(count), group[0], source.dtype, low, high)
            count += 1
        strides = source.strides or contiguous_strides(source.shape)
        offset = source.element_offset - low
        placed.append(_Placed(tensor.name, shared[group], offset, source.shape, strides))
    return placed


def _group(tensor: OutputTensor) -> tuple[Storage, str] | None:
    """What an uncast, non-empty tensor over a stored source shares its record by."""
    source = tensor.source
    if tensor.is_cast or source.storage is None or source.numel == 0:
        return None
    return source.storage, source.dtype


def _span_record(key: str, storage: Storage, dtype: str, low: int, high: int) -> _Record:
    """A record holding elements ``low .. high`` of ``storage``, streamed as raw bytes."""
    itemsize = dtypes.dtype(dtype).itemsize
    if low < 0 or high * itemsize > storage.nbytes:
        raise CorruptFileError(
            f"tensors reach elements {low}..{high} of storage {storage.key!r}, which holds "
            f"{storage.nbytes // itemsize}"
        )
    length = (high - low) * itemsize
    raw = TensorRef("uint8", (length,), storage, low * itemsize)
    return _Record(key, dtype, OutputTensor(f"storage {storage.key!r}", "uint8", raw))


class _Pickle:
    """The protocol 2 opcodes ``torch.save`` emits for a state_dict, with a memo for the
    globals and strings it repeats."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo: dict[tuple[str, str], int] = {}

    def _remember(self, key: tuple[str, str]) -> None:
        index = len(self.memo)
        self.memo[key] = index
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def _recall(self, key: tuple[str, str]) -> bool:
        index = self.memo.get(key)
        if index is None:
            return False
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        return True

    def global_(self, module: str, name: str) -> None:
        if not self._recall((module, name)):
            self.out += b"c" + f"{module}\n{name}\n".encode()
            self._remember((module, name))

    def text(self, value: str, *, memo: bool = False) -> None:
        if memo and self._recall(("", value)):
            return
        raw = value.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(raw)) + raw
        if memo:
            self._remember(("", value))

    def integer(self, value: int) -> None:
        if 0 <= value < 1 << 8:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 1 << 16:
            self.out += b"M" + struct.pack("<H", value)
        elif -(1 << 31) <= value < 1 << 31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            raw = value.to_bytes((value.bit_length() >> 3) + 1, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def ints(self, values: tuple[int, ...]) -> None:
        if len(values) > 3:
            self.out += b"("
        for value in values:
            self.integer(value)
        self.out += (b")", b"\x85", b"\x86", b"\x87")[len(values)] if len(values) <= 3 else b"t"

    def ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"

    def tensor(self, item: _Placed) -> None:
        record = item.record
        untyped = record.dtype in UNTYPED_DTYPES
        self.global_("torch._utils", "_rebuild_tensor_v3" if untyped else "_rebuild_tensor_v2")
        self.out += b"(("
        self.text("storage", memo=True)
        if untyped:
            self.global_("torch.storage", "UntypedStorage")
        else:
            self.global_("torch", LEGACY_STORAGES[record.dtype])
        self.text(record.key, memo=True)
        self.text("cpu", memo=True)
        self.integer(record.content.nbytes if untyped else record.numel)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.integer(item.offset)
        self.ints(item.shape)
        self.ints(item.strides)
        self.out += b"\x89"  # requires_grad False
        self.ordered_dict()  # backward hooks
        if untyped:
            self.global_("torch", record.dtype)
        self.out += b"tR"


def pickle_bytes(placed: list[_Placed]) -> bytes:
    """``data.pkl`` for ``placed``: an OrderedDict of name -> tensor."""
    out = _Pickle()
    out.ordered_dict()
    for start in range(0, len(placed), SETITEMS_BATCH):
        out.out += b"("
        for item in placed[start : start + SETITEMS_BATCH]:
            out.text(item.name)
            out.tensor(item)
        out.out += b"u"
    out.out += b"."
    return bytes(out.out)


def tree_pickle_bytes(tree: Any, placed: list[_Placed]) -> bytes:
    """``data.pkl`` for a plan's nested ``tree``: its plain data, each ``OutputTensor``
    leaf rebuilt from its record as in ``pickle_bytes``."""
    by_name = {item.name: item for item in placed}
    out = _Pickle()

    def tensor(leaf: OutputTensor) -> None:
        item = by_name.get(leaf.name)
        if item is None:
            raise ConversionError(f"the tree names a tensor {leaf.name!r} the plan does not hold")
        out.tensor(item)

    pickle_tree(out, tree, tensor)
    out.out += b"."
    return bytes(out.out)


def write(handle: BinaryIO, plan: WritePlan) -> None:
    names = [tensor.name for tensor in plan.tensors]
    if len(set(names)) != len(names):
        raise ConversionError("a torch state_dict cannot hold two tensors of one name")
    for tensor in plan.tensors:
        if not holds(tensor.dtype):
            raise ConversionError(f"tensor {tensor.name!r}: torch archives hold no {tensor.dtype}")
        if tensor.is_cast and tensor.dtype in COPY_ONLY:
            raise ConversionError(
                f"tensor {tensor.name!r}: {tensor.dtype} can be copied, not cast into"
            )
    placed = place(plan)
    pickled = pickle_bytes(placed) if plan.tree is None else tree_pickle_bytes(plan.tree, placed)
    archive = ZipWriter(handle, align=ALIGNMENT)
    archive.add(f"{PREFIX}/data.pkl", pickled)
    archive.add(f"{PREFIX}/.format_version", b"1")
    archive.add(f"{PREFIX}/.storage_alignment", str(ALIGNMENT).encode())
    archive.add(f"{PREFIX}/byteorder", b"little")
    written: set[str] = set()
    for item in placed:
        record = item.record
        if record.key in written:
            continue
        written.add(record.key)
        fill = partial(write_tensor, handle, record.content, checksum=True)
        archive.add_stream(f"{PREFIX}/data/{record.key}", record.content.nbytes, fill)
    metadata = {k: v for k, v in plan.metadata.items() if plan.tree is None or k != TREE_KEY}
    if metadata:
        archive.add(f"{PREFIX}/{METADATA_MEMBER}", json.dumps(metadata).encode())
    archive.add(f"{PREFIX}/version", b"3\n")
    import hashlib  # here: reading a torch zip needs no hash

    digest = int.from_bytes(hashlib.sha256(pickled).digest()[:17], "little")
    archive.add(f"{PREFIX}/.data/serialization_id", f"{digest % 10**40:040d}".encode())
    archive.finish()


READER = FormatReader(
    Format.TORCH_ZIP,
    sniff,
    read,
    (".pt", ".pth", ".bin", ".ckpt", ".tar"),
    write=write,
    holds=holds,
    shares_storage=True,
)
