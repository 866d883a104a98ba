"""Zip archives read the way torch's reader reads them: directory first, data in place.

Layout (APPNOTE 6.3): local file headers with their data, then the central directory,
then the end-of-central-directory record (EOCD, plus zip64 locator and record when sizes
pass 4 GiB). We parse the central directory ourselves so that:

- a member's data offset is known without reading it (torch stores tensor records
  uncompressed and 64-byte aligned, so a tensor is a plain byte range of the file);
- counts, sizes and offsets are checked against the file before anything is allocated;
- duplicate names resolve to the first entry, as torch's miniz lookup does;
- names that would escape a directory (``../``, absolute) are reported, never followed.

A directory is read for one kind of reader (``ZipView``): torch's, or Python's ``zipfile``,
which finds the directory and names its members by other rules (``_zip_ends``). The two
views are one object when they agree, as they do for every zip a writer makes.
"""

from __future__ import annotations

import io
import mmap
import struct
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from modelport import limits
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
)
from modelport.formats._compressed import BZIP2 as BZIP2
from modelport.formats._compressed import DEFLATED as DEFLATED
from modelport.formats._compressed import LZMA as LZMA
from modelport.formats._zip_ends import EOCD_SIGNATURE as EOCD_SIGNATURE
from modelport.formats._zip_ends import EOCD_SIZE as EOCD_SIZE
from modelport.formats._zip_ends import LOCAL_SIGNATURE as LOCAL_SIGNATURE
from modelport.formats._zip_ends import MAX_COMMENT as MAX_COMMENT
from modelport.formats._zip_ends import TAIL_BYTES, ZipEnd, torch_end, zipfile_end
from modelport.formats._zip_ends import ZIP64_EOCD_SIGNATURE as ZIP64_EOCD_SIGNATURE
from modelport.formats._zip_ends import ZIP64_LOCATOR_SIGNATURE as ZIP64_LOCATOR_SIGNATURE
from modelport.formats._zip_ends import ZipView as ZipView
from modelport.formats._zip_ends import has_zip_tail as has_zip_tail
from modelport.formats._zip_ends import prepended_bytes as prepended_bytes
from modelport.formats._zip_inflate import inflate_deflated as inflate_deflated
from modelport.formats._zip_inflate import inflate_member as inflate_member

CENTRAL_SIGNATURE = b"PK\x01\x02"
LOCAL_HEADER_SIZE = 30

STORED = 0
# What Python's zipfile (numpy.load) inflates; torch's miniz reads stored and deflated only
# ("PytorchStreamReader failed retrieving file meta-data ...: unsupported method").
INFLATED_METHODS = frozenset((DEFLATED, BZIP2, LZMA))
ZIPFILE_METHODS = frozenset((STORED, *INFLATED_METHODS))
TORCH_METHODS = frozenset((STORED, DEFLATED))
# A central-directory record's fixed part, the fields kept: flags, method, CRC-32,
# compressed and uncompressed size, name / extra / comment lengths, local header offset
# (skipped: the signature, versions, time and date, disk number, attributes).
_CENTRAL = struct.Struct("<8xHH4xIIIHHH8xI")
_LOCAL_LENGTHS = struct.Struct("<HH")  # a local header's name and extra lengths, at byte 26


# The directories read last, by file identity: sniffing, reading and scanning one archive
# each ask for its directory, which for a million members costs seconds to parse. A file
# changed since (size, times or inode) is read afresh; a failed read is not kept.
_RECENT: dict[tuple[object, ...], ZipDirectory] = {}
_RECENT_KEPT = 4
_MAP_AT_MOST = 16 << 20  # files larger are read by slices (``_mapped``)


class Bytes(Protocol):
    """What the directory is parsed from: the file's bytes, sliced (a memory map of it, the
    bytes of a zip held in memory, or ``_FileBytes``)."""

    def __getitem__(self, span: slice, /) -> bytes: ...


