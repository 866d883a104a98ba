"""Zips, scanned member by member as their loaders read them (tars: ``tars``).

What each loader reads of an archive, from its own source:
- ``torch.load`` (torch/serialization.py ``_load``): ``<prefix>/data.pkl`` unpickled,
  ``data/<key>`` copied as raw storage bytes.
- ``torch.jit.load`` (torch/csrc/jit/serialization/import.cpp): ``constants.pkl`` and
  ``data.pkl`` unpickled, ``code/**.py`` compiled, ``data/`` raw.
- ``torch.export.load`` (torch/export/pt2_archive, torch/_export/serde): the JSON program;
  ``*.pt`` members through ``torch.load``, falling back to ``weights_only=False`` and to
  plain pickle; raw weight bytes.
- ``numpy.load`` of an ``.npz`` (numpy/lib/_npyio_impl.py): every ``*.npy`` member, object
  arrays unpickled under ``allow_pickle``.
- Keras ``.keras`` (keras/src/saving/saving_lib.py): ``config.json`` deserialized,
  ``model.weights.h5`` read.
- Python's ``zipfile`` (all of these but torch): every central-directory record whatever
  the end record's count says; bytes in front of the zip are allowed; bzip2 and LZMA
  members as well as deflated ones (torch's miniz refuses them: "unsupported method").

torch's reader walks only the end record's count, takes the first record's top-level folder
as the prefix of every name it looks up (caffe2/serialize/inline_container.cc), and finds
members ignoring case (miniz without MZ_ZIP_FLAG_CASE_SENSITIVE); Python's walks the whole
directory and tells case apart. The scanner reads the union: every record, every member
judged by its content whatever its name, case or declared size; nested zips recursively,
bounded in depth and inflated bytes; the readers of the other zip formats (Keras, npz) on
any zip that holds members outside torch's prefix. Raw tensor bytes are the one thing
skipped: stored ``<prefix>/data/<key>`` of a torch archive, and the raw payloads a
``.pt2``'s configs declare, unless they open as an ``.npy`` or a zip (read by other loaders).
"""

from __future__ import annotations

import json
import mmap
import os
import time
import zlib

from modelport import limits
from modelport.errors import ModelportError
from modelport.formats._compressed import stream_cap
from modelport.formats._npy_header import MAGIC as NPY_MAGIC
from modelport.formats._zip import (
    DEFLATED,
    EOCD_SIGNATURE,
    INFLATED_METHODS,
    LOCAL_SIGNATURE,
    STORED,
    TORCH_METHODS,
    ZipDirectory,
    ZipEntry,
    ZipView,
    inflate_member,
)
from modelport.formats.protocol import Format
from modelport.pickles.symbols import Severity
from modelport.scanning import content_checks, script_code, zip_views
from modelport.scanning.first_bytes import may_hold_code
from modelport.scanning.scan_state import TORCH_SAVED, ScanState

_SNIFF_BYTES = 1 << 16
_MAX_CONFIG_BYTES = 64 << 20
_BOMB_RATIO, _BOMB_SIZE = 1000, 1 << 24  # deflate tops out near 1032:1 on runs of one byte
# The readers whose whole reading the member pass already makes (data.pkl, code, storages).
_TORCH_READERS = frozenset((Format.TORCHSCRIPT, Format.TORCH_ZIP))


