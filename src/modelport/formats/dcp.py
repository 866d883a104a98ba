"""torch.distributed.checkpoint (DCP) directories, as ``FileSystemWriter`` writes them.

Layout (torch/distributed/checkpoint/metadata.py, filesystem.py):

- ``.metadata`` MUST be a pickle of ``Metadata`` (read with modelport's restricted machine):
  ``state_dict_metadata`` maps each fully qualified name to ``TensorStorageMetadata``
  (``properties``: a ``TensorProperties`` whose state is ``(dtype, layout, requires_grad,
  memory_format, pin_memory)`` or a dict of those; ``size``: ``torch.Size``; ``chunks``: a
  list of ``ChunkStorageMetadata(offsets, sizes)``) or to ``BytesStorageMetadata`` (any
  other object); ``storage_data`` maps ``MetadataIndex(fqn, offset, index)`` to
  ``_StorageInfo(relative_path, offset, length, transform_descriptors?)``;
- data files (``__<rank>_<n>.distcp``) hold each item at ``(offset, length)``: with the
  default ``torch_save`` format every tensor chunk and every bytes item is a whole
  ``torch.save`` zip; with the ``safetensors`` format the tensors of a file form one
  safetensors blob starting at ``offset``;
- ``relative_path`` MUST name a file inside the directory; ranges MUST lie inside it;
- chunks MUST tile their tensor; a tensor of several chunks (one per rank) is assembled
  when read. Items with ``transform_descriptors`` (stream extensions such as compression)
  are listed but raise when read.

The tree maps each fqn to its TensorRef, nested under the keys of the state dict that was
saved where ``planner_data`` records them (see ``_nested``); bytes items are decoded with
modelport's restricted unpickler and listed in ``details["bytes_entries"]``.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeGuard

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from modelport.formats._torch_blob import read_torch_blob
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.pickles.reading import read_pickle
from modelport.pickles.records import ObjectRecord
from modelport.pickles.torch_types import TorchDType
from modelport.tensors import NDArray, Storage, TensorRef
from modelport.tree import names as trees

METADATA_NAME: Final = ".metadata"
_META = "torch.distributed.checkpoint.metadata."


@dataclass(frozen=True)
class StorageInfo:
    """Where one item lies: a byte range of a data file, and its stream transforms."""

    file: Path
    offset: int
    length: int
    transforms: tuple[str, ...]


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    info: StorageInfo


def sniff(probe: Probe) -> bool:
    if not probe.is_dir:
        return False
    meta = probe.path / METADATA_NAME
    if not meta.is_file():
        return False
    with open(meta, "rb") as handle:
        return handle.read(1) == b"\x80"


def read(path: Path, probe: Probe) -> Contents:
    reader = _Reader(path)
    return reader.read()


def data_items(root: Path) -> list[StorageInfo]:
    """Every item ``.metadata`` places in the data files: each is a ``torch.save`` blob (or a
    safetensors file), which the scanner inspects one by one."""
    _, _, index = _Reader(root).metadata()
    return [info for _, info in index.values()]


class _Reader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root.resolve()
        self.maps: dict[Path, memoryview] = {}
        self.safetensors: dict[tuple[Path, int], tuple[int, dict[str, Any]]] = {}
        self.warnings: list[str] = []

    def metadata(
        self,
    ) -> tuple[dict[str, Any], dict[Any, Any], dict[tuple[str, Any], tuple[Any, StorageInfo]]]:
        """The Metadata record's attributes, its entries, and where each item is stored."""
        meta_path = self.root / METADATA_NAME
        size = meta_path.stat().st_size
        if size > limits.MAX_DCP_METADATA:
            raise LimitExceededError(
                "DCP .metadata size", limits.MAX_DCP_METADATA, size, path=meta_path
            )
        try:
            record = read_pickle(meta_path.read_bytes()).value
        except ModelportError as exc:
            raise CorruptFileError(
                f".metadata is not a readable pickle: {exc}", path=meta_path
            ) from None
        if not isinstance(record, ObjectRecord) or not record.class_path.endswith("Metadata"):
            raise CorruptFileError(".metadata does not hold a DCP Metadata", path=meta_path)
        attributes = record.attributes()
        entries = attributes.get("state_dict_metadata")
        storage_data = attributes.get("storage_data")
        if not isinstance(entries, dict) or not isinstance(storage_data, dict):
            raise CorruptFileError("DCP metadata lacks state_dict_metadata", path=meta_path)
        return attributes, entries, self._index(storage_data)

    def read(self) -> Contents:
        attributes, entries, index = self.metadata()
        tree: dict[str, TensorRef] = {}
        byte_entries: dict[str, Any] = {}
        for fqn, entry in entries.items():
            name = str(fqn)
            kind = entry.class_path if isinstance(entry, ObjectRecord) else ""
            if kind == _META + "BytesStorageMetadata":
                byte_entries[name] = self._bytes_entry(name, index.get((name, None)))
            elif kind == _META + "TensorStorageMetadata":
                tree[name] = self._tensor(name, entry.attributes(), index)
            else:
                raise CorruptFileError(f"DCP entry {name!r} is a {kind or type(entry).__name__}")
        details: dict[str, Any] = {
            "dcp_version": attributes.get("version"),
            "data_files": sorted({str(c[1].file.name) for c in index.values()}),
            "bytes_entries": byte_entries,
        }
        nested = _nested(tree, attributes.get("planner_data"))
        return Contents(Format.DCP, nested, details=details, warnings=self.warnings)

    # metadata ------------------------------------------------------------------------------
    def _index(
        self, storage_data: dict[Any, Any]
    ) -> dict[tuple[str, Any], tuple[Any, StorageInfo]]:
        index: dict[tuple[str, Any], tuple[Any, StorageInfo]] = {}
        for key, value in storage_data.items():
            if not isinstance(key, ObjectRecord) or not isinstance(value, ObjectRecord):
                raise CorruptFileError("DCP storage_data entries must be MetadataIndex records")
            where = key.attributes()
            fqn, offset = where.get("fqn"), where.get("offset")
            if not isinstance(fqn, str) or not (offset is None or _ints(offset)):
                raise CorruptFileError("DCP MetadataIndex without a name or offsets")
            index[(fqn, None if offset is None else tuple(offset))] = (key, self._info(value))
        return index

    def _info(self, record: ObjectRecord) -> StorageInfo:
        state = record.attributes()
        relative, offset, length = (state.get(k) for k in ("relative_path", "offset", "length"))
        transforms = state.get("transform_descriptors") or ()
        if not isinstance(relative, str) or not _nonneg(offset) or not _nonneg(length):
            raise CorruptFileError(f"DCP storage info is malformed: {state!r:.120}")
        target = self._inside(relative)
        size = target.stat().st_size
        if offset + length > size:
            raise TruncatedFileError(
                f"DCP item at bytes {offset}..{offset + length} of {relative} runs past its "
                f"{size} bytes",
                expected=offset + length,
                actual=size,
                path=target,
            )
        return StorageInfo(target, offset, length, tuple(str(t) for t in transforms))

    def _inside(self, relative: str) -> Path:
        candidate = Path(relative)
        if candidate.is_absolute() or ".." in candidate.parts or "\\" in relative:
            raise CorruptFileError(
                f"DCP data file {relative!r} escapes the checkpoint", path=self.root
            )
        target = (self.root / candidate).resolve()
        if not target.is_relative_to(self.base):
            raise CorruptFileError(
                f"DCP data file {relative!r} escapes the checkpoint", path=self.root
            )
        if not target.is_file():
            raise CorruptFileError(f"DCP data file {relative!r} is missing", path=self.root)
        return target

    # items ---------------------------------------------------------------------------------
    def _blob(self, info: StorageInfo) -> Any:
        if info.transforms:
            raise UnsupportedVersionError(f"DCP stream transforms {list(info.transforms)}")
        view = self._map(info.file)[info.offset : info.offset + info.length]
        value, _ = read_torch_blob(view, path=info.file, file_offset=info.offset)
        return value

    def _map(self, file: Path) -> memoryview:
        if file not in self.maps:
            with open(file, "rb") as handle:
                if file.stat().st_size == 0:
                    self.maps[file] = memoryview(b"")
                else:
                    self.maps[file] = memoryview(
                        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                    )
        return self.maps[file]

    def _bytes_entry(self, name: str, found: tuple[Any, StorageInfo] | None) -> Any:
        if found is None:
            raise CorruptFileError(f"DCP bytes item {name!r} has no storage entry")
        try:
            return trees.extras(self._blob(found[1]))
        except ModelportError as exc:
            self.warnings.append(f"DCP bytes item {name!r} not decoded: {exc}")
            return f"<{found[1].length} bytes, not decoded>"

    def _tensor(
        self, name: str, meta: dict[str, Any], index: dict[tuple[str, Any], tuple[Any, StorageInfo]]
    ) -> TensorRef:
        dtype = _dtype_of(meta.get("properties"))
        shape, chunks_meta = meta.get("size"), meta.get("chunks")
        if dtype is None or not _ints(shape) or not isinstance(chunks_meta, list):
            raise CorruptFileError(f"DCP tensor {name!r}: metadata lacks dtype, size or chunks")
        shape = tuple(shape)
        chunks: list[Chunk] = []
        for chunk in chunks_meta:
            state = chunk.attributes() if isinstance(chunk, ObjectRecord) else {}
            offsets, sizes = state.get("offsets"), state.get("sizes")
            if (
                not _ints(offsets)
                or not _ints(sizes)
                or not len(offsets) == len(sizes) == len(shape)
            ):
                raise CorruptFileError(f"DCP tensor {name!r}: malformed chunk {state!r:.80}")
            if any(o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
                raise CorruptFileError(f"DCP tensor {name!r}: chunk lies outside the tensor")
            found = index.get((name, tuple(offsets)))
            if found is None:
                raise CorruptFileError(f"DCP tensor {name!r}: chunk {offsets} has no storage entry")
            chunks.append(Chunk(tuple(offsets), tuple(sizes), found[1]))
        if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape):
            raise CorruptFileError(
                f"DCP tensor {name!r}: its chunks do not tile shape {list(shape)}"
            )
        if any(c.info.transforms for c in chunks):
            self.warnings.append(f"DCP tensor {name!r} uses stream transforms; it cannot be read")
            return TensorRef(dtype, shape, _failing(name, chunks[0].info))
        parts = [self._chunk(name, dtype, c) for c in chunks]
        if len(parts) == 1:
            return parts[0]
        nbytes = math.prod(shape) * dtypes.dtype(dtype).itemsize
        reader = _assembler(dtype, shape, list(zip(chunks, parts, strict=True)))
        return TensorRef(dtype, shape, Storage(None, 0, nbytes, key=name, reader=reader))

    def _chunk(self, name: str, dtype: str, chunk: Chunk) -> TensorRef:
        info = chunk.info
        head = bytes(self._map(info.file)[info.offset : info.offset + 16])
        tensor = self._safetensors(name, info) if head[8:9] == b"{" else self._blob(info)
        if not isinstance(tensor, TensorRef):
            raise CorruptFileError(f"DCP tensor {name!r}: its chunk holds {tensor!r:.60}")
        if tensor.dtype != dtype or tensor.shape != chunk.sizes:
            raise CorruptFileError(
                f"DCP tensor {name!r}: chunk holds {tensor.dtype}{list(tensor.shape)}, "
                f"metadata says {dtype}{list(chunk.sizes)}"
            )
        return tensor

    def _safetensors(self, name: str, info: StorageInfo) -> TensorRef:
        """Tensors written with ``serialization_format=SAFETENSORS``: one blob per file."""
        key = (info.file, info.offset)
        if key not in self.safetensors:
            view = self._map(info.file)
            (length,) = struct.unpack("<Q", view[info.offset : info.offset + 8])
            if length > limits.MAX_SAFETENSORS_HEADER or info.offset + 8 + length > len(view):
                raise CorruptFileError(f"DCP safetensors blob in {info.file.name} is malformed")
            try:
                header = json.loads(bytes(view[info.offset + 8 : info.offset + 8 + length]))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                raise CorruptFileError("DCP safetensors header is not JSON") from None
            self.safetensors[key] = (info.offset + 8 + length, header)
        start, header = self.safetensors[key]
        entry = header.get(name) if isinstance(header, dict) else None
        if not isinstance(entry, dict) or entry.get("dtype") not in dtypes.SAFETENSORS_CODES:
            raise CorruptFileError(f"DCP tensor {name!r} is missing from its safetensors blob")
        begin, end = entry.get("data_offsets", (None, None))
        shape = entry.get("shape")
        if not (_nonneg(begin) and _nonneg(end) and begin <= end and _ints(shape)):
            raise CorruptFileError(f"DCP tensor {name!r}: malformed safetensors entry")
        if start + end > len(self._map(info.file)):
            raise CorruptFileError(f"DCP tensor {name!r} runs past {info.file.name}")
        dtype = dtypes.SAFETENSORS_CODES[entry["dtype"]]
        if end - begin != math.prod(shape) * dtypes.dtype(dtype).itemsize:
            raise CorruptFileError(f"DCP tensor {name!r}: safetensors span does not fit its shape")
        return TensorRef(dtype, tuple(shape), Storage(info.file, start + begin, end - begin, name))


