"""Objects behind URLs (``s3://``, ``gs://``, ``hf://``, ``https://``, any fsspec protocol),
read by byte range into a local stand-in that the readers open like any file.

A ``SparseCopy`` is a temporary file of the object's size whose unfetched parts are holes:
they cost no disk and read as zeros, so whoever fills it decides which ranges matter and
whoever reads it must never rely on a hole (``scanning.remote_inputs`` checks that every
hole is tensor data, which header reads never touch). Every byte received is counted, and
a report says how many. fsspec (and the protocol's own package, s3fs, gcsfs, aiohttp) is
the ``remote`` extra, imported only when a URL is read.

Credentials never reach a report: ``redact`` drops a URL's user and password and its query
(a presigned URL's signature lives there); credentials for a store come from the store's
usual places (environment, config files), or fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>``
variables (``FSSPEC_S3_ENDPOINT_URL`` for an S3-compatible server).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

from modelport.errors import MissingDependencyError, ModelFileNotFoundError, ModelportError

if TYPE_CHECKING:
    from datetime import datetime

# Every worker of a fleet run imports this module for ``is_url``; what only a URL's reading
# needs (a temporary folder, dates in a store's formats: ``tempfile``, ``shutil``,
# ``datetime``, ``email.utils``: a sixth of a worker's start-up) is imported by the first
# object read.

# A URL as fsspec takes it: a scheme of two letters or more (one letter is a Windows drive).
_URL: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# Protocols whose package fsspec does not bring, by the name pip installs.
_PACKAGES: Final = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "hf": "huggingface_hub",
    "az": "adlfs",
    "abfs": "adlfs",
}
# What names an object's bytes in each store's ``info``, most specific first: S3's version
# id and ETag, GCS's generation, an HTTP server's ETag or digest, a Hugging Face blob id.
_VERSION_KEYS: Final = (
    "VersionId",
    "ETag",
    "generation",
    "etag",
    "md5Hash",
    "Digest",
    "Content-MD5",
    "blob_id",
)
# When it was last written: S3's LastModified, GCS's updated, fsspec's mtime, HTTP's header.
_MODIFIED_KEYS: Final = ("LastModified", "updated", "mtime", "last_modified", "Last-Modified")
# Options for ``cat_ranges`` by protocol. HfFileSystem reads a range through a file with
# fsspec's read-ahead cache, which asks the server for 5 MiB past the range (uncounted) and,
# when a server ignores ``Range`` (a local mirror), returns the object's first bytes as the
# range's; without the cache each range is one request whose whole answer comes back.
_RANGE_OPTIONS: Final[dict[str, dict[str, str]]] = {"hf": {"cache_type": "none"}}
STREAM_CHUNK: Final = 8 << 20  # bytes per range when a whole object is copied
STREAM_BATCH: Final = 4  # ranges asked for at once (fetched concurrently where fsspec can)


def is_url(path: object) -> bool:
    """Whether ``path`` names an object behind a URL rather than a local path (``file://``
    is local and stays a path)."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.lower().startswith("file:")