def scan_zip(
    scan: ScanState,
    member: str,
    depth: int,
    *,
    start: int = 0,
    length: int | None = None,
    blob: bytes | None = None,
    view: ZipView = ZipView.TORCH,
) -> None:
    """``view``: the reader whose directory is judged; torch's is compared with zipfile's
    (``zip_views``), which is judged too where the two differ."""
    if depth > limits.MAX_CONTAINER_NESTING:
        scan.error(f"containers nested deeper than {limits.MAX_CONTAINER_NESTING}", member)
        return
    if blob is not None:
        directory = ZipDirectory.from_bytes(blob, scan.path, view)
    else:
        scan.zip_starts.add(start)
        held = scan.data
        directory = ZipDirectory.read(scan.path, start=start, length=length, held=held, view=view)
    names = directory.names()
    # torch's miniz lookup ignores case: "CODE/__torch__.PY" is the code torch.jit.load compiles
    folded = [n.lower() for n in names]
    torchscript = any("/code/" in n or n.startswith("code/") for n in folded) and any(
        n.endswith("constants.pkl") for n in folded
    )
    torch_archive = any(n.endswith("data.pkl") for n in folded)
    exported = any(n.endswith("/archive_format") or n == "archive_format" for n in names)
    _report_directory(scan, directory, member, names, torch_archive or torchscript or exported)
    zip_views.judge_views(scan, directory, member, depth, start=start, length=length, blob=blob)
    raw_payloads = _exported_raw_payloads(scan, directory) if exported else frozenset()
    storages = _storage_folder(folded) if torch_archive or torchscript else None
    if depth == 0:
        scan.format = "torchscript" if torchscript else "torch-zip" if torch_archive else "zip"
    if torchscript:
        code = sum(1 for n in folded if "/code/" in n and n.endswith(".py"))
        scan.add(
            Severity.INFO,
            "torchscript-code",
            member,
            f"{code} TorchScript source files under code/: torch.jit.load compiles and "
            "runs them (TorchScript, not Python)",
        )
    for entry in directory.entries:  # duplicates too: other loaders read the last copy
        if time.monotonic() > scan.deadline:
            scan.error(
                f"time limit of {limits.SCAN_SECONDS_PER_FILE:.0f}s per file reached", member
            )
            return
        if exported:
            raw = entry.method == STORED and entry.name.lower() in raw_payloads
        else:
            raw = storages is not None and _is_raw_storage(entry, storages)
        if not raw or _read_otherwise(scan, directory, entry):
            parent = member or scan.path.name
            _scan_entry(scan, directory, entry, parent, depth, torch_archive, torchscript)
    # Keras and numpy read their own members of any zip: torch's alone leave them no member
    torch_only = storages is not None and all(
        n.startswith(storages[: -len("data/")]) for n in folded
    )
    if depth == 0 and blob is None and not torch_only:
        passing = _TORCH_READERS if torch_archive or torchscript else frozenset()
        behind = directory if start else None  # a zip at byte 0 is the file's own probe's
        scan.scan_with_reader(zip_only=True, passing=passing, behind=behind)


def _report_directory(
    scan: ScanState, directory: ZipDirectory, member: str, names: list[str], torch_read: bool
) -> None:
    for name in directory.unsafe_names:
        scan.add(
            Severity.HIGH,
            "zip-path-traversal",
            name,
            "member name escapes the archive's folder",
        )
    if len(set(names)) != len(names):
        scan.add(
            Severity.MEDIUM,
            "duplicate-member",
            member,
            "the archive lists a member name twice: different loaders read different copies",
        )
    elif torch_read and len({n.lower() for n in names}) != len(names):
        scan.add(
            Severity.MEDIUM,
            "duplicate-member",
            member,
            "two member names differ only in case: torch's reader ignores case and picks one "
            "by its own sorted order, other loaders read each under its own name",
        )
    if 0 <= directory.declared_count != len(names):
        scan.add(
            Severity.MEDIUM,
            "zip-count-mismatch",
            member,
            f"the end record counts {directory.declared_count} members but the directory "
            f"holds {len(names)}: torch reads the counted ones, Python's zipfile all of them",
        )
    for mismatched in directory.mismatched_names:
        scan.add(
            Severity.MEDIUM,
            "zip-name-mismatch",
            mismatched,
            "the member's local header names a different file than the directory: "
            "loaders that read either see different content",
        )