class ZipEntry(NamedTuple):
    """One central-directory record, with where its data begins in the file. A tuple, not a
    dataclass: a directory builds one per member, up to a million, and a frozen dataclass
    costs three times as much to build."""

    name: str
    method: int
    compressed_size: int
    size: int
    crc32: int
    header_offset: int
    data_offset: int
    local_name: str = ""  # the name in the member's own header; "" when not read yet

    @property
    def is_stored(self) -> bool:
        return self.method == STORED


@dataclass(frozen=True)
class ZipDirectory:
    """``entries`` are every record of the central directory, walked by its byte size as
    Python's ``zipfile`` walks it; ``declared_count`` is what the end record says, which is
    all torch's reader walks (-1 in zipfile's view, which never counts). ``blob`` holds the
    bytes of a zip read from memory (a member of another archive); otherwise members are
    read from ``path``, the zip at ``start`` in it spanning ``length`` bytes (None: to the
    file's end). ``end`` is where this view's reader found the directory, ``zipfile_end``
    where Python's zipfile finds it (None where zipfile refuses the zip)."""

    path: Path
    entries: tuple[ZipEntry, ...]
    unsafe_names: tuple[str, ...]
    declared_count: int = -1
    blob: bytes | None = None
    view: ZipView = ZipView.TORCH
    end: ZipEnd | None = None
    zipfile_end: ZipEnd | None = None
    start: int = 0
    length: int | None = None

    @property
    def zipfile_agrees(self) -> bool:
        """Whether Python's zipfile reads the members this directory lists, where it lists
        them and under the same names."""
        same = self.end is not None and self.end == self.zipfile_end
        return same and not self.nul_names

    @property
    def nul_names(self) -> list[str]:
        """Names holding a NUL: zipfile cuts them there, torch keeps them whole."""
        return [e.name for e in self.entries if "\0" in e.name]

    @classmethod
    def read(
        cls,
        path: Path,
        *,
        start: int = 0,
        length: int | None = None,
        held: memoryview | None = None,
        view: ZipView = ZipView.TORCH,
    ) -> ZipDirectory:
        """The directory of the zip in ``path``, or of one embedded at ``start`` and spanning
        ``length`` bytes (a ``torch.save`` blob inside another file), as ``view``'s reader
        reads it; offsets in the zip are relative to ``start``, the entries' offsets
        returned are absolute in ``path``. ``held`` is a view of the whole file where the
        caller holds one already (a scan reads a small file whole): the directory is parsed
        there, the file neither opened again nor the result kept. A mapped file is not
        parsed through its map (see ``_mapped``). Zipfile's view of a zip whose two readers
        agree is torch's, parsed once."""
        if view is ZipView.ZIPFILE:
            try:
                torch_view = cls.read(path, start=start, length=length, held=held)
            except ModelportError:
                torch_view = None
            if torch_view is not None and torch_view.end == torch_view.zipfile_end:
                return torch_view.as_zipfile_reads()
        whole = held.obj if held is not None else None
        if isinstance(whole, bytes) and len(whole) == len(held or b""):
            return cls._read(whole, path, len(whole), start, length, None, view)
        stat = path.stat()
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        key = (path, start, length, view, *identity)
        found = _RECENT.get(key)
        if found is None:
            with open(path, "rb") as handle:
                mapped = _mapped(handle, stat.st_size)
                try:
                    source = _FileBytes(handle) if mapped is None else mapped
                    found = cls._read(source, path, stat.st_size, start, length, None, view)
                finally:
                    if mapped is not None:
                        mapped.close()
            if len(_RECENT) >= _RECENT_KEPT:
                del _RECENT[next(iter(_RECENT))]
            _RECENT[key] = found
        return found

    @classmethod
    def from_bytes(cls, blob: bytes, path: Path, view: ZipView = ZipView.TORCH) -> ZipDirectory:
        """The directory of a zip held in memory (``path`` names where it came from)."""
        return cls._read(blob, path, len(blob), 0, None, blob, view)

    def as_zipfile_reads(self) -> ZipDirectory:
        """This directory under the names zipfile gives its members, for a torch view that
        zipfile finds at the same place: the same object when no name holds a NUL."""
        if self.view is ZipView.ZIPFILE or not self.nul_names:
            return self
        entries = tuple(
            e._replace(name=_cut(e.name), local_name=_cut(e.local_name)) for e in self.entries
        )
        return replace(self, entries=entries, view=ZipView.ZIPFILE, declared_count=-1)

    def zipfile_view(self) -> ZipDirectory:
        """The same zip as Python's zipfile reads it (numpy.load, Keras): this directory
        when the two agree; raises where zipfile refuses the zip."""
        if self.view is ZipView.ZIPFILE or self.end == self.zipfile_end:
            return self.as_zipfile_reads()
        if self.blob is not None:
            return ZipDirectory.from_bytes(self.blob, self.path, ZipView.ZIPFILE)
        return ZipDirectory.read(
            self.path, start=self.start, length=self.length, view=ZipView.ZIPFILE
        )

    def _open(self) -> BinaryIO:
        return io.BytesIO(self.blob) if self.blob is not None else open(self.path, "rb")

    @classmethod
    def _read(
        cls,
        source: Bytes,
        path: Path,
        file_size: int,
        start: int,
        length: int | None,
        blob: bytes | None,
        view: ZipView = ZipView.TORCH,
    ) -> ZipDirectory:
        size = file_size - start if length is None else length
        if start < 0 or size < 0 or start + size > file_size:
            raise TruncatedFileError(
                f"embedded zip at bytes {start}..{start + size} lies outside the "
                f"{file_size}-byte file",
                expected=start + size,
                actual=file_size,
                path=path,
            )
        tail = source[start + size - min(size, TAIL_BYTES) : start + size]

        def read_at(offset: int, count: int) -> bytes:
            return source[start + offset : start + offset + count] if offset >= 0 else b""

        try:
            other: ZipEnd | None = zipfile_end(tail, size, read_at, path)
        except ModelportError:
            if view is ZipView.ZIPFILE:
                raise
            other = None
        end = (
            torch_end(tail, size, read_at, path)
            if other is None or view is ZipView.TORCH
            else other
        )
        count = end.count if view is ZipView.TORCH else -1
        if count > limits.MAX_ZIP_ENTRIES:
            raise LimitExceededError("zip entry count", limits.MAX_ZIP_ENTRIES, count, path=path)
        directory = read_at(end.directory_at, end.directory_size)
        entries, unsafe = _parse_central(
            directory, size, path, source, start, end.shift, cut=view is ZipView.ZIPFILE
        )
        return cls(
            path,
            tuple(entries),
            tuple(unsafe),
            count,
            blob,
            view=view,
            end=end,
            zipfile_end=other,
            start=start,
            length=length,
        )

    @property
    def mismatched_names(self) -> list[str]:
        """Members whose local header names another file than the central directory does."""
        return [e.name for e in self.entries if e.local_name and e.local_name != e.name]

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def find(self, name: str) -> ZipEntry | None:
        return self._by_name.get(name)

    @cached_property
    def _by_name(self) -> dict[str, ZipEntry]:
        index: dict[str, ZipEntry] = {}
        for entry in self.entries:  # first match wins, as in torch's reader
            index.setdefault(entry.name, entry)
        return index

    def holds_stored_zip(self, entry: ZipEntry) -> bool:
        """Whether a member is a zip stored as it is (a ``torch.save`` file inside a .pt2)."""
        if not entry.is_stored or entry.size < len(LOCAL_SIGNATURE):
            return False
        with self._open() as handle:
            handle.seek(entry.data_offset)
            return handle.read(len(LOCAL_SIGNATURE)) == LOCAL_SIGNATURE

    def read_member(
        self,
        entry: ZipEntry,
        limit: int = limits.MAX_ZIP_MEMBER_INFLATED,
        methods: frozenset[int] = TORCH_METHODS,
    ) -> bytes:
        """A member's bytes, inflated if needed, never more than ``limit`` of them. Only the
        ``methods`` its loader reads are read: torch's by default, zipfile's (bzip2, LZMA)
        for the formats Python's zipfile loads."""
        if entry.size > limit:
            raise LimitExceededError(
                f"zip member {entry.name!r} size", limit, entry.size, path=self.path
            )
        with self._open() as handle:
            handle.seek(entry.data_offset)
            raw = handle.read(entry.compressed_size)
        if len(raw) != entry.compressed_size:
            raise TruncatedFileError(
                f"zip member {entry.name!r} is cut short",
                expected=entry.compressed_size,
                actual=len(raw),
                path=self.path,
            )
        if entry.method == STORED:
            return raw
        if entry.method not in methods:
            why = "torch reads stored and deflated members only" if methods == TORCH_METHODS else ""
            raise CorruptFileError(
                f"zip member {entry.name!r} uses compression method {entry.method}"
                + (f": {why}" if why else ""),
                path=self.path,
            )
        try:
            data = inflate_member(memoryview(raw), entry.method, limit)
        except CorruptFileError as exc:
            raise CorruptFileError(
                f"zip member {entry.name!r} does not inflate ({exc})", path=self.path
            ) from None
        if len(data) > limit:
            raise LimitExceededError(
                f"zip member {entry.name!r} inflated size", limit, len(data), path=self.path
            )
        return bytes(data)


