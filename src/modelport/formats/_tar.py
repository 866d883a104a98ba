"""Tars as Python's ``tarfile`` reads them (torch 0.1-0.3 saved checkpoints as tars;
``torch.load`` still tries a tar before a pickle): whether bytes open as one, and the
members it lists. ``tarfile`` itself decides both, so every header quirk it accepts (a
checksum in base-256 or spelled ``+0123``, pax records framed by their length, the last
``path`` record winning, GNU long names) is read as the loader reads it. Headers only:
nothing here reads a member's content or extracts anything.

Layout (POSIX.1-1988 ustar, pax, GNU, V7): 512-byte header blocks, each member's data
padded to a whole block; a pax ``x`` header renames or resizes the next member; the list
ends at a zero block or at the first header that does not parse.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from modelport import limits
from modelport.errors import CorruptFileError

TAR_BLOCK = tarfile.BLOCKSIZE
# What the loader's tarfile decodes names with (torch passes no encoding): the default.
_ENCODING = tarfile.ENCODING
_ERRORS = "surrogateescape"


def is_tar(head: bytes | memoryview) -> bool:
    """Whether ``tarfile.open(mode="r:")`` (torch's legacy loader) takes the bytes for a tar:
    its first header parses, checksum included, by tarfile's own reading."""
    try:
        tarfile.TarInfo.frombuf(bytes(head[:TAR_BLOCK]), _ENCODING, _ERRORS)
    except tarfile.HeaderError:
        return False
    return True


@dataclass(frozen=True)
class TarMember:
    """One member as ``tarfile`` lists it. ``plain`` when the bytes at ``offset`` are what
    ``extractfile`` returns: a regular file, not sparse; ``kind`` says what it is else."""

    name: str
    offset: int
    size: int
    plain: bool
    kind: str
    linkname: str = ""


@dataclass(frozen=True)
class TarListing:
    """A tar's members in order, and the names it holds more than once (``getmember``
    and ``extract`` take the last copy of a name)."""

    members: tuple[TarMember, ...]

    @property
    def duplicates(self) -> list[str]:
        """Paths more than one member names (``pickle``, ``./pickle``): extracted, the
        last copy wins; ``getmember`` takes the last of an exact name."""
        counts = Counter(posixpath.normpath(m.name) for m in self.members)
        return [name for name, n in counts.items() if n > 1]

    def get(self, name: str) -> TarMember | None:
        """The member ``tarfile.getmember(name)`` returns: the last of that name."""
        wanted = name.rstrip("/")
        return next((m for m in reversed(self.members) if m.name == wanted), None)


def list_tar(
    data: bytes | memoryview,
    *,
    limit: int = limits.MAX_TAR_HEADERS,
    whole: bool = True,
    path: Path | None = None,
) -> TarListing:
    """Every member ``tarfile`` lists in ``data``, up to ``limit`` of them. ``whole``: the
    bytes are the whole file, so any error tarfile raises while listing is the loader's
    too; otherwise they are a file's first bytes, and the list ends where they do."""
    members: list[TarMember] = []
    try:
        with tarfile.open(fileobj=_HeldBytes(data), mode="r:") as archive:
            while len(members) <= limit and (info := archive.next()) is not None:
                members.append(_member(info))
    except (tarfile.TarError, ValueError) as exc:
        if whole or not members:
            raise CorruptFileError(f"tarfile does not read the tar: {exc}", path=path) from None
    if len(members) > limit:
        raise CorruptFileError(f"the tar holds more than {limit} members", path=path)
    return TarListing(tuple(members))


def _member(info: tarfile.TarInfo) -> TarMember:
    if info.isreg():
        kind = "file" if info.sparse is None else "sparse file"
    else:
        kind = "link" if info.islnk() or info.issym() else "folder" if info.isdir() else "device"
    return TarMember(info.name, info.offset_data, info.size, kind == "file", kind, info.linkname)


class _HeldBytes(io.RawIOBase):
    """Bytes already held (a map of the file), read by tarfile without a copy of them all."""

    def __init__(self, data: bytes | memoryview) -> None:
        super().__init__()
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """At most what is held: a header's claimed size allocates nothing. tarfile reads a
        pax or GNU long-name header's data whole; past a limit the listing stops."""
        end = len(self._data) if size is None or size < 0 else self._pos + size
        if end - self._pos > limits.MAX_TAR_HEADER_DATA:
            raise tarfile.ReadError(
                f"a tar header's data of {end - self._pos:,} bytes is past modelport's limit "
                f"of {limits.MAX_TAR_HEADER_DATA:,}"
            )
        chunk = bytes(self._data[self._pos : end])
        self._pos += len(chunk)
        return chunk

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)