def redact(url: str) -> str:
    """``url`` as reports show it: no user, password or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    query = "…" if parts.query else ""
    return urlunsplit((parts.scheme, host if parts.netloc else "", parts.path, query, ""))


@dataclass
class RemoteObject:
    """One object: its file system, its path there, its size, and the bytes received so far.
    ``version`` is what the store says names these bytes (``ETag=...``, a generation, a blob
    id; empty when it says nothing) and ``modified_ns`` its modification time (0 when
    unknown): together with the size, what tells a rerun that the object is unchanged.
    ``digest`` is a digest of the bytes themselves where the store keeps one (``_digest``):
    two objects with one digest hold the same bytes."""

    url: str
    fs: Any
    key: str
    size: int
    received: int = 0
    version: str = ""
    modified_ns: int = 0
    digest: str = ""

    @classmethod
    def open(cls, url: str) -> RemoteObject:
        """Look the object up (one metadata request); a missing object is
        ``ModelFileNotFoundError`` naming the redacted URL."""
        fsspec = _fsspec(url)
        try:
            fs, key = fsspec.core.url_to_fs(url)
        except ImportError as exc:
            raise _missing(url, exc) from exc
        try:
            info = fs.info(key)
        except FileNotFoundError:
            raise ModelFileNotFoundError(redact(url)) from None
        if info.get("type") == "directory":
            raise ModelFileNotFoundError(
                redact(url), "a prefix or folder, not an object: name one object"
            )
        size = info.get("size")
        if not isinstance(size, int):
            raise ModelFileNotFoundError(redact(url), "the server does not say the object's size")
        return cls(
            url,
            fs,
            key,
            size,
            version=_version(info),
            modified_ns=_modified_ns(info),
            digest=_digest(urlsplit(url).scheme.lower(), info),
        )

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(start, end)`` range, in one batch where the file system
        batches (fsspec's ``cat_ranges``); each counted as it arrives. A server that ignores
        ``Range`` sends the whole object instead, which is returned (and counted) whole."""
        if not ranges:
            return []
        starts = [start for start, _ in ranges]
        ends = [end for _, end in ranges]
        options = _RANGE_OPTIONS.get(urlsplit(self.url).scheme.lower(), {})
        found = self.fs.cat_ranges([self.key] * len(ranges), starts, ends, **options)
        blobs: list[bytes] = []
        for (start, end), blob in zip(ranges, found, strict=True):
            if isinstance(blob, BaseException):
                raise blob
            if len(blob) != end - start and len(blob) != self.size:
                raise OSError(
                    f"{redact(self.url)}: asked for bytes {start}..{end}, received {len(blob)}"
                )
            self.received += len(blob)
            blobs.append(bytes(blob))
        return blobs