def _parse_central(
    directory: bytes,
    file_size: int,
    path: Path,
    source: Bytes | None = None,
    start: int = 0,
    shift: int = 0,
    *,
    cut: bool = False,
) -> tuple[list[ZipEntry], list[str]]:
    """Every record in the directory's bytes, whatever the end record's count says (Python's
    zipfile reads them all; a count that hides members is reported by the scanner). With
    ``source`` (the file's bytes, the zip at ``start`` in them) each entry's local header is
    read in the same pass, for where its data begins; without, ``data_offset`` is -1.
    ``shift`` is added to each header offset and ``cut`` ends names at a NUL, as zipfile
    does (``_zip_ends``)."""
    entries: list[ZipEntry] = []
    unsafe: list[str] = []
    unpack = _CENTRAL.unpack_from
    pos, end = 0, len(directory)
    while pos < end:
        if len(entries) >= limits.MAX_ZIP_ENTRIES:
            raise LimitExceededError(
                "zip entry count", limits.MAX_ZIP_ENTRIES, len(entries) + 1, path=path
            )
        if pos + _CENTRAL.size > end or not directory.startswith(CENTRAL_SIGNATURE, pos):
            raise CorruptFileError("zip central directory is malformed", path=path)
        flags, method, crc, csize, usize, name_len, extra_len, comment_len, offset = unpack(
            directory, pos
        )
        name_at = pos + _CENTRAL.size
        name_bytes = directory[name_at : name_at + name_len]
        plain = name_bytes.isascii()  # reads alike in UTF-8 and cp437
        name = (
            name_bytes.decode("ascii")
            if plain
            else name_bytes.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        )
        if extra_len:
            extra = directory[name_at + name_len : name_at + name_len + extra_len]
            usize, csize, offset = _zip64_sizes(extra, usize, csize, offset)
        offset += shift
        if cut and "\0" in name:
            name = _cut(name)
        if offset < 0 or offset + LOCAL_HEADER_SIZE > file_size or csize > file_size:
            raise CorruptFileError(f"zip entry {name!r} points past the end of the file", path=path)
        if method == STORED and csize != usize:
            raise CorruptFileError(
                f"stored zip entry {name!r} claims {usize} bytes but holds {csize}", path=path
            )
        if (".." in name or ":" in name[:3] or name[:1] in ("/", "\\")) and _escapes(name):
            unsafe.append(name)
        if source is None:
            entries.append(ZipEntry(name, method, csize, usize, crc, offset, -1))
        else:
            same_text = plain or bool(flags & 0x800)  # decodes as UTF-8 would
            data_at, local_name = _local_header(
                source, start + offset, name, name_bytes, same_text, path
            )
            local_name = _cut(local_name) if cut else local_name
            data_offset = offset + data_at
            if data_offset + csize > file_size:
                raise TruncatedFileError(
                    f"zip member {name!r} ends at byte {data_offset + csize}, "
                    f"past the end of the {file_size}-byte file",
                    expected=data_offset + csize,
                    actual=file_size,
                    path=path,
                )
            entries.append(
                ZipEntry(
                    name, method, csize, usize, crc, start + offset, start + data_offset, local_name
                )
            )
        pos = name_at + name_len + extra_len + comment_len
    return entries, unsafe


