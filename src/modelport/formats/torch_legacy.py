"""torch's legacy checkpoints: what ``torch.save`` wrote before 1.6 (and still writes with
``_use_new_zipfile_serialization=False``), plus the tar archives of torch 0.1-0.3.

Stream layout (torch/serialization.py ``_legacy_save`` / ``_legacy_load``), one file of
consecutive pickles followed by raw storages:

- a pickle MUST hold the magic number ``0x1950a86a20f9469cfc6c``;
- a pickle MUST hold the protocol version ``1001``;
- a pickle MUST hold ``sys_info``: ``{"protocol_version", "little_endian", "type_sizes"}``;
  big-endian files are refused (their storages would need byte swapping);
- the object pickle: each storage is a persistent id ``("storage", <torch.XStorage>, key,
  location, numel, view_metadata)`` with ``view_metadata`` ``None`` or ``(view_key, offset,
  view_size)`` (a view of the root storage, in elements); a pickled ``nn.Module`` names its
  class through ``("module", <class>, source_file, source)``;
- a pickle MUST hold the list of storage keys, in the order their bytes follow;
- for each key: an 8-byte little-endian element count, which MUST equal the numel the
  object pickle declared, then ``numel * itemsize`` raw bytes.

Tar layout (torch 0.1-0.3 ``legacy_load``): a tar (ustar/PAX) with members ``sys_info`` (a
pickle), ``storages`` (a pickled count; per storage a pickled ``(key, location,
storage_type)``, the 8-byte count and the bytes; then a pickled list of views ``(key,
root_key, offset, numel)``), ``tensors`` (a pickled count; per tensor a pickled ``(key,
storage_key, tensor_type)``, then ``<i ndim``, 4 pad bytes, ``ndim`` int64 sizes, ``ndim``
int64 strides and an int64 storage offset) and ``pickle`` (the object pickle, whose
persistent ids are tensor/storage keys as text, or ``(class, source_file, source)``).

Edge cases: every pickle runs through modelport's restricted machine; storage counts are
checked against the bytes left before anything is mapped; storages are zero-copy ranges
of the file; class sources saved with pickled modules are returned as code, never run.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    ModelportError,
)
from modelport.formats._legacy_stream import (
    COUNT_SIZE,
    Sources,
    check_data,
    check_sys_info,
    count_of,
    mapped,
    read_stream,
    storage_dtype,
    text_of,
)
from modelport.formats._tar import TarListing, TarMember, list_tar
from modelport.formats._torch_magic import is_magic_number as is_magic_number
from modelport.formats._torch_magic import opens_with_magic
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.pickles.reading import read_pickle
from modelport.pickles.records import GlobalRef
from modelport.pickles.torch_types import TypedStorage, tensor_from_storage
from modelport.tensors import Storage, TensorRef

TAR_MEMBERS = ("sys_info", "pickle", "tensors", "storages")


# -- sniffing ---------------------------------------------------------------------------------
def sniff(probe: Probe) -> bool:
    if probe.is_dir or not probe.head:
        return False
    return _is_tar(probe.head) or opens_with_magic(probe.head)


# -- tar layout -------------------------------------------------------------------------------
def _is_tar(head: bytes) -> bool:
    """A tar, as tarfile reads it, that lists a member of the legacy layout in its first
    bytes (torch writes sys_info first; torch.load reads the members by name)."""
    try:
        listing = list_tar(head, whole=False)
    except CorruptFileError:
        return False
    return any(m.name in TAR_MEMBERS for m in listing.members)


class _Cursor:
    """Reads one tar member: pickles and fixed-size fields, never past the member's end."""

    def __init__(
        self, data: memoryview, member: TarMember, path: Path, spans: list[PickleSpan] | None
    ) -> None:
        self.data = data[: member.offset + member.size]
        self.pos = member.offset
        self.name = member.name
        self.path = path
        self.spans = spans

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def pickle(self, loader: Callable[[Any], Any] | None = None) -> Any:
        result = read_pickle(self.data, start=self.pos, path=self.path, storage_loader=loader)
        if self.spans is not None:
            self.spans.append(PickleSpan(self.name, self.pos, result.end))
        self.pos = result.end
        return result.value

    def take(self, n: int) -> memoryview:
        check_data(self.pos + n, len(self.data), f"tar member {self.name!r}", self.path)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


@dataclass(frozen=True)
class PickleSpan:
    """Where one pickle of a tar layout lies: its member and absolute byte range."""

    member: str
    start: int
    end: int


def tar_pickle_spans(path: Path) -> tuple[list[PickleSpan], str | None]:
    """Every pickle a 0.x tar layout holds, in the order torch reads them, for the scanner;
    with the reason the walk stopped early, if it did."""
    spans: list[PickleSpan] = []
    with mapped(path) as data:
        try:
            _read_tar(path, data, spans)
        except ModelportError as exc:
            return spans, str(exc)
    return spans, None


def layout_members(listing: TarListing, path: Path) -> dict[str, TarMember]:
    """The members torch reads by name (``tar.extract``, ``tar.extractfile``: the last of a
    name), each one whose bytes are its content; a link, folder or sparse file under a
    layout name is refused, for tarfile would hand torch another member's bytes or none."""
    chosen: dict[str, TarMember] = {}
    for name in TAR_MEMBERS:
        member = listing.get(name)
        if member is None:
            continue
        if not member.plain:
            raise CorruptFileError(
                f"legacy torch tar member {name!r} is a {member.kind}, not a plain file: "
                "tarfile would give torch other bytes than its own; not read",
                path=path,
            )
        chosen[name] = member
    missing = [n for n in TAR_MEMBERS[1:] if n not in chosen]
    if missing:
        raise CorruptFileError(f"legacy torch tar has no {missing[0]!r} member", path=path)
    return chosen


