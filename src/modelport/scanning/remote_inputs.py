"""Objects behind URLs as ``inspect`` and ``scan`` read them: a local copy holding every byte
their reader and the scanner read, and no more when that can be shown.

``formats.remote_ranges`` fetches a format's header ranges into a ``SparseCopy``. Before
anyone reads the copy, it is checked that nothing will read a hole (a hole reads as zeros,
which must never pass for the object's bytes):

- every hole lies inside the tensor storages the format's reader finds (or the padding
  between two of them), bytes that header reads and the scanner never touch;
- the scanner's readings of the first bytes end inside the fetched prefix: a pickle
  reading that runs on past it, a tar, a compressed stream, or a zip's end record at the
  end of a file that does not start as a zip (read from wherever it points) each need more;

otherwise every remaining byte is fetched, so the copy is the object. The bytes received
are counted in every case.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Final

from modelport.errors import MissingDependencyError, ModelportError
from modelport.formats import _compressed, remote_ranges
from modelport.formats._tar import is_tar
from modelport.formats._zip import EOCD_SIGNATURE, LOCAL_SIGNATURE
from modelport.formats.protocol import FormatReader, Probe
from modelport.pickles.symbols import Severity
from modelport.scanning import content_kinds
from modelport.scanning.findings import FileReport, Finding
from modelport.scanning.first_bytes import PickleReading
from modelport.transfer import remote
from modelport.transfer.remote import SparseCopy
from modelport.tree.names import tensors_of

# Bytes between two tensors a hole may span: alignment padding (GGUF aligns each tensor,
# 32 bytes by default), which no reader reads.
MAX_PADDING: Final = 1 << 16
_ZIP_TAIL: Final = (1 << 16) + 22  # what ``formats._zip.has_zip_tail`` looks at


@contextmanager
def local_copy(url: str) -> Iterator[SparseCopy]:
    """A local copy of the object at ``url`` that reads as the object wherever ``inspect``
    and ``scan`` read it; removed on every way out."""
    with remote.sparse_copy(url) as copy:
        reader = remote_ranges.fetch_headers(copy)
        if reader is None or not (_scanner_stays_inside(copy) and _holes_are_tensors(copy, reader)):
            copy.fetch_rest()
        yield copy


def scan_url(url: str, scan_file: Callable[[Path], FileReport]) -> FileReport:
    """``scan_file``'s report on the object at ``url``, named by its redacted URL, with the
    bytes fetched; an object that cannot be reached is an ``error`` verdict, as a local
    file that cannot be read is."""
    try:
        with local_copy(url) as copy:
            report = scan_file(copy.path)
            return replace(report, path=copy.url, bytes_fetched=copy.bytes_fetched)
    except MissingDependencyError:
        raise
    except (ModelportError, OSError) as exc:
        finding = Finding(Severity.HIGH, "not-analysed", "", f"could not read the object: {exc}")
        return FileReport(remote.redact(url), "unknown", "error", (finding,))


def _scanner_stays_inside(copy: SparseCopy) -> bool:
    """Whether the scanner's own readings of the first and last bytes end in fetched bytes
    (``scanner.scan_readings``), and so read as they would on the object."""
    size = copy.remote.size
    prefix = copy.read(0, copy.prefix())
    if is_tar(prefix[:512]) or _compressed.compression_of(prefix[:16]) is not None:
        return False
    tail = copy.read(max(0, size - _ZIP_TAIL), size)
    if not prefix.startswith(LOCAL_SIGNATURE) and EOCD_SIGNATURE in tail:
        return False
    return content_kinds.pickle_reading(memoryview(prefix)) is not PickleReading.CUT


def _holes_are_tensors(copy: SparseCopy, reader: FormatReader) -> bool:
    """Whether every hole lies within the tensor bytes ``reader`` finds in the copy."""
    try:
        contents = reader.contents(Probe.of(copy.path))
    except ModelportError:
        return False  # perhaps a hole's zeros: the whole object will say
    try:
        spans = sorted(
            (ref.storage.offset, ref.storage.offset + ref.storage.nbytes)
            for ref in tensors_of(contents.tree).values()
            if ref.storage is not None
            and ref.storage.reader is None
            and ref.storage.path == copy.path
        )
    finally:
        if contents.close is not None:
            contents.close()
    tensor_bytes = _joined(spans)
    starts = [start for start, _ in tensor_bytes]
    for start, end in copy.holes():
        at = bisect.bisect_right(starts, start) - 1
        if at < 0 or end > tensor_bytes[at][1]:
            return False
    return True


def _joined(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    joined: list[tuple[int, int]] = []
    for start, end in spans:
        if joined and start - joined[-1][1] <= MAX_PADDING:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    return joined
