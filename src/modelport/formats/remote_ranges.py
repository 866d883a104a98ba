"""Which byte ranges of a remote object its format's reader needs, fetched into a
``transfer.remote.SparseCopy``.

Formats whose headers are bounded and whose tensor bytes lie apart from them are fetched by
range: safetensors (8 bytes and the JSON header), GGUF (a prefix grown until the header
parses inside it), ``.npy`` (its header, unless its dtype holds objects: then a pickle
follows), torch zips and TorchScript archives (the end records, the central directory,
every local header and every member but the raw tensor storages ``<prefix>/data/<key>``,
which the reader and the scanner both leave unread). Any other format is fetched whole.

The first and last bytes are always fetched too: sniffers read the first 64 KiB, and the
scanner looks for a zip's end record in the last ones (``formats._zip.has_zip_tail``,
``prepended_bytes``).
"""

from __future__ import annotations

import struct
from typing import Final

from modelport import limits
from modelport.errors import ModelportError
from modelport.formats import npy
from modelport.formats._zip import (
    EOCD_SIGNATURE,
    EOCD_SIZE,
    LOCAL_HEADER_SIZE,
    LOCAL_SIGNATURE,
    MAX_COMMENT,
    STORED,
    ZipDirectory,
    ZipEntry,
    _parse_central,
)
from modelport.formats.gguf import reader as gguf
from modelport.formats.protocol import HEAD_BYTES, Format, FormatReader
from modelport.formats.registry import detect
from modelport.transfer.remote import SparseCopy

# The end of a zip as ``ZipDirectory`` and ``prepended_bytes`` look for it (the end record,
# its longest comment, the zip64 locator and record), and the scanner's 64 KiB zip tail.
TAIL_BYTES: Final = max(EOCD_SIZE + MAX_COMMENT + 20 + 56, (1 << 16) + EOCD_SIZE)
_LOCAL_SLACK: Final = 64  # bytes fetched past a local header's name, for its extra field
_ZIP64_LOCATOR: Final = b"PK\x06\x07"
_ZIP64_RECORD: Final = b"PK\x06\x06"
BY_RANGE: Final = frozenset(
    (Format.SAFETENSORS, Format.GGUF, Format.NPY, Format.TORCH_ZIP, Format.TORCHSCRIPT)
)


def fetch_headers(copy: SparseCopy) -> FormatReader | None:
    """Fetch what the reader of ``copy``'s format reads, and return that reader; None when
    the format is not one read by range (nothing is then promised about the holes)."""
    size = copy.remote.size
    copy.fetch([(0, HEAD_BYTES), (size - TAIL_BYTES, size)])
    head = copy.read(0, min(size, HEAD_BYTES))
    if head.startswith(LOCAL_SIGNATURE) and not _fetch_torch_archive(copy):
        return None
    if head.startswith(npy.MAGIC):
        copy.fetch([(0, npy.MAX_PREFIX)])
    _fetch_safetensors_header(copy, head)
    try:
        reader, _, _ = detect(copy.path)
    except ModelportError:
        return None  # not a model, or not one any reader takes: the whole object decides
    if reader.format not in BY_RANGE:
        return None
    if reader.format is Format.GGUF and not _fetch_gguf_header(copy):
        return None
    if reader.format is Format.NPY and _holds_objects(copy):
        return None
    return reader


def _fetch_safetensors_header(copy: SparseCopy, head: bytes) -> None:
    """The JSON header a safetensors file announces in its first 8 bytes, if it does."""
    if len(head) < 9 or head[8:9] != b"{":
        return
    (length,) = struct.unpack("<Q", head[:8])
    if 2 <= length <= limits.MAX_SAFETENSORS_HEADER:
        copy.fetch([(0, 8 + length)])