def _nested(tree: dict[str, TensorRef], planner_data: Any) -> dict[str, Any]:
    """The tensors under the keys they were saved with. ``DefaultSavePlanner`` flattens a
    nested state dict into dotted names and keeps each name's path in ``planner_data``
    (``{"model.0.weight": ("model", "0.weight")}``: accelerate's FSDP ``SHARDED_STATE_DICT``
    saves ``{"model": state_dict}``), so the weights rule sees the ``model`` key, as in a
    ``torch.save`` checkpoint, and the model's own names under it. Names list the same either
    way; without such paths, or with paths that do not spell their names, the tree stays flat."""
    if not isinstance(planner_data, dict) or not any(
        isinstance(path, tuple) and len(path) > 1 for path in planner_data.values()
    ):
        return tree
    nested: dict[str, Any] = {}
    for name, tensor in tree.items():
        path = planner_data.get(name)
        if not isinstance(path, tuple) or not path or ".".join(map(str, path)) != name:
            return tree
        node = nested
        for key in map(str, path[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                return tree
            node = child
        if str(path[-1]) in node:
            return tree
        node[str(path[-1])] = tensor
    return nested


def _nonneg(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ints(value: Any) -> TypeGuard[tuple[int, ...] | list[int]]:
    return isinstance(value, (tuple, list)) and all(_nonneg(v) for v in value)


def _dtype_of(properties: Any) -> str | None:
    state = properties.state if isinstance(properties, ObjectRecord) else None
    if isinstance(state, tuple) and state:
        found = state[0]
    elif isinstance(state, dict):
        found = state.get("dtype")
    else:
        return None
    return found.name if isinstance(found, TorchDType) else None


def _failing(name: str, info: StorageInfo) -> Storage:
    def refuse() -> NDArray:
        raise UnsupportedVersionError(
            f"DCP tensor {name!r} is stored through stream transforms {list(info.transforms)}"
        )

    return Storage(info.file, info.offset, 0, key=name, reader=refuse)


def _assembler(
    dtype: str, shape: tuple[int, ...], parts: list[tuple[Chunk, TensorRef]]
) -> Callable[[], NDArray]:
    """Copies each chunk into its place: a tensor saved by several ranks."""

    def assemble() -> NDArray:
        import numpy as np

        whole = np.zeros(shape, dtype=dtypes.to_numpy(dtype))
        for chunk, ref in parts:
            where = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
            whole[where] = ref.numpy()
        flat: NDArray = whole.reshape(-1).view(np.uint8)
        return flat

    return assemble


READER = FormatReader(Format.DCP, sniff, read, ())


def segments_of(files: list[Path]) -> dict[Path, list[tuple[int, int]]]:
    """For each ``.distcp`` file among ``files`` (a directory walk), the byte ranges of its
    items: several zips stored back to back, which the scanner reads one by one."""
    segments: dict[Path, list[tuple[int, int]]] = {}
    for meta in (f for f in files if f.name == METADATA_NAME):
        try:
            items = data_items(meta.parent)
        except ModelportError:
            continue  # the data files are then scanned on their own, and report what fails
        for item in items:
            segments.setdefault(item.file.resolve(), []).append((item.offset, item.length))
    return {path: sorted(ranges) for path, ranges in segments.items()}
