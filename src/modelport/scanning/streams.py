"""Pickle streams, read as their loaders read them: ``pickle.load`` stops at the first STOP
but a loader may read on (legacy torch reads five pickles; a stream of records is read to
its end), so every pickle of a stream is scanned, and bytes after the last one are
reported unless another reading of the file explains them.

An ``.npy`` object array's pickle is read by ``np.load``: one ``pickle.load`` on the open
file (numpy/lib/format.py ``read_array``), which stops at STOP. Reading on is another
``np.load`` of the same handle, which takes what follows as another ``.npy`` (an array
saved after it), else as a pickle; bytes that are neither are read by no loader."""

from __future__ import annotations

import time

from modelport import limits
from modelport.errors import ModelportError, UnparsedPickleError
from modelport.formats._npy_header import MAGIC as NPY_MAGIC
from modelport.formats._npy_header import MAX_PREFIX as NPY_PREFIX
from modelport.formats._npy_header import parse_header
from modelport.formats._torch_magic import is_magic_number
from modelport.formats._zip import EOCD_SIGNATURE, LOCAL_SIGNATURE
from modelport.pickles.interface import Limits
from modelport.pickles.judging import SIDE_FILE_RULE, scan_pickle
from modelport.pickles.symbols import BYTES_CONSTANT, Severity
from modelport.scanning import content_kinds, side_files
from modelport.scanning.findings import Finding
from modelport.scanning.first_bytes import PickleReading
from modelport.scanning.scan_state import ScanState

_LEGACY_PICKLES = 5  # magic number, protocol, sys_info, objects, storage keys
MAX_OPCODES_PER_PICKLE = 20_000_000


def pickle_limits(scan: ScanState) -> Limits:
    """One pickle's bounds: its opcodes, and the time the file's scan has left."""
    return Limits(
        max_opcodes=MAX_OPCODES_PER_PICKLE,
        max_seconds=max(1.0, scan.deadline - time.monotonic()),
    )


def scan_pickle_stream(
    scan: ScanState,
    data: memoryview,
    member: str,
    depth: int,
    *,
    torch_archive: bool = False,
    torchscript: bool = False,
    explained: bool = False,
) -> None:
    """Every pickle of the stream, not only the first a loader reads (legacy torch reads
    five; a loader may read on); bytes after the last STOP are reported unless another
    reading of the file explains them."""
    start = _scan_pickles(scan, data, member, depth, torch_archive, torchscript)
    if start is not None and not explained:
        scan.add(
            Severity.MEDIUM,
            "trailing-data",
            member,
            f"{len(data) - start:,} bytes after the pickle's STOP at byte {start}: "
            "pickle.load ignores them, a loader that reads on does not",
        )


def scan_object_array_pickle(scan: ScanState, data: memoryview, member: str, depth: int) -> None:
    """An ``.npy`` object array's pickle and what ``np.load`` of the same handle reads after
    it: a further ``.npy`` is scanned as one, further pickles as pickles; other bytes make
    every loader fail before they are read, so they are only noted."""
    start = _scan_pickles(scan, data, member, depth, False, False)
    if start is not None:
        scan_after_array(
            scan,
            data[start:],
            member,
            f"the object array's pickle ({start:,} bytes into the array's data)",
            depth,
        )


def scan_after_array(
    scan: ScanState, rest: memoryview, member: str, after: str, depth: int
) -> None:
    """Bytes after an ``.npy`` array (``after`` says where they start): what a further
    ``np.load`` of the same handle reads, an ``.npy`` saved after it or a pickle, is scanned
    as such; other bytes make every loader fail before they are read, so they are noted.
    Plain arrays saved one after another are stepped over here, not nested."""
    for _ in range(limits.MAX_PICKLES_PER_STREAM):
        if bytes(rest[: len(NPY_MAGIC)]) != NPY_MAGIC:
            break
        end = _plain_array_end(scan, rest, member)
        if end is None or end > len(rest):  # objects, or damage: the array's own scan says
            scan.scan_plain_member(rest, f"{member}@after", depth)
            return
        rest = rest[end:]
        if not rest:
            return
    else:
        scan.error(f"more than {limits.MAX_PICKLES_PER_STREAM} arrays in one file", member)
        return
    if content_kinds.pickle_reading(rest) is PickleReading.WHOLE:
        scan.add(
            Severity.INFO,
            "pickle-after-array",
            member,
            f"a pickle after {after}: np.load(allow_pickle=True) of the same handle unpickles "
            "it, judged below",
        )
        scan.scan_pickle_stream(rest, f"{member}@after", depth + 1)
        return
    scan.add(
        Severity.INFO,
        "unread-bytes",
        member,
        f"{len(rest):,} bytes after {after}: np.load stops at the array's end, and no loader "
        "reads them as data",
    )


