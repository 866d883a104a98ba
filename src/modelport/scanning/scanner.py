"""``modelport.scan``: is a model file safe to load? Static analysis that never executes it.

A file is scanned under every reading a loader could take of it, never only the first that
parses: a pickle at byte 0 (``pickle.load``, ``joblib.load``, legacy ``torch.load``: every
pickle of the stream), a tar (``torch.load`` tries one before the pickle), a zip at byte 0
or at the end behind other bytes (torch archives, TorchScript, ``.pt2``, ``.keras``,
``.npz``; see ``archives``), a compressed stream (joblib), an ``.npy`` header, and the
formats that carry no pickle (safetensors, GGUF, ONNX, HDF5 anywhere its signature may
be, TFLite), whose readers check every size and offset and whose contents
``content_checks`` rates. Two readings at once is a polyglot, reported as such. Directories
are walked with their symbolic links (a Hugging Face cache is a folder of links); one bad
file never stops the walk.

Verdicts: ``safe`` (info findings at most, and something was analysed), ``suspicious``
(medium), ``unsafe`` (high or critical), ``error`` (could not be fully analysed).
"""

from __future__ import annotations

import functools
import importlib
import mmap
import os
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from modelport import limits
from modelport.errors import ModelportError, UnsupportedDtypeError
from modelport.formats import _compressed, _npy_header
from modelport.formats._hdf5_raw import SIGNATURE as HDF5_SIGNATURE
from modelport.formats._hdf5_raw import find_superblock
from modelport.formats._tar import is_tar
from modelport.formats._zip import (
    EOCD_SIGNATURE,
    LOCAL_SIGNATURE,
    ZipDirectory,
    ZipView,
    has_zip_tail,
    prepended_bytes,
)
from modelport.formats.protocol import Contents, Format, refuse_special_file
from modelport.scanning import code_free, content_checks, embedded
from modelport.scanning.findings import FileReport, ScanReport, worst
from modelport.scanning.first_bytes import PickleReading, decided_reading
from modelport.scanning.scan_state import TORCH_SAVED, ScanState
from modelport.severity import Severity

if TYPE_CHECKING:
    from modelport.formats._compressed import Compression

# The parts of a scan that only some files call for, each imported the first time a file's
# bytes (or a path) need it, as ``formats.registry`` imports readers: a safetensors file
# needs none of them, a torch zip the archive, stream and pickle parts.
_PARTS: Final = {
    "archives": "modelport.scanning.archives",  # zips: a file, a member, a nested blob
    "tars": "modelport.scanning.tars",  # tars: torch 0.1-0.3 layouts, any other tar
    "streams": "modelport.scanning.streams",  # pickle streams, every pickle of one
    "pickle_kinds": "modelport.scanning.content_kinds",  # whether bytes opening so are one
    "urls": "modelport.transfer.remote",  # whether a path names an object behind a URL
    "remote": "modelport.scanning.remote_inputs",  # the scan of an object behind a URL
    "folders": "modelport.scanning.folders",  # a folder's files, links and data files
    "other_files": "modelport.scanning.other_files",  # files with no model reading
}
# Every URL ``transfer.remote.is_url`` takes has this; a local path rarely does.
_URL_MARK: Final = "://"


@functools.cache  # a file calls on its parts a dozen times: the import machinery once
def _part(name: str) -> ModuleType:
    return importlib.import_module(_PARTS[name])


def scan(*paths: str | Path) -> ScanReport:
    """Scan files and directories (recursively); never executes anything from them."""
    reports: list[FileReport] = []
    for raw in paths:
        if _is_url(raw):
            fetched: FileReport = _part("remote").scan_url(str(raw), scan_file)
            reports.append(fetched)
            continue
        path = Path(raw)
        if not path.is_dir():
            reports.append(scan_file(path))
            continue
        reports = _part("folders").scan_folder(path, scan_file, reports)
    return ScanReport(worst([r.verdict for r in reports]), tuple(reports))


def _is_url(raw: str | Path) -> bool:
    """Whether ``raw`` names an object behind a URL; only a string that could be one imports
    the module that decides."""
    if not isinstance(raw, str) or _URL_MARK not in raw:
        return False
    decided: bool = _part("urls").is_url(raw)
    return decided