def _cut(name: str) -> str:
    """A name as zipfile's ``ZipInfo`` keeps it: up to its first NUL."""
    return name.split("\0", 1)[0]


def _escapes(name: str) -> bool:
    """Whether a member name leaves the folder it is extracted to (absolute, drive, ``..``)."""
    return (
        name.startswith(("/", "\\"))
        or ":" in name[:3]
        or (".." in name and ".." in name.replace("\\", "/").split("/"))
    )


def _local_header(
    source: Bytes, at: int, name: str, name_bytes: bytes, same_text: bool, path: Path
) -> tuple[int, str]:
    """(where the data begins relative to the local header at ``at``, the name it gives, read
    as UTF-8), from one slice that also takes a name as long as the directory's. A name equal
    to the directory's, in bytes that decode alike, is the directory's string, not a copy."""
    header = source[at : at + LOCAL_HEADER_SIZE + len(name_bytes)]
    if len(header) < LOCAL_HEADER_SIZE or header[:4] != LOCAL_SIGNATURE:
        raise CorruptFileError(f"zip entry {name!r} has no local header", path=path)
    name_len, extra_len = _LOCAL_LENGTHS.unpack_from(header, 26)
    local_name = header[LOCAL_HEADER_SIZE : LOCAL_HEADER_SIZE + name_len]
    if name_len > len(name_bytes):
        local_name = source[at + LOCAL_HEADER_SIZE : at + LOCAL_HEADER_SIZE + name_len]
    text = name if same_text and local_name == name_bytes else local_name.decode("utf-8", "replace")
    return LOCAL_HEADER_SIZE + name_len + extra_len, text


