"""TensorFlow checkpoints: a tensor bundle, ``<prefix>.index`` plus ``<prefix>.data-*`` shards.

``tf.train.Checkpoint.write('ckpt-1')``, ``tf.compat.v1.train.Saver`` (``model.ckpt``) and
every SavedModel's ``variables/variables`` write this layout (tensorflow/core/util/
tensor_bundle/tensor_bundle.proto):

- ``<prefix>.index`` MUST be a LevelDB table (``_sstable``) whose keys are tensor names;
- the entry with the empty key MUST come first and hold a ``BundleHeaderProto``:
  ``num_shards`` (1), ``endianness`` (2: 0 little, 1 big), ``version`` (3: ``VersionDef``
  with ``producer`` 1 and ``min_consumer`` 2);
- every other entry holds a ``BundleEntryProto``: ``dtype`` (1, ``DataType``), ``shape`` (2:
  ``TensorShapeProto``, ``dim`` 2 of ``{size 1, name 2}``, ``unknown_rank`` 3), ``shard_id``
  (3), ``offset`` (4), ``size`` (5), ``crc32c`` (6: masked crc of the tensor's bytes) and
  ``slices`` (7: set on a partitioned variable, whose parts are stored under binary keys
  opening with a 0 byte);
- shard ``i`` of ``n`` is ``<prefix>.data-{i:05d}-of-{n:05d}``; a numeric tensor is ``size``
  bytes at ``offset``, C order, in the bundle's byte order. A string tensor holds a varint64
  length per element, a masked crc32c of those, then the bytes.

Every numeric tensor is listed under its key as the file gives it (``layer_with_weights-0/
kernel/.ATTRIBUTES/VARIABLE_VALUE``) with a zero-copy ``TensorRef`` into its shard. String,
resource and variant tensors, partitioned variables and dtypes numpy cannot hold are listed
in ``details["skipped_tensors"]``, not as tensors. The object graph TensorFlow 2 stores in
``_CHECKPOINTABLE_OBJECT_GRAPH`` gives each variable's own name (``dense/kernel``), kept in
``details["variable_names"]``. Tensor checksums are not verified (that reads every byte).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelFileNotFoundError,
    ModelportError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from modelport.formats._protobuf import Field, Message, WireType, signed64
from modelport.formats._sstable import FOOTER_SIZE, MAGIC_BYTES, Table
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import NDArray, Storage, TensorRef

INDEX_SUFFIX: Final = ".index"
OBJECT_GRAPH_KEY: Final = "_CHECKPOINTABLE_OBJECT_GRAPH"
CHECKPOINT_STATE: Final = "checkpoint"  # the text file tf.train.CheckpointManager keeps
# An .index holds one short entry per tensor: tens of MB for the largest checkpoints.
MAX_INDEX_BYTES: Final = 1 << 30
MAX_ENTRY_FIELDS: Final = 100_000
MAX_SHARDS: Final = 100_000
# A table read whole to find its first key when its first block is compressed.
MAX_SNIFFED_TABLE: Final = 64 << 20
# The object graph string read from a shard (one node per trackable object).
MAX_OBJECT_GRAPH_BYTES: Final = 256 << 20
_SHARD_NAME: Final = re.compile(r"^(?P<prefix>.*)\.data-(?P<shard>\d{5})-of-(?P<count>\d{5})$")


class DataType(IntEnum):
    """tensorflow/core/framework/types.proto (reference types add 100 and are not stored)."""

    FLOAT = 1
    DOUBLE = 2
    INT32 = 3
    UINT8 = 4
    INT16 = 5
    INT8 = 6
    STRING = 7
    COMPLEX64 = 8
    INT64 = 9
    BOOL = 10
    QINT8 = 11
    QUINT8 = 12
    QINT32 = 13
    BFLOAT16 = 14
    QINT16 = 15
    QUINT16 = 16
    UINT16 = 17
    COMPLEX128 = 18
    HALF = 19
    RESOURCE = 20
    VARIANT = 21
    UINT32 = 22
    UINT64 = 23
    FLOAT8_E5M2 = 24
    FLOAT8_E4M3FN = 25
    FLOAT8_E4M3FNUZ = 26
    FLOAT8_E4M3B11FNUZ = 27
    FLOAT8_E5M2FNUZ = 28
    INT4 = 29
    UINT4 = 30
    INT2 = 31
    UINT2 = 32


DTYPE_NAMES: Final = MappingProxyType(
    {
        DataType.FLOAT: "float32", DataType.DOUBLE: "float64", DataType.INT32: "int32",
        DataType.UINT8: "uint8", DataType.INT16: "int16", DataType.INT8: "int8",
        DataType.COMPLEX64: "complex64", DataType.INT64: "int64", DataType.BOOL: "bool",
        DataType.QINT8: "qint8", DataType.QUINT8: "quint8", DataType.QINT32: "qint32",
        DataType.BFLOAT16: "bfloat16", DataType.UINT16: "uint16",
        DataType.COMPLEX128: "complex128", DataType.HALF: "float16",
        DataType.UINT32: "uint32", DataType.UINT64: "uint64",
        DataType.FLOAT8_E5M2: "float8_e5m2", DataType.FLOAT8_E4M3FN: "float8_e4m3fn",
        DataType.FLOAT8_E4M3FNUZ: "float8_e4m3fnuz", DataType.FLOAT8_E5M2FNUZ: "float8_e5m2fnuz",
    }
)  # fmt: skip


def type_label(code: int) -> str:
    """A DataType as a person reads it: modelport's dtype name, else TensorFlow's."""
    if code in DTYPE_NAMES:
        return DTYPE_NAMES[DataType(code)]
    try:
        return DataType(code).name.lower()
    except ValueError:
        return f"dtype {code}"


@dataclass(frozen=True)
class BundleHeader:
    num_shards: int
    big_endian: bool
    producer: int
    min_consumer: int


@dataclass(frozen=True)
class BundleEntry:
    dtype: int
    shape: tuple[int, ...] | None  # None: unknown rank
    shard_id: int
    offset: int
    size: int
    crc32c: int
    slices: int


@dataclass(frozen=True)
class Bundle:
    """An index read: where its shards lie and every entry by name."""

    folder: Path
    stem: str  # the prefix's last part; "" when TensorFlow wrote ``<folder>/.index``
    header: BundleHeader
    entries: dict[str, BundleEntry]
    slice_parts: int

    def shard(self, shard_id: int) -> Path:
        count = self.header.num_shards
        return self.folder / f"{self.stem}.data-{shard_id:05d}-of-{count:05d}"

    def shard_names(self) -> list[str]:
        return [self.shard(i).name for i in range(self.header.num_shards)]


# -- the index -----------------------------------------------------------------------------------
def read_index(path: Path) -> Bundle:
    """An ``.index`` file parsed: its header and entries (no shard is opened)."""
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise LimitExceededError("tensor bundle .index size", MAX_INDEX_BYTES, size, path=path)
    table = Table(path.read_bytes(), path)
    header: BundleHeader | None = None
    entries: dict[str, BundleEntry] = {}
    slice_parts = 0
    for key, value in table.entries():
        if header is None:
            if key != b"":
                raise CorruptFileError("the bundle's first entry is not its header", path=path)
            header = _header(Message(value, path, MAX_ENTRY_FIELDS))
        elif key.startswith(b"\x00"):
            slice_parts += 1  # one part of a partitioned variable, named by its full entry
        else:
            name = key.decode("utf-8", "replace")
            entries[name] = _entry(name, Message(value, path, MAX_ENTRY_FIELDS))
    if header is None:
        raise CorruptFileError("the tensor bundle index is empty", path=path)
    return Bundle(path.parent, path.name.removesuffix(INDEX_SUFFIX), header, entries, slice_parts)


def _header(message: Message) -> BundleHeader:
    shards, big_endian, producer, min_consumer = 1, False, 0, 0
    for field in message.fields(0, message.size):
        if field.number == 1 and field.wire == WireType.VARINT:
            shards = field.value
        elif field.number == 2 and field.wire == WireType.VARINT:
            big_endian = field.value == 1
        elif field.number == 3 and field.wire == WireType.LEN:
            for part in message.fields(field.start, field.end):
                if part.number == 1 and part.wire == WireType.VARINT:
                    producer = signed64(part.value)
                elif part.number == 2 and part.wire == WireType.VARINT:
                    min_consumer = signed64(part.value)
    if not 0 < shards <= MAX_SHARDS:
        raise CorruptFileError(f"bundle header declares {shards} shards", path=message.path)
    return BundleHeader(shards, big_endian, producer, min_consumer)


def _entry(name: str, message: Message) -> BundleEntry:
    values = {"dtype": 0, "shard_id": 0, "offset": 0, "size": 0, "crc32c": 0, "slices": 0}
    shape: tuple[int, ...] | None = ()
    for field in message.fields(0, message.size):
        number = field.number
        if number == 2:
            message.expect(field, WireType.LEN)
            shape = _shape(name, message, field)
        elif number == 7:
            values["slices"] += 1
        elif 1 <= number <= 6:
            message.expect(field, WireType.I32 if number == 6 else WireType.VARINT)
            key = ("dtype", "", "shard_id", "offset", "size", "crc32c")[number - 1]
            values[key] = signed64(field.value) if number in (4, 5) else field.value
    if values["offset"] < 0 or values["size"] < 0:
        raise CorruptFileError(f"tensor {name!r}: negative offset or size", path=message.path)
    return BundleEntry(shape=shape, **values)


def _shape(name: str, message: Message, field: Field) -> tuple[int, ...] | None:
    dims: list[int] = []
    for part in message.fields(field.start, field.end):
        if part.number == 3 and part.value:
            return None
        if part.number != 2:
            continue
        message.expect(part, WireType.LEN)
        size = 0
        for item in message.fields(part.start, part.end):
            if item.number == 1 and item.wire == WireType.VARINT:
                size = signed64(item.value)
        if size < 0:
            raise CorruptFileError(
                f"tensor {name!r}: stored with an unknown dimension", path=message.path
            )
        dims.append(size)
        if len(dims) > limits.MAX_RANK:
            raise LimitExceededError(f"rank of tensor {name!r}", limits.MAX_RANK, len(dims))
    return tuple(dims)


# -- tensors ------------------------------------------------------------------------------------
def read_bundle(index: Path, format: Format = Format.TF_CHECKPOINT) -> Contents:
    """The checkpoint at ``index`` as Contents: its numeric tensors by key, zero-copy."""
    bundle = read_index(index)
    header = bundle.header
    if header.big_endian:
        raise UnsupportedVersionError("big-endian tensor bundles are not read", path=index)
    if header.min_consumer > 1:
        raise UnsupportedVersionError(
            f"the bundle needs a reader of version {header.min_consumer} or later", path=index
        )
    shard_sizes = {i: _size_or_none(bundle.shard(i)) for i in range(header.num_shards)}
    tree: dict[str, TensorRef] = {}
    skipped: dict[str, str] = {}
    warnings = [
        f"data shard {bundle.shard(i).name} is missing: its tensors are listed but cannot be read"
        for i, size in shard_sizes.items()
        if size is None
    ]
    for name, entry in bundle.entries.items():
        reason = _unlisted(entry)
        if reason is not None:
            skipped[name] = reason
            if not reason.startswith(("string", "resource")):
                warnings.append(f"tensor {name!r} ({reason}) is not read")
            continue
        tree[name] = _tensor(bundle, name, entry, shard_sizes, index)
    details: dict[str, Any] = {
        "num_shards": header.num_shards,
        "bundle_version": header.producer,
        "external_data": bundle.shard_names(),
    }
    if skipped:
        details["skipped_tensors"] = skipped
    if bundle.slice_parts:
        details["slice_entries"] = bundle.slice_parts
    names = _variable_names(bundle, shard_sizes, warnings)
    if names:
        details["variable_names"] = names
    return Contents(format, tree, details=details, warnings=warnings)


def _size_or_none(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def _unlisted(entry: BundleEntry) -> str | None:
    """Why an entry is no numeric tensor, or None when it is one."""
    shape = "?" if entry.shape is None else list(entry.shape)
    if entry.slices:
        return f"{type_label(entry.dtype)} {shape} partitioned into {entry.slices} slices"
    if entry.dtype not in DTYPE_NAMES:
        return f"{type_label(entry.dtype)} {shape}"
    return None


def _tensor(
    bundle: Bundle,
    name: str,
    entry: BundleEntry,
    shard_sizes: dict[int, int | None],
    index: Path,
) -> TensorRef:
    dtype = DTYPE_NAMES[DataType(entry.dtype)]
    if entry.shape is None:
        raise CorruptFileError(f"tensor {name!r} is stored without a known rank", path=index)
    expected = math.prod(entry.shape) * dtypes.dtype(dtype).itemsize
    if entry.size != expected:
        raise CorruptFileError(
            f"tensor {name!r}: {dtype}{list(entry.shape)} needs {expected} bytes, its entry "
            f"says {entry.size}",
            path=index,
        )
    if entry.shard_id not in shard_sizes:
        raise CorruptFileError(
            f"tensor {name!r} lies in shard {entry.shard_id} of {len(shard_sizes)}", path=index
        )
    shard = bundle.shard(entry.shard_id)
    available = shard_sizes[entry.shard_id]
    if available is None:
        storage = Storage(None, 0, entry.size, key=name, reader=_missing(shard))
        return TensorRef(dtype, entry.shape, storage, note="data shard missing")
    if entry.offset + entry.size > available:
        raise TruncatedFileError(
            f"tensor {name!r} at bytes {entry.offset}..{entry.offset + entry.size} runs past "
            f"the {available} bytes of {shard.name}",
            expected=entry.offset + entry.size,
            actual=available,
            path=shard,
        )
    return TensorRef(dtype, entry.shape, Storage(shard, entry.offset, entry.size, key=name))


def _missing(shard: Path) -> Any:
    def read() -> NDArray:
        raise ModelFileNotFoundError(shard, "the checkpoint's data shard is missing")

    return read


def _variable_names(
    bundle: Bundle, shard_sizes: dict[int, int | None], warnings: list[str]
) -> dict[str, str]:
    """checkpoint key -> the variable's own name, from the TF2 object graph (if any)."""
    entry = bundle.entries.get(OBJECT_GRAPH_KEY)
    if entry is None or entry.dtype != DataType.STRING or entry.shape != ():
        return {}
    available = shard_sizes.get(entry.shard_id)
    if available is None or entry.offset + entry.size > available:
        return {}
    if entry.size > MAX_OBJECT_GRAPH_BYTES:
        warnings.append(f"object graph of {entry.size:,} bytes not read")
        return {}
    with open(bundle.shard(entry.shard_id), "rb") as handle:
        handle.seek(entry.offset)
        raw = handle.read(entry.size)
    message = Message(raw, bundle.shard(entry.shard_id), MAX_ENTRY_FIELDS * 100)
    length, pos = message.varint(0, len(raw))
    start = pos + 4  # the masked crc32c of the lengths
    if start + length != len(raw):
        warnings.append("the checkpoint's object graph is malformed; variable names not read")
        return {}
    return object_graph_names(message, start, len(raw))