@dataclass
class SparseCopy:
    """A local file as long as the object, filled where fetched; ``fetched`` holds the
    filled ranges, sorted and merged."""

    remote: RemoteObject
    path: Path
    fetched: list[tuple[int, int]] = field(default_factory=list)
    whole: bool = False

    @property
    def url(self) -> str:
        return redact(self.remote.url)

    @property
    def bytes_fetched(self) -> int:
        return self.remote.received

    def fetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fill ``ranges`` (clipped to the object) that are not filled yet."""
        wanted = [r for r in (self._clip(r) for r in ranges) if r is not None]
        missing = _merged([gap for r in wanted for gap in self._gaps(r)])
        if not missing:
            return
        with open(self.path, "r+b") as handle:
            for (start, end), blob in zip(missing, self.remote.read_ranges(missing), strict=True):
                if len(blob) != end - start:  # the whole object, from a server without ranges
                    os.pwrite(handle.fileno(), blob, 0)
                    self.fetched = [(0, self.remote.size)]
                    return
                os.pwrite(handle.fileno(), blob, start)
        self.fetched = _merged([*self.fetched, *missing])

    def fetch_rest(self) -> None:
        """Fill every hole, ``STREAM_CHUNK`` bytes a range and ``STREAM_BATCH`` ranges a
        request, so memory stays bounded however large the object."""
        pieces = [
            (start, min(end, start + STREAM_CHUNK))
            for hole_start, end in self.holes()
            for start in range(hole_start, end, STREAM_CHUNK)
        ]
        for first in range(0, len(pieces), STREAM_BATCH):
            self.fetch(pieces[first : first + STREAM_BATCH])
        self.whole = True

    def read(self, start: int, end: int) -> bytes:
        """Fetched bytes (fetching them first if needed)."""
        self.fetch([(start, end)])
        with open(self.path, "rb") as handle:
            return os.pread(handle.fileno(), end - start, start)

    def prefix(self) -> int:
        """How many bytes from the start are fetched without a gap."""
        return self.fetched[0][1] if self.fetched and self.fetched[0][0] == 0 else 0

    def holes(self) -> list[tuple[int, int]]:
        """The ranges never fetched, which read as zeros."""
        return self._gaps((0, self.remote.size))

    def _clip(self, span: tuple[int, int]) -> tuple[int, int] | None:
        start, end = max(0, span[0]), min(self.remote.size, span[1])
        return (start, end) if start < end else None

    def _gaps(self, span: tuple[int, int]) -> list[tuple[int, int]]:
        gaps, position = [], span[0]
        for start, end in self.fetched:
            if end <= position:
                continue
            if start >= span[1]:
                break
            if start > position:
                gaps.append((position, start))
            position = max(position, end)
        if position < span[1]:
            gaps.append((position, span[1]))
        return gaps


@contextmanager
def sparse_copy(url: str) -> Iterator[SparseCopy]:
    """An empty ``SparseCopy`` of the object at ``url``, in a private temporary folder
    removed on every way out; the file keeps the object's name, so a warning about its
    extension reads as it would for the object."""
    remote = RemoteObject.open(url)
    folder = Path(importlib.import_module("tempfile").mkdtemp(prefix="modelport-remote-"))
    path = folder / _local_name(remote.key)
    try:
        with open(path, "wb") as handle:
            handle.truncate(remote.size)
        yield SparseCopy(remote, path)
    except (ModelportError, OSError) as exc:
        _name_the_object(exc, path, redact(url))
        raise
    finally:
        importlib.import_module("shutil").rmtree(folder, ignore_errors=True)


def _name_the_object(exc: BaseException, path: Path, url: str) -> None:
    """An error about the temporary copy names the object instead (the copy is gone)."""
    exc.args = tuple(a.replace(str(path), url) if isinstance(a, str) else a for a in exc.args)
    if isinstance(exc, OSError) and exc.filename == str(path):
        exc.filename = url


@contextmanager
def whole_copy(url: str) -> Iterator[SparseCopy]:
    """The object at ``url`` copied whole (``hash`` reads every tensor byte)."""
    with sparse_copy(url) as copy:
        copy.fetch_rest()
        yield copy


def _version(info: dict[str, Any]) -> str:
    for key in _VERSION_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return f"{key}={value}"
    return ""


def _digest(scheme: str, info: dict[str, Any]) -> str:
    """S3's ETag (the MD5 of the bytes, or for a multipart upload of its parts' MD5s, so
    equal bytes uploaded alike), GCS's md5Hash, a Hugging Face file's LFS sha256 or git blob
    id, an HTTP Digest or Content-MD5; never an HTTP ETag or a version id, which name a
    version (often its mtime and size), not the bytes."""
    lfs = info.get("lfs")
    found: dict[str, Any] = {
        "s3": info.get("ETag") if scheme in ("s3", "s3a") else None,
        "md5": info.get("md5Hash") if scheme in ("gs", "gcs") else None,
        "sha256": lfs.get("sha256") if scheme == "hf" and isinstance(lfs, dict) else None,
        "git": info.get("blob_id") if scheme == "hf" else None,
        "http": info.get("Digest") or info.get("Content-MD5")
        if scheme.startswith("http")
        else None,
    }
    for kind, value in found.items():
        text = value.strip('"') if isinstance(value, str) else ""  # S3 quotes its ETags
        if text:
            return f"{kind}={text}"
    return ""


def _modified_ns(info: dict[str, Any]) -> int:
    datetime = importlib.import_module("datetime").datetime
    for key in _MODIFIED_KEYS:
        value = info.get(key)
        try:
            if isinstance(value, datetime):
                return int(value.timestamp() * 1e9)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return int(value * 1e9)
            if isinstance(value, str) and value:
                return int(_parsed_time(value).timestamp() * 1e9)
        except (ValueError, TypeError, OverflowError):
            continue  # a form this does not know: another key may say it
    return 0


def _parsed_time(text: str) -> datetime:
    """ISO 8601 (GCS's ``updated``) or an HTTP date (``Last-Modified``)."""
    try:
        found: datetime = importlib.import_module("datetime").datetime.fromisoformat(
            text.replace("Z", "+00:00")
        )
    except ValueError:
        found = importlib.import_module("email.utils").parsedate_to_datetime(text)
    return found


def _local_name(key: str) -> str:
    name = key.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return name or "object"


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _fsspec(url: str) -> Any:
    try:
        import fsspec  # type: ignore[import-untyped]
    except ImportError as exc:
        raise _missing(url, exc) from exc
    return fsspec


def _missing(url: str, exc: ImportError) -> MissingDependencyError:
    protocol = url.split("://", 1)[0].lower()
    package = _PACKAGES.get(protocol, exc.name or "fsspec")
    return MissingDependencyError(package, "remote", f"reading {protocol}:// URLs")
