"""Zip archives read the way torch's reader reads them: directory first, data in place.

Layout (APPNOTE 6.3): local file headers with their data, then the central directory,
then the end-of-central-directory record (EOCD, plus zip64 locator and record when sizes
pass 4 GiB). We parse the central directory ourselves so that:

- a member's data offset is known without reading it (torch stores tensor records
  uncompressed and 64-byte aligned, so a tensor is a plain byte range of the file);
- counts, sizes and offsets are checked against the file before anything is allocated;
- duplicate names resolve to the first entry, as torch's miniz lookup does;
- names that would escape a directory (``../``, absolute) are reported, never followed.
"""

from __future__ import annotations

import io
import mmap
import struct
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError
from modelport.formats._compressed import BZIP2 as BZIP2
from modelport.formats._compressed import DEFLATED as DEFLATED
from modelport.formats._compressed import LZMA as LZMA
from modelport.formats._compressed import member_pieces

EOCD_SIGNATURE = b"PK\x05\x06"
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
CENTRAL_SIGNATURE = b"PK\x01\x02"
LOCAL_SIGNATURE = b"PK\x03\x04"
EOCD_SIZE = 22
LOCAL_HEADER_SIZE = 30
MAX_COMMENT = 0xFFFF

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
_INFLATE_CHUNK = 1 << 20


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
    all torch's reader walks. ``blob`` holds the bytes of a zip read from memory (a member
    of another archive); otherwise members are read from ``path``."""

    path: Path
    entries: tuple[ZipEntry, ...]
    unsafe_names: tuple[str, ...]
    declared_count: int = -1
    blob: bytes | None = None

    @classmethod
    def read(
        cls,
        path: Path,
        *,
        start: int = 0,
        length: int | None = None,
        held: memoryview | None = None,
    ) -> ZipDirectory:
        """The directory of the zip in ``path``, or of one embedded at ``start`` and spanning
        ``length`` bytes (a ``torch.save`` blob inside another file); offsets in the zip are
        relative to ``start``, the entries' offsets returned are absolute in ``path``.
        ``held`` is a view of the whole file where the caller holds one already (a scan reads
        a small file whole): the directory is parsed there, the file neither opened again
        nor the result kept. A mapped file is not parsed through its map (see ``_mapped``)."""
        whole = held.obj if held is not None else None
        if isinstance(whole, bytes) and len(whole) == len(held or b""):
            return cls._read(whole, path, len(whole), start, length, None)
        stat = path.stat()
        key = (path, start, length, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        found = _RECENT.get(key)
        if found is None:
            with open(path, "rb") as handle:
                view = _mapped(handle, stat.st_size)
                try:
                    source = _FileBytes(handle) if view is None else view
                    found = cls._read(source, path, stat.st_size, start, length, None)
                finally:
                    if view is not None:
                        view.close()
            if len(_RECENT) >= _RECENT_KEPT:
                del _RECENT[next(iter(_RECENT))]
            _RECENT[key] = found
        return found

    @classmethod
    def from_bytes(cls, blob: bytes, path: Path) -> ZipDirectory:
        """The directory of a zip held in memory (``path`` names where it came from)."""
        return cls._read(blob, path, len(blob), 0, None, blob)

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
        tail_len = min(size, EOCD_SIZE + MAX_COMMENT + 20 + 56)
        tail = source[start + size - tail_len : start + size]
        eocd_at = tail.rfind(EOCD_SIGNATURE)
        if eocd_at < 0 or eocd_at + EOCD_SIZE > len(tail):
            raise TruncatedFileError(
                "zip archive has no end-of-central-directory record (truncated download?)",
                expected=size + 1,
                actual=size,
                path=path,
            )
        (_, _, _, _, count, cd_size, cd_offset, _) = struct.unpack(
            "<4sHHHHIIH", tail[eocd_at : eocd_at + EOCD_SIZE]
        )
        eocd_file_offset = size - tail_len + eocd_at
        locator_at = eocd_at - 20
        if locator_at >= 0 and tail[locator_at : locator_at + 4] == ZIP64_LOCATOR_SIGNATURE:
            (zip64_offset,) = struct.unpack("<Q", tail[locator_at + 8 : locator_at + 16])
            if zip64_offset + 56 > size:
                raise CorruptFileError("zip64 end record points past the file", path=path)
            record = source[start + zip64_offset : start + zip64_offset + 56]
            if len(record) < 56 or record[:4] != ZIP64_EOCD_SIGNATURE:
                raise CorruptFileError("zip64 end record missing", path=path)
            count, cd_size, cd_offset = struct.unpack("<QQQ", record[32:56])
            eocd_file_offset = zip64_offset
        if count > limits.MAX_ZIP_ENTRIES:
            raise LimitExceededError("zip entry count", limits.MAX_ZIP_ENTRIES, count, path=path)
        if cd_offset + cd_size > eocd_file_offset:
            raise TruncatedFileError(
                f"zip central directory claims bytes {cd_offset}..{cd_offset + cd_size} "
                f"but the file's directory ends at {eocd_file_offset}",
                expected=cd_offset + cd_size,
                actual=eocd_file_offset,
                path=path,
            )
        directory = source[start + cd_offset : start + cd_offset + cd_size]
        entries, unsafe = _parse_central(directory, size, path, source, start)
        return cls(path, tuple(entries), tuple(unsafe), count, blob)

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


def inflate_deflated(raw: memoryview, limit: int) -> bytearray:
    """A deflated member's bytes, at most ``limit + 1`` of them (one more says it goes on),
    inflated from ``_INFLATE_CHUNK`` of input at a time into one buffer: zlib's one call
    with ``max_length`` holds its output twice as it finishes (2 GB for 1 GB). Raises
    ``zlib.error`` when the data does not inflate."""
    inflater = zlib.decompressobj(-15)
    out = bytearray()
    position, pending, more = 0, b"", False
    while len(out) <= limit and not inflater.eof:
        if not pending and not more:
            if position >= len(raw):
                break
            pending = bytes(raw[position : position + _INFLATE_CHUNK])
            position += len(pending)
        room = min(_INFLATE_CHUNK, limit + 1 - len(out))
        piece = inflater.decompress(pending, room)
        out += piece
        # input left over comes back in ``unconsumed_tail``; a full ``room`` may leave output
        # held inside, to be asked for again before more input goes in
        pending, more = inflater.unconsumed_tail, len(piece) == room
    return out


def inflate_member(raw: memoryview, method: int, limit: int) -> bytearray:
    """A deflated, bzip2 or LZMA member's bytes, at most ``limit + 1`` of them (one more
    says it goes on). Raises ``CorruptFileError`` when the data does not inflate."""
    if method == DEFLATED:
        try:
            return inflate_deflated(raw, limit)
        except zlib.error as exc:
            raise CorruptFileError(f"deflate data is corrupt ({exc})") from None
    out = bytearray()
    position = 0

    def read(count: int) -> bytes:
        nonlocal position
        piece = bytes(raw[position : position + count])
        position += len(piece)
        return piece

    for piece in member_pieces(read, method):
        out += piece
        if len(out) > limit:
            break
    return out[: limit + 1]


def _parse_central(
    directory: bytes,
    file_size: int,
    path: Path,
    source: Bytes | None = None,
    start: int = 0,
) -> tuple[list[ZipEntry], list[str]]:
    """Every record in the directory's bytes, whatever the end record's count says (Python's
    zipfile reads them all; a count that hides members is reported by the scanner). With
    ``source`` (the file's bytes, the zip at ``start`` in them) each entry's local header is
    read in the same pass, for where its data begins; without, ``data_offset`` is -1."""
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
        if offset + LOCAL_HEADER_SIZE > file_size or csize > file_size:
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


def prepended_bytes(path: Path) -> int:
    """How many bytes precede the zip in ``path`` (a pickle with a zip appended, a
    self-extracting archive): where the central directory really is minus where the end
    record says it is (the zip64 record's, when there is one), as Python's ``zipfile``
    computes it. torch does not read such files."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        tail_len = min(size, EOCD_SIZE + MAX_COMMENT + 20 + 56)
        handle.seek(size - tail_len)
        tail = handle.read(tail_len)
    eocd_at = tail.rfind(EOCD_SIGNATURE)
    if eocd_at < 0 or eocd_at + EOCD_SIZE > len(tail):
        return 0
    cd_size, cd_offset = struct.unpack("<II", tail[eocd_at + 12 : eocd_at + 20])
    record_at = size - tail_len + eocd_at
    zip64_at = eocd_at - 20 - 56
    if (
        zip64_at >= 0
        and tail[eocd_at - 20 : eocd_at - 16] == ZIP64_LOCATOR_SIGNATURE
        and tail[zip64_at : zip64_at + 4] == ZIP64_EOCD_SIGNATURE
    ):
        cd_size, cd_offset = struct.unpack("<QQ", tail[zip64_at + 40 : zip64_at + 56])
        record_at = size - tail_len + zip64_at
    prepended: int = record_at - cd_size - cd_offset
    return max(0, prepended)


def has_zip_tail(data: memoryview) -> bool:
    """Whether bytes that do not start as a zip end with one (a polyglot: loaders that
    read from either end see different files)."""
    tail = bytes(data[-(1 << 16) - 22 :])
    return EOCD_SIGNATURE in tail and bytes(data[:4]) != LOCAL_SIGNATURE