def _plain_array_end(scan: ScanState, data: memoryview, member: str) -> int | None:
    """Where a plain array's data ends, or None for an object array or a header that does
    not parse."""
    try:
        header = parse_header(
            bytes(data[:NPY_PREFIX]), path=scan.path, where=member, available=len(data)
        )
    except ModelportError:
        return None
    return None if header.is_object else header.data_offset + header.nbytes


def _scan_pickles(
    scan: ScanState,
    data: memoryview,
    member: str,
    depth: int,
    torch_archive: bool,
    torchscript: bool,
) -> int | None:
    """Scan the stream's pickles; the offset of bytes after them that no pickle opens, or
    None when nothing follows (or the scan stopped with an error)."""
    start, legacy = 0, False
    for index in range(limits.MAX_PICKLES_PER_STREAM):
        end = _scan_one_pickle(
            scan, data, start, member, depth, torch_archive or (legacy and index == 3), torchscript
        )
        if end is None:
            return None
        if index == 0 and is_magic_number(data[:end]):
            legacy = True
            scan.format = "torch-legacy" if depth == 0 else scan.format
        start = end
        if legacy and index + 1 == _LEGACY_PICKLES:
            return None  # then raw storage bytes, which torch copies and never parses
        if start >= len(data):
            if legacy:
                scan.error(
                    f"the legacy torch stream ends after {index + 1} of its "
                    f"{_LEGACY_PICKLES} pickles (truncated?)",
                    member,
                )
            return None
        if not legacy and content_kinds.pickle_reading(data[start:]) is not PickleReading.WHOLE:
            return start  # a legacy file's next pickle is read whatever it is: scanned next
    scan.error(f"more than {limits.MAX_PICKLES_PER_STREAM} pickles in one stream", member)
    return None


def _scan_one_pickle(
    scan: ScanState,
    data: memoryview,
    start: int,
    member: str,
    depth: int,
    expect_pids: bool,
    torchscript: bool,
) -> int | None:
    try:
        result = scan_pickle(
            data,
            start=start,
            torchscript=torchscript,
            expect_persistent_ids=expect_pids,
            limits=pickle_limits(scan),
        )
    except ModelportError as exc:
        if isinstance(exc, UnparsedPickleError):  # what it did before it failed
            scan.findings.extend(Finding.from_pickle(f, member) for f in exc.findings)
        scan.error(f"pickle at byte {start} could not be analysed: {exc}", member)
        return None
    scan.findings.extend(Finding.from_pickle(f, member) for f in result.findings)
    if depth == 0:  # the file itself: what its loader opens beside it
        named = [f.global_name for f in result.findings if f.rule == SIDE_FILE_RULE]
        side_files.scan_side_files(scan, named)
    for nested in result.nested:
        payload = nested.payload
        blob = (
            memoryview(payload)
            if isinstance(payload, bytes)
            else data[payload.offset : payload.offset + payload.length]
        )
        if nested.loader == BYTES_CONSTANT:
            scan.add(
                Severity.INFO,
                "nested-payload",
                member,
                f"bytes handed on at byte {nested.offset} open like a pickle, a zip or an .npy, "
                "which the class or function they go to may load: scanned as well",
            )
        else:
            scan.add(
                Severity.INFO,
                "nested-torch-storage",
                member,
                f"a torch storage pickled inside the pickle at byte {nested.offset}; "
                "scanned as well",
            )
        label = f"{member}@{nested.offset}"
        if bytes(blob[:4]) in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
            scan.scan_zip(label, depth + 1, blob=bytes(blob))
        elif not scan.scan_member(blob, label, depth + 1, torch_archive=False, torchscript=False):
            scan.add(Severity.INFO, "opaque-member", label, "holds no pickle")
    return result.end