def _read_tar(path: Path, data: memoryview, spans: list[PickleSpan] | None = None) -> Contents:
    listing = list_tar(data, path=path)
    members = layout_members(listing, path)
    for name, member in members.items():
        check_data(member.offset + member.size, len(data), f"tar member {name!r}", path)
    sys_info: dict[str, Any] = {}
    if "sys_info" in members:
        sys_info = check_sys_info(_Cursor(data, members["sys_info"], path, spans).pickle(), path)
    objects: dict[int, Any] = {}
    storage_count = _tar_storages(_Cursor(data, members["storages"], path, spans), objects)
    _tar_tensors(_Cursor(data, members["tensors"], path, spans), objects)
    sources = Sources({})

    def load(pid: Any) -> Any:
        if isinstance(pid, tuple):
            return sources.module(pid[0], pid[2] if len(pid) >= 3 else None) if pid else None
        try:
            return objects[int(text_of(pid))]
        except (KeyError, ValueError):
            raise CorruptFileError(
                f"unknown tensor or storage key {pid!r:.40}", path=path
            ) from None

    tree = _Cursor(data, members["pickle"], path, spans).pickle(load)
    details = {"layout": "tar", "sys_info": sys_info, "storages": storage_count}
    warnings = [
        f"the tar holds more than one member at {name!r}: the last copy is read, as torch does"
        for name in listing.duplicates
    ]
    return Contents(
        Format.TORCH_LEGACY, tree, details=details, code=sources.code, warnings=warnings
    )


def _tar_storages(cursor: _Cursor, objects: dict[int, Any]) -> int:
    path = cursor.path
    count = count_of(cursor.pickle(), "storage count", path)
    if count * COUNT_SIZE > cursor.left:
        raise CorruptFileError(f"{count} storages do not fit in the storages member", path=path)
    for _ in range(count):
        entry = cursor.pickle()
        if not isinstance(entry, tuple) or len(entry) != 3:
            raise CorruptFileError("malformed storage record in the storages member", path=path)
        key = count_of(entry[0], "storage key", path)
        dtype = storage_dtype(entry[2], path)
        (numel,) = struct.unpack("<q", cursor.take(COUNT_SIZE))
        numel = count_of(numel, f"element count of storage {key}", path)
        nbytes = numel * dtypes.dtype(dtype).itemsize
        start = cursor.pos
        cursor.take(nbytes)
        storage = Storage(path, start, nbytes, key=str(key))
        objects[key] = TypedStorage(storage, dtype, numel, text_of(entry[1]))
    views = cursor.pickle()
    if not isinstance(views, list):
        raise CorruptFileError("storage views are not a list", path=path)
    for view in views:
        if not isinstance(view, tuple) or len(view) != 4:
            raise CorruptFileError("malformed storage view record", path=path)
        target, root_key, offset, numel = (count_of(v, "storage view field", path) for v in view)
        root = objects.get(root_key)
        if not isinstance(root, TypedStorage) or offset + numel > root.numel:
            raise CorruptFileError(f"storage view {target} lies outside its storage", path=path)
        itemsize = dtypes.dtype(root.dtype).itemsize
        base = root.storage
        storage = Storage(path, base.offset + offset * itemsize, numel * itemsize, key=str(target))
        objects[target] = TypedStorage(storage, root.dtype, numel, root.location)
    return count


def _tar_tensors(cursor: _Cursor, objects: dict[int, Any]) -> None:
    path = cursor.path
    count = count_of(cursor.pickle(), "tensor count", path)
    if count * 16 > cursor.left:
        raise CorruptFileError(f"{count} tensors do not fit in the tensors member", path=path)
    for _ in range(count):
        entry = cursor.pickle()
        if not isinstance(entry, tuple) or len(entry) != 3:
            raise CorruptFileError("malformed tensor record in the tensors member", path=path)
        key = count_of(entry[0], "tensor key", path)
        (ndim,) = struct.unpack("<i", cursor.take(4))
        cursor.take(4)  # legacy encoding treated ndim as 8 bytes
        if not 0 <= ndim <= limits.MAX_RANK:
            raise CorruptFileError(f"tensor {key} has {ndim} dimensions", path=path)
        sizes = struct.unpack(f"<{ndim}q", cursor.take(8 * ndim))
        strides = struct.unpack(f"<{ndim}q", cursor.take(8 * ndim))
        (offset,) = struct.unpack("<q", cursor.take(8))
        storage = objects.get(entry[1]) if entry[1] is not None else None
        if storage is None:
            objects[key] = _storageless(entry[2], sizes, path)
        elif isinstance(storage, TypedStorage):
            objects[key] = tensor_from_storage(storage, offset, sizes, strides)
        else:
            raise CorruptFileError(
                f"tensor {key} refers to unknown storage {entry[1]!r}", path=path
            )


def _storageless(tensor_type: Any, sizes: tuple[int, ...], path: Path) -> TensorRef:
    name = tensor_type.name if isinstance(tensor_type, GlobalRef) else ""
    dtype = dtypes.TORCH_STORAGE_TYPES.get(name.replace("Tensor", "Storage"), "float32")
    if any(n < 0 for n in sizes) or 0 not in sizes:
        raise CorruptFileError("a tensor without storage must be empty", path=path)
    return TensorRef(dtype, tuple(sizes), Storage(None, 0, 0))


# -- entry point ------------------------------------------------------------------------------
def read(path: Path, probe: Probe) -> Contents:
    with mapped(path) as data:
        if _is_tar(probe.head):
            return _read_tar(path, data)
        return read_stream(path, data)


READER = FormatReader(Format.TORCH_LEGACY, sniff, read, (".pt", ".pth", ".bin", ".ckpt", ".tar"))