def _scan_entry(
    scan: ScanState,
    directory: ZipDirectory,
    entry: ZipEntry,
    parent: str,
    depth: int,
    torch_archive: bool,
    torchscript: bool,
) -> None:
    label = f"{parent}!{entry.name}"
    ratio = entry.size / entry.compressed_size if entry.compressed_size else 0
    deflated = entry.method == DEFLATED  # bzip2 and LZMA reach far past 1000:1 on plain zeros
    if deflated and ratio > _BOMB_RATIO and entry.size > _BOMB_SIZE:
        message = f"inflates {entry.compressed_size:,} bytes to {entry.size:,}"
        scan.add(Severity.HIGH, "zip-bomb", label, message)
        return
    raw = _raw_member(scan, directory, entry, label)
    if raw is None:
        return
    if (torch_archive or torchscript) and entry.method not in TORCH_METHODS:
        scan.error(
            f"compression method {entry.method} in a torch archive: torch.load refuses the "
            "file (its reader reads stored and deflated members only); judged for loaders "
            "that read it through Python's zipfile",
            label,
        )
    stored = entry.method == STORED
    inflated = None if stored else _inflate(raw, entry.method, _SNIFF_BYTES, strict=False)
    if not stored and inflated is None:
        scan.error("the member does not inflate", label)
        return
    head = bytes(raw[:_SNIFF_BYTES] if inflated is None else inflated)  # the one copy
    if stored and head[:4] == LOCAL_SIGNATURE and directory.blob is None:
        scan_zip(scan, label, depth + 1, start=entry.data_offset, length=entry.size)
        return
    if entry.name.endswith(".json") and _scan_json_member(scan, directory, entry, label):
        return
    if not _may_hold_code(head, entry.name, torchscript):
        return
    if entry.size > limits.MAX_SCANNED_MEMBER_BYTES:
        scan.error(
            f"the member declares {entry.size:,} bytes, past the "
            f"{limits.MAX_SCANNED_MEMBER_BYTES:,} read to be scanned: not analysed",
            label,
        )
        return
    # loaders read no further than the directory declares (zipfile cuts there, torch's miniz
    # sizes its buffer by it): one byte more says the member is damaged
    if not stored and not deflated:
        cap = stream_cap(entry.compressed_size, limits.MAX_SCANNED_MEMBER_BYTES)
        if entry.size >= cap.size:
            scan.error(
                f"the member declares {entry.size:,} bytes from {entry.compressed_size:,}, "
                f"past the {cap.size:,} inflated to be scanned ({cap.advice}): not analysed",
                label,
            )
            return
    body = raw if stored else _inflate(raw, entry.method, entry.size + 1, strict=False)
    if body is None:
        scan.error("the member does not inflate: not analysed", label)
        return
    _check_member(scan, entry, body, label)
    body = body[: entry.size]
    if torchscript and _is_script_code(entry.name):
        scan.findings.extend(script_code.findings(bytes(body), entry.name))
        return
    if head[:4] in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
        scan_zip(scan, label, depth + 1, blob=bytes(body))
        return
    scan.scan_member(body, label, depth + 1, torch_archive=torch_archive, torchscript=torchscript)


def _raw_member(
    scan: ScanState, directory: ZipDirectory, entry: ZipEntry, label: str
) -> memoryview | None:
    if entry.method != STORED and entry.method not in INFLATED_METHODS:
        scan.error(f"compression method {entry.method} is not analysed", label)
        return None
    base = memoryview(directory.blob) if directory.blob is not None else scan.data
    end = entry.data_offset + entry.compressed_size
    if end > len(base):
        scan.error("the member runs past the end of the archive", label)
        return None
    return base[entry.data_offset : end]


def _check_member(scan: ScanState, entry: ZipEntry, body: memoryview, label: str) -> None:
    """Damage that loaders refuse (Python's zipfile checks both) makes the member an
    error; its bytes were judged all the same, for loaders that do not check."""
    if len(body) > entry.size:
        scan.error(
            f"the member inflates past the {entry.size:,} bytes the directory declares: "
            "damaged, or made so (loaders stop there; those bytes are judged)",
            label,
        )
    elif len(body) != entry.size:
        scan.error(
            f"the directory declares {entry.size:,} bytes but the member holds "
            f"{len(body):,}: damaged, or made so loaders disagree",
            label,
        )
    elif zlib.crc32(body) != entry.crc32:
        scan.error("the member's CRC-32 does not match its bytes: damaged", label)


def _scan_json_member(
    scan: ScanState, directory: ZipDirectory, entry: ZipEntry, label: str
) -> bool:
    """A JSON member (a ``.keras`` config, a ``.pt2`` program) for objects it embeds;
    False when it is not JSON after all, and is judged by its content instead."""
    try:
        document = json.loads(directory.read_member(entry, _MAX_CONFIG_BYTES))
    except (ModelportError, ValueError, RecursionError):
        return False
    scan.scan_embedded(document, label)
    try:  # whichever reader takes the zip, if any: Keras runs a config.json on its own
        scan.findings.extend(content_checks.keras_config_findings(document))
    except ModelportError as exc:
        scan.error(f"a Keras model config, not analysed: {exc}", label)
    return True