def _fetch_gguf_header(copy: SparseCopy) -> bool:
    """Grow the fetched prefix until the header parses inside it. The parser walks the
    header front to back, so a header whose data section begins inside the prefix read
    nothing but fetched bytes."""
    size = copy.remote.size
    while True:
        prefix = copy.prefix()
        try:
            header = gguf.read_header(copy.path)
        except ModelportError:
            if prefix >= size:
                return True  # all of it is here: the reader will say what is wrong
        else:
            if header.data_offset <= prefix:
                return True
        if prefix >= size:
            return True
        copy.fetch([(0, min(size, max(2 * prefix, HEAD_BYTES)))])


def _holds_objects(copy: SparseCopy) -> bool:
    """An object array: its data is a pickle, which the scanner must read whole."""
    prefix = copy.read(0, min(copy.remote.size, npy.MAX_PREFIX))
    try:
        found = npy.object_data_offset(prefix, path=copy.path, available=copy.remote.size)
    except ModelportError:
        return True
    return found is not None


def _fetch_torch_archive(copy: SparseCopy) -> bool:
    """A torch zip or TorchScript archive's directory, local headers and every member but its
    raw storages; False for any other zip (``.npz``, ``.keras``, ``.pt2``: the scanner reads
    and checksums all their members) or one whose structure cannot be fetched by range."""
    entries = _central_entries(copy)
    if entries is None:
        return False
    names = [entry.name for entry in entries]
    if not any(name.endswith("data.pkl") for name in names) or any(
        name.endswith("archive_format") for name in names
    ):
        return False
    _fetch_local_headers(copy, entries)
    try:
        directory = ZipDirectory.read(copy.path)
    except ModelportError:
        return False
    copy.fetch(
        [
            (entry.data_offset, entry.data_offset + entry.compressed_size)
            for entry in directory.entries
            if not _is_raw_storage(entry)
        ]
    )
    return True


def _central_entries(copy: SparseCopy) -> list[ZipEntry] | None:
    """The central directory's records, read from the end records in the fetched tail."""
    size = copy.remote.size
    tail_start = max(0, size - TAIL_BYTES)
    tail = copy.read(tail_start, size)
    at = tail.rfind(EOCD_SIGNATURE)
    if at < 0 or at + EOCD_SIZE > len(tail):
        return None
    cd_size, cd_offset = struct.unpack("<II", tail[at + 12 : at + 20])
    locator = at - 20
    if locator >= 0 and tail[locator : locator + 4] == _ZIP64_LOCATOR:
        (record_at,) = struct.unpack("<Q", tail[locator + 8 : locator + 16])
        record = copy.read(record_at, record_at + 56)
        if record[:4] != _ZIP64_RECORD:
            return None
        cd_size, cd_offset = struct.unpack("<QQ", record[40:56])
    if cd_offset + cd_size > size:
        return None
    try:
        entries, _ = _parse_central(copy.read(cd_offset, cd_offset + cd_size), size, copy.path)
    except ModelportError:
        return None
    return entries


def _fetch_local_headers(copy: SparseCopy, entries: list[ZipEntry]) -> None:
    """Every member's local header and name, in one batch, then whatever a longer local
    name than the directory's needs."""
    copy.fetch(
        [
            (e.header_offset, e.header_offset + LOCAL_HEADER_SIZE + len(e.name) * 4 + _LOCAL_SLACK)
            for e in entries
        ]
    )
    longer = []
    for entry in entries:
        start = entry.header_offset
        header = copy.read(start, start + LOCAL_HEADER_SIZE)
        (name_len,) = struct.unpack("<H", header[26:28])
        longer.append((start, start + LOCAL_HEADER_SIZE + name_len))
    copy.fetch(longer)


def _is_raw_storage(entry: ZipEntry) -> bool:
    """The scanner's rule for a torch archive's tensor bytes (``scanning.archives``): a
    stored member in a ``data`` folder, reached through data.pkl's persistent ids and never
    parsed. It must stay the same rule: the scanner reads every other member."""
    parts = entry.name.split("/")
    in_data = len(parts) >= 2 and parts[-2] == "data" and not parts[-1].lower().endswith(".pkl")
    return entry.method == STORED and in_data
