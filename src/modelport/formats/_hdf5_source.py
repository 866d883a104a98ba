"""Reading HDF5 datasets through h5py: the open file, its errors, and one dataset's bytes.

h5py (the HDF5 library) decodes each dataset's filter pipeline itself: deflate, shuffle,
fletcher32, scale-offset, n-bit and (h5py's own) lzf are built in; other filters (blosc,
lz4, zstd, bitshuffle, ...) are plugins the library may not have. ``undecodable_filters``
asks the library which of a dataset's filters it cannot run, before anything is read, so
such a dataset is listed with a note and reading it raises ``UnsupportedVersionError``
naming the filter, while the file's other datasets read as usual.

Element types are tensors only when they equal a standard HDF5 type (``standard_type``), or
a standard bitfield: PyTables stores bool as an 8-bit bitfield, which h5py reads as the
unsigned integer of the bitfield's size, and so does modelport.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport import limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    MissingDependencyError,
    ModelportError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from modelport.formats._hdf5_attrs import standard_type
from modelport.formats._hdf5_raw import filter_label
from modelport.tensors import NDArray

if TYPE_CHECKING:
    import numpy as np

BITFIELD_SIZES = (1, 2, 4, 8)


def import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError("h5py", "h5py", "Reading HDF5 files") from None
    return h5py


class H5Source:
    """An h5py file opened on demand and kept open until ``close`` (or interpreter exit).

    ``opener`` returns the h5py file and the objects to close after it (a file object the
    h5py file reads through). A finalizer closes both in the right order at exit, which
    h5py's file-object driver needs to shut down cleanly.

    A conversion reads the source on two threads (the writer, and the checks that read it
    again), so one lock covers each use: a file opened just for one block is never closed
    under another thread's read. h5py serialises its calls anyway, so nothing is lost.
    """

    def __init__(self, opener: Callable[[], tuple[Any, list[Any]]]) -> None:
        self._opener = opener
        self._handle: Any = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._lock = threading.RLock()

    def get(self) -> Any:
        with self._lock:
            if self._handle is None:
                handle, extras = self._opener()
                self._handle = handle
                self._finalizer = weakref.finalize(self, _close_all, handle, extras)
            return self._handle

    def close(self) -> None:
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._handle = None
            self._finalizer = None

    @contextmanager
    def file(self) -> Iterator[Any]:
        """The open handle, or the file opened just for this block after ``close``."""
        with self._lock:
            if self._handle is not None:
                yield self._handle
                return
            try:
                yield self.get()
            finally:
                self.close()


def _close_all(handle: Any, extras: list[Any]) -> None:
    for item in [handle, *extras]:
        try:
            item.close()
        except Exception:  # closing must never raise at exit
            pass


def h5_errors(what: str, path: Path | None) -> Callable[[BaseException], ModelportError]:
    """A translator from h5py's exceptions to modelport's (truncation recognised)."""

    def translate(exc: BaseException) -> ModelportError:
        if isinstance(exc, ModelportError):
            return exc
        text = str(exc)
        match = re.search(r"eof = (\d+).*stored_eof = (\d+)", text)
        if "truncated file" in text and match:
            actual, expected = int(match.group(1)), int(match.group(2))
            return TruncatedFileError(
                f"HDF5 file is truncated ({what}): {text}",
                expected=expected,
                actual=actual,
                path=path,
            )
        return CorruptFileError(f"HDF5 {what} failed: {type(exc).__name__}: {text}", path=path)

    return translate


def numeric_type(h5py: Any, file_type: Any) -> tuple[np.dtype[Any], bool] | str:
    """(numpy dtype, stored little-endian) of a standard numeric or bitfield type, or why the
    type is no tensor."""
    import numpy as np  # h5py has loaded it already

    if file_type.get_class() == h5py.h5t.BITFIELD:
        for size in BITFIELD_SIZES:
            bits = size * 8
            for order, little in (("LE", True), ("BE", False)):
                if file_type.equal(getattr(h5py.h5t, f"STD_B{bits}{order}")):
                    return np.dtype(f"{'<' if little else '>'}u{size}"), little or size == 1
        return "non-standard bitfield"
    return standard_type(h5py, file_type)


def undecodable_filters(h5py: Any, plist: Any) -> list[str]:
    """The filters of a dataset's pipeline this HDF5 library cannot run, as labels."""
    missing = []
    for index in range(plist.get_nfilters()):
        code, _, _, stored_name = plist.get_filter(index)
        if not h5py.h5z.filter_avail(code):
            missing.append(filter_label(int(code), stored_name))
    return missing