def _exported_raw_payloads(scan: ScanState, directory: ZipDirectory) -> frozenset[str]:
    """The members a ``.pt2``'s payload configs declare as raw tensor bytes. The rest of
    ``data/weights`` and ``data/constants`` is unpickled by torch.export.load whatever its
    name (torch/export/pt2_archive/_package.py): ``use_pickle`` payloads through
    ``torch.load(weights_only=False)``, ``custom_obj_*`` through torch's own unpickler,
    ``opaque_obj_*`` through ``pickle.loads``; those are judged by content. Names are
    case-folded, as torch finds them."""
    raw: set[str] = set()
    loaded: set[str] = set()
    for entry in directory.entries:
        folder, _, name = entry.name.rpartition("/")
        if not name.endswith(("_weights_config.json", "_constants_config.json")):
            continue
        try:
            document = json.loads(directory.read_member(entry, _MAX_CONFIG_BYTES))
        except (ModelportError, ValueError, RecursionError) as exc:
            scan.error(f"a payload config torch.export.load reads is unreadable: {exc}", entry.name)
            continue
        config = document.get("config") if isinstance(document, dict) else None
        for payload in (config or {}).values() if isinstance(config, dict) else ():
            path_name = payload.get("path_name") if isinstance(payload, dict) else None
            if not isinstance(path_name, str):
                continue
            # torch's lookup ignores case: a pickled "WEIGHT_0" may be read from weight_0
            member = f"{folder}/{path_name}".lower()
            tensor = path_name.startswith(("weight_", "tensor_"))
            if payload.get("use_pickle") is False and tensor:
                raw.add(member)
            else:
                loaded.add(member)
    return frozenset(raw - loaded)


def _storage_folder(folded: list[str]) -> str | None:
    """``<prefix>/data/``, case-folded, where torch looks for storages: its reader takes the
    first record's top-level folder for every name (and refuses a first record in none)."""
    if not folded or "/" not in folded[0]:
        return None
    return folded[0].split("/", 1)[0] + "/data/"


def _is_raw_storage(entry: ZipEntry, storages: str) -> bool:
    """Tensor bytes of a torch.save or TorchScript archive (``<prefix>/data/<key>`` of torch's
    own prefix, reached through data.pkl's persistent ids): stored, copied, never parsed."""
    folded = entry.name.lower()
    key = folded[len(storages) :] if folded.startswith(storages) else ""
    # torch names a storage <prefix>/data/<key> and nothing deeper: a deeper "data" folder
    # is TorchScript's code/__torch__/data/ (a class of module data.*), which jit compiles.
    # torch.save to "data.pt" names its main pickle "data/data.pkl", and torch's miniz lookup
    # ignores case: a member named like a pickle is never taken for a storage
    return entry.method == STORED and bool(key) and "/" not in key and not key.endswith(".pkl")


def _read_otherwise(scan: ScanState, directory: ZipDirectory, entry: ZipEntry) -> bool:
    """Whether stored tensor bytes open as a file another loader interprets: an ``.npy``
    (numpy.load reads every ``*.npy`` member of a zip) or a zip. Bytes that parse as a
    pickle stay data: no loader unpickles a storage, and float data opens like one often
    enough (an optimizer's step counts do) that judging it would be a false alarm."""
    start, size = entry.data_offset, min(entry.compressed_size, 8)
    if directory.blob is not None:
        head = bytes(directory.blob[start : start + size])
    elif isinstance(scan.data.obj, mmap.mmap):
        # read, not faulted in: a fault maps the page cache's whole folio around the page
        # (megabytes), and a large archive holds hundreds of storages
        with open(scan.path, "rb") as handle:
            head = os.pread(handle.fileno(), size, start)
    else:
        head = bytes(scan.data[start : start + size])
    return head.startswith((NPY_MAGIC, LOCAL_SIGNATURE, EOCD_SIGNATURE))


def _may_hold_code(head: bytes, name: str, torchscript: bool) -> bool:
    """Whether a member calls for a full read: anything but plain data does, and so does
    a member its loader unpickles by name (``*.pkl``; ``*.pt`` through ``torch.load``)."""
    by_name = name.lower().endswith((".pkl", TORCH_SAVED))
    by_name = by_name or (torchscript and _is_script_code(name))
    return by_name or may_hold_code(head)


def _is_script_code(name: str) -> bool:
    folded = name.lower()
    return folded.endswith(".py") and "code/" in folded


def _inflate(raw: memoryview, method: int, cap: int, *, strict: bool = True) -> memoryview | None:
    """A deflated, bzip2 or LZMA member, never more than ``cap`` bytes; None when it does not
    inflate or (when ``strict``) inflates past the cap. Declared sizes are not consulted."""
    try:
        data = inflate_member(raw, method, cap)
    except ModelportError:
        return None
    if strict and len(data) > cap:
        return None
    return memoryview(data).toreadonly()[:cap]
