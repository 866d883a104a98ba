"""The stream layout of torch's legacy checkpoints (see ``torch_legacy`` for the format):
its constants, the checks shared with the tar layout, and the reading of consecutive pickles
followed by raw storages."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport import dtypes, limits
from modelport.errors import (
    CorruptFileError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from modelport.formats._torch_magic import MAGIC_NUMBER as MAGIC_NUMBER
from modelport.formats.protocol import Contents, Format
from modelport.pickles.interface import Limits
from modelport.pickles.reading import read_pickle
from modelport.pickles.records import GlobalRef
from modelport.pickles.torch_types import StorageType, TypedStorage
from modelport.tensors import Storage

PROTOCOL_VERSION = 1001
COUNT_SIZE = 8
SMALL_LIMITS = Limits(max_opcodes=100_000, max_memo=100_000, max_stack=100_000, max_marks=1_000)


# -- shared helpers ---------------------------------------------------------------------------
@contextmanager
def mapped(path: Path) -> Iterator[memoryview]:
    """The file as a read-only memory map (pickles are read in place, storages never)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise TruncatedFileError("empty file", expected=1, actual=0, path=path)
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapping)
    try:
        yield view
    finally:
        try:
            view.release()
            mapping.close()
        except BufferError:  # a traceback still holds a view; the map closes when it goes
            pass


def text_of(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def count_of(value: Any, what: str, path: Path) -> int:
    if type(value) is not int or value < 0:
        raise CorruptFileError(
            f"{what} must be a non-negative integer, got {value!r:.40}", path=path
        )
    return value


def storage_dtype(storage_type: Any, path: Path) -> str:
    if not isinstance(storage_type, StorageType):
        raise CorruptFileError(f"unknown storage type {storage_type!r:.80}", path=path)
    return storage_type.dtype


@dataclass
class Sources:
    """Class sources saved alongside pickled modules: kept as text, bounded in total."""

    code: dict[str, str]
    total: int = 0

    def module(self, cls: Any, source: Any) -> Any:
        if (
            isinstance(cls, GlobalRef)
            and isinstance(source, str)
            and cls.path not in self.code
            and self.total + len(source) <= limits.MAX_CODE_BYTES
        ):
            self.code[cls.path] = source
            self.total += len(source)
        return cls


def check_data(end: int, size: int, what: str, path: Path) -> None:
    if end > size:
        raise TruncatedFileError(
            f"{what} ends at byte {end}, past the end of the {size}-byte file",
            expected=end,
            actual=size,
            path=path,
        )


# -- stream layout ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Root:
    dtype: str
    numel: int
    location: str


@dataclass(frozen=True)
class _View:
    root: str
    offset: int
    numel: int


class _StreamStorages:
    """Persistent ids of the stream layout. Pass one records what the object pickle declares;
    once the storage offsets are known, pass two hands out the real (shared) storages."""

    def __init__(self, path: Path, size: int, sources: Sources) -> None:
        self.path = path
        self.size = size
        self.sources = sources
        self.roots: dict[str, _Root] = {}
        self.views: dict[str, _View] = {}
        self.offsets: dict[str, int] | None = None
        self.made: dict[str, TypedStorage] = {}

    def load(self, pid: Any) -> Any:
        path = self.path
        if not isinstance(pid, tuple) or not pid:
            raise CorruptFileError(f"unexpected persistent id {pid!r:.80}", path=path)
        kind = text_of(pid[0])
        if kind == "module" and len(pid) == 4:
            return self.sources.module(pid[1], pid[3])
        if kind != "storage" or len(pid) != 6:
            raise CorruptFileError(f"unexpected persistent id {pid!r:.80}", path=path)
        _, storage_type, root_key, location, numel, view = pid
        dtype = storage_dtype(storage_type, path)
        key = text_of(root_key)
        numel = count_of(numel, f"element count of storage {key!r}", path)
        nbytes = numel * dtypes.dtype(dtype).itemsize
        if nbytes > self.size:
            raise TruncatedFileError(
                f"storage {key!r} declares {numel} elements ({nbytes:,} bytes), more than the "
                f"whole file holds (truncated download?)",
                expected=nbytes,
                actual=self.size,
                path=path,
            )
        root = self.roots.setdefault(key, _Root(dtype, numel, text_of(location)))
        if view is None:
            return self._typed(key, key, 0, root.numel, root)
        if not isinstance(view, tuple) or len(view) != 3:
            raise CorruptFileError(f"malformed view of storage {key!r}", path=path)
        view_key = text_of(view[0])
        offset = count_of(view[1], "storage view offset", path)
        count = count_of(view[2], "storage view size", path)
        if offset + count > root.numel:
            raise CorruptFileError(
                f"view {view_key!r} covers elements {offset}..{offset + count} of storage "
                f"{key!r}, which holds {root.numel}",
                path=path,
            )
        first = self.views.setdefault(view_key, _View(key, offset, count))
        return self._typed(view_key, first.root, first.offset, first.numel, self.roots[first.root])

    def _typed(self, name: str, root_key: str, offset: int, numel: int, root: _Root) -> Any:
        cached = self.made.get(name)
        if cached is not None:
            return cached
        itemsize = dtypes.dtype(root.dtype).itemsize
        if self.offsets is None:
            placeholder = Storage(None, 0, numel * itemsize, key=name)
            return TypedStorage(placeholder, root.dtype, numel, root.location)
        start = self.offsets.get(root_key)
        if start is None:
            raise CorruptFileError(f"storage {root_key!r} has no data in the file", path=self.path)
        storage = Storage(self.path, start + offset * itemsize, numel * itemsize, key=name)
        typed = TypedStorage(storage, root.dtype, numel, root.location)
        self.made[name] = typed
        return typed


def read_stream(path: Path, data: memoryview) -> Contents:
    size = len(data)
    magic = read_pickle(data, limits=SMALL_LIMITS)
    if type(magic.value) is not int or magic.value != MAGIC_NUMBER:
        raise CorruptFileError("not a torch legacy file (wrong magic number)", path=path)
    version = read_pickle(data, start=magic.end, limits=SMALL_LIMITS)
    if version.value != PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"torch legacy protocol version {version.value!r:.40} (only {PROTOCOL_VERSION})",
            path=path,
        )
    info = read_pickle(data, start=version.end, limits=SMALL_LIMITS)
    sys_info = check_sys_info(info.value, path)
    sources = Sources({})
    storages = _StreamStorages(path, size, sources)
    first = read_pickle(data, start=info.end, path=path, storage_loader=storages.load)
    keys_result = read_pickle(data, start=first.end)
    keys = _storage_keys(keys_result.value, storages.roots, size - keys_result.end, path)
    offsets: dict[str, int] = {}
    pos = keys_result.end
    for key in keys:
        root = storages.roots[key]
        check_data(pos + COUNT_SIZE, size, f"element count of storage {key!r}", path)
        (count,) = struct.unpack("<q", data[pos : pos + COUNT_SIZE])
        if count != root.numel:
            raise CorruptFileError(
                f"storage {key!r} is stored with {count} elements, the object pickle "
                f"declares {root.numel}",
                path=path,
            )
        nbytes = count * dtypes.dtype(root.dtype).itemsize
        check_data(pos + COUNT_SIZE + nbytes, size, f"storage {key!r}", path)
        offsets[key] = pos + COUNT_SIZE
        pos += COUNT_SIZE + nbytes
    storages.offsets = offsets
    storages.made.clear()
    sources.code.clear()
    sources.total = 0
    second = read_pickle(data, start=info.end, path=path, storage_loader=storages.load)
    warnings = []
    if pos != size:
        warnings.append(f"{size - pos} bytes follow the last storage and were ignored")
    details: dict[str, Any] = {
        "layout": "stream",
        "pickle_protocol": second.protocol,
        "sys_info": sys_info,
        "storages": len(keys),
        "devices": sorted({r.location for r in storages.roots.values()}),
    }
    return Contents(
        Format.TORCH_LEGACY, second.value, details=details, code=sources.code, warnings=warnings
    )