def scan_file(
    path: Path,
    segments: list[tuple[int, int]] | None = None,
    *,
    in_folder: bool = False,
    read: Contents | None = None,
    aliases: tuple[Path, ...] = (),
) -> FileReport:
    """One file's verdict; errors while reading become an ``error`` verdict, not a crash.
    ``segments`` lists (offset, length) of zips stored back to back (DCP ``.distcp`` files);
    ``in_folder``: met in a folder scan, where a model's companion files (README, tokenizer
    data) leave the verdict alone instead of being an error as files that are no model.
    ``read``: what the file's reader already gave (``inspect`` has it), so a code-free
    format's header is not read twice. ``aliases``: other paths to it, judged by name too."""
    scanner = _FileScanner(path, segments, in_folder=in_folder, read=read, aliases=aliases)
    try:
        scanner.run()
    except ModelportError as exc:
        scanner.error(str(exc), "")
    except OSError as exc:
        scanner.error(f"could not read the file: {exc.strerror or exc}", "")
    return scanner.report()


class _FileScanner(ScanState):
    """One file's scan: its state, its readings, the parts its bytes call for."""

    def __init__(
        self,
        path: Path,
        segments: list[tuple[int, int]] | None = None,
        *,
        in_folder: bool = False,
        read: Contents | None = None,
        aliases: tuple[Path, ...] = (),
    ) -> None:
        self.path = path
        self.segments = segments
        self.in_folder = in_folder
        self.aliases = aliases
        self.read = read
        self.format = "unknown"
        self.findings = []
        self.data = memoryview(b"")
        self.zip_starts = set()
        self.embedded_seen = set()
        self.deadline = time.monotonic() + limits.SCAN_SECONDS_PER_FILE
        self.data_files: tuple[str, ...] = ()

    def report(self) -> FileReport:
        verdicts = []
        for finding in self.findings:
            if finding.rule == "not-analysed":
                verdicts.append("error")
            elif finding.severity in (Severity.CRITICAL, Severity.HIGH):
                verdicts.append("unsafe")
            elif finding.severity is Severity.MEDIUM:
                verdicts.append("suspicious")
        findings = tuple(self.findings)
        return FileReport(str(self.path), self.format, worst(verdicts), findings, self.data_files)

    # -- the readings of one file -----------------------------------------------------------
    def run(self) -> None:
        refuse_special_file(self.path)  # a FIFO or device: an error verdict, never "empty"
        # Views of the bytes may outlive this call in findings: a map goes with the last one.
        self.data = _file_view(self.path)
        if not self.data:
            self.format = "empty"
            self.error("the file is empty: nothing a loader reads, nothing to judge", "")
            return
        if self.segments is not None:
            self.format = "dcp-data"
            for offset, length in self.segments:
                self.scan_zip(f"@{offset}", 1, start=offset, length=length)
            return
        readings = self.scan_readings()
        if len(readings) > 1:
            self.add(
                self._polyglot_severity(),
                "polyglot",
                "",
                f"the file reads as {' and as '.join(readings)}: loaders that take different "
                "readings see different content (each reading is scanned)",
            )
        if not readings:
            _part("other_files").scan_unrecognised(self)
        else:
            self.findings.extend(content_checks.loader_text_findings(self.path, self.aliases))

    def scan_readings(self) -> list[str]:
        data = self.data
        head = bytes(data[:_SNIFF])
        readings: list[str] = []
        zip_behind = False
        if head.startswith((LOCAL_SIGNATURE, EOCD_SIGNATURE)):
            readings.append("zip")
            self.scan_zip("", 0)
        else:
            zip_behind = has_zip_tail(data)
        if is_tar(head[:512]):
            readings.append("tar")
        reading = self.pickle_reading(data)
        if reading is PickleReading.WHOLE:
            readings.append("pickle")
        if head.startswith(_npy_header.MAGIC):
            readings.append("npy")
            self.format = "npy"
            self.scan_npy(data, "", 0)
        kind = _compressed.compression_of(head[:16])
        if kind is not None:
            readings.append(f"{kind.value} stream")
            self.format = f"pickle ({kind.value})"
            self.scan_compressed(data, kind, "", 0)
        if "zip" not in readings and not head.startswith(HDF5_SIGNATURE):
            reader_format = code_free.scan_with_reader(self, passing=code_free.FOUND_BEHIND)
            if reader_format is not None:
                readings.append(reader_format)
        if find_superblock(head, len(data), self.path) is not None:  # before any import
            behind = code_free.scan_with_reader(self, slots=code_free.FOUND_BEHIND_SLOTS)
            readings += [] if behind is None else [behind]
        if (
            reading is PickleReading.CUT
            and not readings
            and not _part("other_files").is_tensor_shard(self)
            and not self.is_text_not_pickle(data)
        ):
            readings.append("pickle")
        if "pickle" in readings:
            self.format = self.format if self.format != "unknown" else "pickle"
            explained = len(readings) > 1 or zip_behind
            self.scan_pickle_stream(data, "", 0, explained=explained)
        if "tar" in readings:
            _part("tars").scan_tar(self)
        if zip_behind and self._scan_zip_behind():
            readings.append("zip (behind other bytes)")
        return readings

    def _scan_zip_behind(self) -> bool:
        """A zip at the end of other bytes, as Python's zipfile finds it (torch does not);
        one already scanned in place (a tar's last member) is not a second reading."""
        start = prepended_bytes(self.path)
        if start in self.zip_starts:
            return False
        try:
            ZipDirectory.read(self.path, start=start, held=self.data, view=ZipView.ZIPFILE)
        except ModelportError:
            return False  # an end record by chance in data: no zip reader opens it
        self.scan_zip("", 0, start=start, view=ZipView.ZIPFILE)
        return True

    def _polyglot_severity(self) -> Severity:
        """Readings that are each plain data harm no loader: then the polyglot is noted; when
        any reading does more, the file's shape is part of the trick and counts too."""
        serious = any(f.severity is not Severity.INFO for f in self.findings)
        return Severity.MEDIUM if serious else Severity.INFO

    # -- bytes inside a container -------------------------------------------------------------
    def scan_member(
        self, data: memoryview, member: str, depth: int, *, torch_archive: bool, torchscript: bool
    ) -> bool:
        """One member's bytes, judged by content; whether it held something analysed."""
        if depth > limits.MAX_CONTAINER_NESTING:
            self.error(f"containers nested deeper than {limits.MAX_CONTAINER_NESTING}", member)
            return True
        head = bytes(data[:_SNIFF])
        if head.startswith(_npy_header.MAGIC):
            self.scan_npy(data, member, depth)
            return True
        kind = _compressed.compression_of(head[:16])
        if kind is not None:
            self.scan_compressed(data, kind, member, depth)
            return True
        # A cut pickle that named no code runs nothing: as a member it is data (tensor bytes
        # can open like a length opcode); one its loader unpickles by name is read below.
        if self.pickle_reading(data) is PickleReading.WHOLE or member.endswith(
            (".pkl", TORCH_SAVED)
        ):
            self.scan_pickle_stream(
                data, member, depth, torch_archive=torch_archive, torchscript=torchscript
            )
            return True
        if is_tar(head[:512]):
            self.error("a tar inside a member is not analysed", member)
            return True
        if member.endswith((".pkl", TORCH_SAVED)):
            self.error("a member its loader unpickles does not parse as a pickle", member)
            return True
        return False

    def scan_plain_member(self, data: memoryview, member: str, depth: int) -> bool:
        return self.scan_member(data, member, depth, torch_archive=False, torchscript=False)

    # -- the parts a file's bytes call for, imported on first use ------------------------------
    def scan_zip(
        self,
        member: str,
        depth: int,
        *,
        start: int = 0,
        length: int | None = None,
        blob: bytes | None = None,
        view: ZipView = ZipView.TORCH,
    ) -> None:
        _part("archives").scan_zip(
            self, member, depth, start=start, length=length, blob=blob, view=view
        )

    def scan_pickle_stream(
        self,
        data: memoryview,
        member: str,
        depth: int,
        *,
        torch_archive: bool = False,
        torchscript: bool = False,
        explained: bool = False,
    ) -> None:
        _part("streams").scan_pickle_stream(
            self,
            data,
            member,
            depth,
            torch_archive=torch_archive,
            torchscript=torchscript,
            explained=explained,
        )

    def pickle_reading(self, data: memoryview) -> PickleReading:
        """Whether the bytes are a pickle; a parse only where their first bytes leave it open."""
        decided = decided_reading(data)
        if decided is not None:
            return decided
        parsed: PickleReading = _part("pickle_kinds").pickle_reading(data)
        return parsed

    def is_text_not_pickle(self, data: memoryview) -> bool:
        text: bool = _part("pickle_kinds").is_text_not_pickle(data)
        return text

    def scan_compressed(self, data: memoryview, kind: Compression, member: str, depth: int) -> None:
        label = f"{member}<{kind.value}>"
        absolute = min(limits.MAX_SCAN_INFLATED_BYTES, _compressed.decompression_cap())
        try:
            cap = _compressed.stream_cap(len(data), absolute)
            inflated = memoryview(_compressed.inflate(data, kind, cap, partial=False))
        except ModelportError as exc:  # the file's other readings are still scanned
            self.error(str(exc), label)
            return
        if bytes(inflated[:4]) in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
            self.scan_zip(label, depth + 1, blob=bytes(inflated))
        elif not self.scan_member(
            inflated, label, depth + 1, torch_archive=False, torchscript=False
        ):
            what = "a tar archive" if is_tar(inflated[:512]) else "no pickle"
            self.error(
                f"the compressed stream holds {what}, which modelport does not analyse "
                "there; decompress it and scan the result",
                label,
            )

    def scan_npy(self, data: memoryview, member: str, depth: int) -> None:
        """numpy evaluates ``descr`` with ``ast.literal_eval`` and builds the dtype from it;
        the same evaluation decides whether the data after the header is a pickle. The header
        is parsed once; numpy's own evaluation of ``descr`` runs only for what the parse
        refuses (a record with an object field, a rarer spelling)."""
        span = _npy_header.header_span(bytes(data[:16]))
        end = span if span is not None and span <= _npy_header.MAX_PREFIX else None
        prefix = bytes(data[: end or _npy_header.MAX_PREFIX])  # the header exactly, if it can
        size = len(data)
        refused: ModelportError | None = None
        try:
            header = _npy_header.parse_header(prefix, path=self.path, where=member, available=size)
        except ModelportError as exc:
            header, refused = None, exc
        if header is not None and not header.is_object:
            end = header.data_offset + header.nbytes
            if end > size:
                self.error(
                    f"the header promises {header.nbytes:,} bytes of data, "
                    f"{max(0, size - header.data_offset):,} follow it (truncated?)",
                    member,
                )
            elif end < size:
                after = f"the array's {header.nbytes:,} bytes of data"
                _part("streams").scan_after_array(self, data[end:], member, after, depth + 1)
            return
        offset = (
            header.data_offset
            if header is not None
            else _npy_header.object_data_offset(
                prefix, path=self.path, where=member, available=size
            )
        )
        if offset is None:  # no objects: the parse's refusal stands
            if refused is not None and not isinstance(refused, UnsupportedDtypeError):
                raise refused
            self.add(Severity.INFO, "plain-array", member, "a numpy array of a rarer dtype")
            return
        self.add(
            Severity.INFO,
            "object-array",
            member,
            "numpy array whose dtype holds objects: np.load(allow_pickle=True) unpickles its "
            "contents, judged below",
        )
        _part("streams").scan_object_array_pickle(self, data[offset:], member, depth + 1)

    def scan_embedded(self, document: Any, member: str) -> None:
        """Objects a config carries as base64 (``embedded``), scanned as members."""
        for where, raw in embedded.blobs_in(document):
            if hash(raw) in self.embedded_seen:
                continue  # the same config, met in its zip and again in its reader's view
            self.embedded_seen.add(hash(raw))
            label = f"{member}#{where}"
            self.add(
                Severity.INFO,
                "embedded-object",
                label,
                f"{len(raw):,} bytes of base64 in the config decode to data a loader "
                "deserializes; scanned as well",
            )
            if raw[:4] in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
                self.scan_zip(label, 1, blob=raw)
            elif not self.scan_plain_member(memoryview(raw), label, 1):
                self.add(Severity.INFO, "opaque-member", label, "holds no pickle")

    def scan_with_reader(
        self,
        *,
        zip_only: bool = False,
        passing: frozenset[Format] = frozenset(),
        behind: ZipDirectory | None = None,
    ) -> str | None:
        return code_free.scan_with_reader(self, zip_only=zip_only, passing=passing, behind=behind)


_SNIFF = 1 << 16
_READ_WHOLE = 1 << 20  # up to this size one read costs less than a map, its unmap and faults


def _file_view(path: Path) -> memoryview:
    """The file's bytes as its size says (none for a file in ``/proc``, whose size is 0),
    read whole when small, else mapped."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= _READ_WHOLE:
            return memoryview(handle.read(size))
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