class _FileBytes:
    """A file sliced by reads, where it cannot be memory-mapped."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def __getitem__(self, span: slice, /) -> bytes:
        start, stop = span.start or 0, span.stop
        self._handle.seek(start)
        return self._handle.read(max(0, stop - start))


def _mapped(handle: BinaryIO, size: int) -> mmap.mmap | None:
    """The file mapped, so that slicing it costs no system call; None where it cannot be
    (an empty file, a file system that does not map) or should not be: a large file is read
    header by header, since a fault on a mapped page maps the page cache's whole folio
    around it (megabytes), and a directory's local headers, one beside each member, would
    count hundreds of megabytes of the file in the process's resident set."""
    if not size or size > _MAP_AT_MOST:
        return None
    try:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack("<HH", extra[pos : pos + 4])
        if tag == 0x0001:
            values = extra[pos + 4 : pos + 4 + length]
            cursor = 0
            if usize == 0xFFFFFFFF and cursor + 8 <= len(values):
                (usize,) = struct.unpack("<Q", values[cursor : cursor + 8])
                cursor += 8
            if csize == 0xFFFFFFFF and cursor + 8 <= len(values):
                (csize,) = struct.unpack("<Q", values[cursor : cursor + 8])
                cursor += 8
            if offset == 0xFFFFFFFF and cursor + 8 <= len(values):
                (offset,) = struct.unpack("<Q", values[cursor : cursor + 8])
        pos += 4 + length
    return usize, csize, offset