def object_graph_names(message: Message, start: int, end: int) -> dict[str, str]:
    """``TrackableObjectGraph``: ``nodes`` (1) of ``TrackableObject`` whose ``attributes`` (2)
    are ``SerializedTensor`` (``name`` 1, ``full_name`` 2, ``checkpoint_key`` 3)."""
    names: dict[str, str] = {}
    for node in message.fields(start, end):
        if node.number != 1 or node.wire != WireType.LEN:
            continue
        for attribute in message.fields(node.start, node.end):
            if attribute.number != 2 or attribute.wire != WireType.LEN:
                continue
            parts = {
                f.number: message.text(f)
                for f in message.fields(attribute.start, attribute.end)
                if f.wire == WireType.LEN
            }
            if parts.get(2) and parts.get(3):
                names[parts[3]] = parts[2]
    return names


# -- readers ------------------------------------------------------------------------------------
def has_table_magic(path: Path, size: int) -> bool:
    if size < FOOTER_SIZE:
        return False
    with open(path, "rb") as handle:
        handle.seek(size - len(MAGIC_BYTES))
        return handle.read(len(MAGIC_BYTES)) == MAGIC_BYTES


def sniff(probe: Probe) -> bool:
    """A table whose first entry has the empty key (the bundle header): ``00 00`` opens its
    first block, or, when that block is snappy-compressed, opens it once inflated."""
    if probe.is_dir or not has_table_magic(probe.path, probe.size):
        return False
    if probe.head.startswith(b"\x00\x00"):
        return True
    if probe.size > MAX_SNIFFED_TABLE:
        return False
    try:
        table = Table(probe.path.read_bytes(), probe.path)
        return next(table.entries(), (None, b""))[0] == b""
    except ModelportError:
        return False