def check_sys_info(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CorruptFileError("torch legacy sys_info is not a dict", path=path)
    if value.get("little_endian", True) is False:
        raise UnsupportedVersionError("big-endian torch legacy files are not supported", path=path)
    plain: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            item = {str(k): v for k, v in item.items() if isinstance(v, (bool, int, str))}
        if isinstance(key, str) and isinstance(item, (bool, int, str, dict)):
            plain[key] = item
    return plain


def _storage_keys(value: Any, roots: dict[str, _Root], room: int, path: Path) -> list[str]:
    if not isinstance(value, list):
        raise CorruptFileError("the storage key list is not a list", path=path)
    keys = [text_of(k) for k in value]
    if len(keys) * COUNT_SIZE > room:
        raise TruncatedFileError(
            f"{len(keys)} storages listed but only {room} bytes follow",
            expected=len(keys) * COUNT_SIZE,
            actual=room,
            path=path,
        )
    if len(set(keys)) != len(keys):  # torch would read the second copy over the first
        raise CorruptFileError("a storage key is listed twice", path=path)
    unknown = [k for k in keys if k not in roots]
    if unknown:
        raise CorruptFileError(f"storage {unknown[0]!r} is listed but never used", path=path)
    listed = set(keys)
    missing = [k for k in roots if k not in listed]
    if missing:
        raise CorruptFileError(f"storage {missing[0]!r} has no data in the file", path=path)
    return keys