def refusing_reader(name: str, filters: list[str], path: Path) -> Callable[[], NDArray]:
    """The reader of a dataset whose filters cannot be decoded here: it names them."""

    def refuse() -> NDArray:
        raise UnsupportedVersionError(
            f"dataset {name!r} is compressed with {', '.join(filters)}, a filter this HDF5 "
            "library (h5py's) does not have; the file's other datasets read as usual",
            path=path,
        )

    return refuse


def dataset_reader(
    source: H5Source,
    name: str,
    shape: tuple[int, ...],
    numpy_dtype: np.dtype[Any],
    dtype_name: str,
    nbytes: int,
    path: Path,
) -> Callable[[], NDArray]:
    """Reads one dataset through h5py, converted to little-endian, as flat bytes."""

    def read_bytes() -> NDArray:
        import numpy as np

        read = DatasetRead(source, name, shape, numpy_dtype, dtype_name, path)
        data = read.taking(lambda dset: np.asarray(dset[()]), nbytes)
        if dtype_name == "bfloat16":
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        converted = np.ascontiguousarray(data.astype(numpy_dtype, copy=False))
        return converted.reshape(-1).view(np.uint8)

    return read_bytes


@dataclass(frozen=True)
class DatasetRead:
    """One dataset as it was seen when the file was opened: what a read checks it still is."""

    source: H5Source
    name: str
    shape: tuple[int, ...]
    numpy_dtype: np.dtype[Any]
    dtype_name: str
    path: Path

    def taking(self, take: Callable[[Any], NDArray], nbytes: int) -> NDArray:
        """``take(dataset)``, refused above ``MAX_HDF5_READ_BYTES`` and when the file no
        longer holds the dataset seen, h5py's errors typed."""
        name = self.name
        if nbytes > limits.MAX_HDF5_READ_BYTES:
            raise LimitExceededError(
                f"dataset {name!r} size", limits.MAX_HDF5_READ_BYTES, nbytes, path=self.path
            )
        h5py = import_h5py()
        translate = h5_errors(f"reading dataset {name!r}", self.path)
        try:
            with self.source.file() as handle:
                dset = open_by_hard_links(h5py, handle, name)
                seen = (self.shape, self.numpy_dtype, self.dtype_name)
                if dset is None or not same_dataset(h5py, dset, *seen):
                    raise CorruptFileError(f"dataset {name!r} changed since it was opened")
                return take(dset)
        except Exception as exc:
            raise translate(exc) from None


def same_dataset(
    h5py: Any, dset: Any, shape: tuple[int, ...], numpy_dtype: np.dtype[Any], dtype_name: str
) -> bool:
    """Still the shape and (standard) type seen when the file was opened (it may have been
    reopened since)."""
    if tuple(dset.shape or ()) != shape:
        return False
    file_type = dset.id.get_type()
    if dtype_name == "bfloat16":
        return bool(file_type.get_class() == h5py.h5t.OPAQUE and file_type.get_size() == 2)
    kind = numeric_type(h5py, file_type)
    return not isinstance(kind, str) and kind[0].newbyteorder("<") == numpy_dtype


def open_by_hard_links(h5py: Any, handle: Any, name: str) -> Any:
    group = handle
    parts = name.split("/")
    for index, part in enumerate(parts):
        if not isinstance(group.get(part, getlink=True), h5py.HardLink):
            return None
        group = group[part]
        if index < len(parts) - 1 and not isinstance(group, h5py.Group):
            return None
    return group if isinstance(group, h5py.Dataset) else None