def read(path: Path, probe: Probe) -> Contents:
    return read_bundle(path)


def sniff_folder(probe: Probe) -> bool:
    return probe.is_dir and bool(checkpoint_indexes(probe.path))


def checkpoint_indexes(folder: Path) -> list[Path]:
    """The tensor bundle ``.index`` files directly in ``folder``."""
    found = []
    for child in sorted(folder.glob("*" + INDEX_SUFFIX)):
        if child.is_file() and sniff(Probe.of(child)):
            found.append(child)
    return found


def read_folder(path: Path, probe: Probe) -> Contents:
    """A folder of checkpoints: the one its ``checkpoint`` file names as latest, else the only
    one, else the highest-numbered (with a warning naming the others)."""
    indexes = checkpoint_indexes(path)
    chosen = _latest_named(path, indexes)
    warnings = []
    if chosen is None:
        chosen = max(indexes, key=_step_and_name)
        if len(indexes) > 1:
            others = ", ".join(i.name for i in indexes if i != chosen)
            warnings.append(f"several checkpoints, read {chosen.name} (also here: {others})")
    contents = read_bundle(chosen)
    contents.details["checkpoint"] = chosen.name.removesuffix(INDEX_SUFFIX)
    contents.warnings[:0] = warnings
    return contents


def _latest_named(folder: Path, indexes: list[Path]) -> Path | None:
    state = folder / CHECKPOINT_STATE
    if not state.is_file() or state.stat().st_size > limits.MAX_PROTOBUF_TEXT:
        return None
    text = state.read_text("utf-8", "replace")
    match = re.search(r'^model_checkpoint_path:\s*"([^"\n]*)"', text, re.M)
    if match is None:
        return None
    wanted = Path(match.group(1)).name + INDEX_SUFFIX  # only ever a file of this folder
    return next((i for i in indexes if i.name == wanted), None)


def _step_and_name(index: Path) -> tuple[int, str]:
    step = re.search(r"-(\d+)$", index.name.removesuffix(INDEX_SUFFIX))
    return (int(step.group(1)) if step else -1, index.name)


def shard_owner(path: Path) -> Path | None:
    """The ``.index`` beside a data shard that names it, or None: a file called
    ``<prefix>.data-00000-of-00001`` is raw tensor bytes only if its index says so."""
    match = _SHARD_NAME.match(path.name)
    if match is None:
        return None
    index = path.parent / (match.group("prefix") + INDEX_SUFFIX)
    try:
        named = sniff(Probe.of(index)) and path.name in read_index(index).shard_names()
    except (ModelportError, OSError):
        return None  # no readable index: the shard stays unrecognised bytes
    return index if named else None


READER = FormatReader(Format.TF_CHECKPOINT, sniff, read, (INDEX_SUFFIX,))
FOLDER_READER = FormatReader(Format.TF_CHECKPOINT, sniff_folder, read_folder, ())
