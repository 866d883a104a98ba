"""``modelport.scan``: is a model file safe to load? Static analysis that never executes it.

Containers are found by content, never by extension: a pickle at offset 0 (plain, joblib,
legacy torch with every pickle of its stream), zips (torch archives, TorchScript, ``.pt2``,
``.keras``, ``.npz``; every member that holds a pickle, wherever it sits; a pickle with a zip
appended is scanned both ways), tars (torch 0.x saves; any other tar member by member),
compressed wrappers, ``.npy`` object arrays, TorchScript code (``script_code``), and the
headers of the formats that carry no pickle (safetensors, GGUF, ONNX, HDF5, Keras, TFLite),
whose readers check every size and offset and whose contents ``content_checks`` rates.
Directories are walked; one bad file never stops the walk.

Verdicts: ``safe`` (info findings at most), ``suspicious`` (medium), ``unsafe`` (high or
critical), ``error`` (could not be fully analysed: never reported as safe).
"""

from __future__ import annotations

import mmap
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from modelport import limits
from modelport.errors import ModelportError, UnparsedPickleError, UnsupportedDtypeError
from modelport.formats import _compressed, dcp, npy, torch_legacy
from modelport.formats._zip import (
    EOCD_SIGNATURE,
    LOCAL_SIGNATURE,
    ZipDirectory,
    ZipEntry,
    has_zip_tail,
    prepended_bytes,
)
from modelport.formats.protocol import Probe, refuse_special_file
from modelport.formats.registry import READERS
from modelport.pickles.interface import Limits
from modelport.pickles.judging import Severity, scan_pickle
from modelport.scanning import content_checks, script_code
from modelport.scanning.findings import FileReport, Finding, ScanReport, worst

# Members a loader hands to torch.load: the sample inputs, weights and constants of a .pt2
# (torch.export.load falls back to weights_only=False for them).
TORCH_SAVED = ".pt"
_PICKLE_STARTS = frozenset(b"(}]cKJNIFSVX\x80")


def scan(*paths: str | Path) -> ScanReport:
    """Scan files and directories (recursively); never executes anything from them."""
    reports: list[FileReport] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
            segments = dcp.segments_of(files)
            reports.extend(
                scan_file(p, segments.get(p.resolve())) for p in files[: limits.MAX_SCANNED_FILES]
            )
            if len(files) > limits.MAX_SCANNED_FILES:
                reports.append(
                    _error_report(
                        path,
                        "dir",
                        f"more than {limits.MAX_SCANNED_FILES} files; the rest were not scanned",
                    )
                )
        else:
            reports.append(scan_file(path))
    return ScanReport(worst([r.verdict for r in reports]), tuple(reports))


def scan_file(path: Path, segments: list[tuple[int, int]] | None = None) -> FileReport:
    """One file's verdict; errors while reading become an ``error`` verdict, not a crash.
    ``segments`` lists (offset, length) of zips stored back to back (DCP ``.distcp`` files)."""
    scanner = _FileScanner(path, segments)
    try:
        scanner.run()
    except ModelportError as exc:
        scanner.error(str(exc), "")
    except OSError as exc:
        scanner.error(f"could not read the file: {exc.strerror or exc}", "")
    return scanner.report()


def _error_report(path: Path, kind: str, message: str) -> FileReport:
    finding = Finding(Severity.HIGH, "not-analysed", "", message)
    return FileReport(str(path), kind, "error", (finding,))


@dataclass
class _FileScanner:
    path: Path
    segments: list[tuple[int, int]] | None = None
    format: str = "unknown"
    findings: list[Finding] = field(default_factory=list)
    errors: int = 0
    deadline: float = field(default_factory=lambda: time.monotonic() + limits.SCAN_SECONDS_PER_FILE)

    def error(self, message: str, member: str) -> None:
        self.errors += 1
        self.findings.append(Finding(Severity.HIGH, "not-analysed", member, message))

    def add(self, severity: Severity, rule: str, member: str, message: str) -> None:
        self.findings.append(Finding(severity, rule, member, message))

    def report(self) -> FileReport:
        verdicts = []
        for finding in self.findings:
            if finding.rule == "not-analysed":
                verdicts.append("error")
            elif finding.severity in (Severity.CRITICAL, Severity.HIGH):
                verdicts.append("unsafe")
            elif finding.severity is Severity.MEDIUM:
                verdicts.append("suspicious")
        return FileReport(str(self.path), self.format, worst(verdicts), tuple(self.findings))

    def limits(self) -> Limits:
        return Limits(
            max_opcodes=20_000_000, max_seconds=max(1.0, self.deadline - time.monotonic())
        )

    # -- dispatch ---------------------------------------------------------------------------
    def run(self) -> None:
        refuse_special_file(self.path)  # a FIFO or device: an error verdict, never "empty"
        size = self.path.stat().st_size
        if size == 0:
            self.format = "empty"
            return
        if self.segments is not None:
            self.format = "dcp-data"
            for offset, length in self.segments:
                self.scan_zip(f"@{offset}", 1, start=offset, length=length)
            return
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        # Views into the map may outlive this call inside findings' arguments; the map is
        # unmapped when the last of them is collected.
        self.scan_bytes(memoryview(mapped), "", 0, in_file=True)

    def scan_bytes(
        self, data: memoryview, member: str, depth: int, *, in_file: bool, compressed: bool = False
    ) -> None:
        if depth > limits.MAX_CONTAINER_NESTING:
            self.error(f"containers nested deeper than {limits.MAX_CONTAINER_NESTING}", member)
            return
        head = bytes(data[:16])
        if head.startswith((LOCAL_SIGNATURE, EOCD_SIGNATURE)):
            self.format = self.format if depth else "zip"
            if in_file:
                self.scan_zip(member, depth)
            else:
                self.error("a zip inside a member is not scanned", member)
            return
        if in_file and depth == 0 and torch_legacy.is_tar(data[:512]):
            self.scan_tar()
            return
        if head.startswith(npy.MAGIC):
            self.format = self.format if depth else "npy"
            self.scan_npy(data, member, depth)
            return
        kind = _compressed.compression_of(head)
        if kind is not None:
            self.format = self.format if depth else f"pickle ({kind.value})"
            self.scan_compressed(data, kind, member, depth)
            return
        if head[:1] and head[0] in _PICKLE_STARTS and self._parses_as_pickle(data):
            self.format = self.format if depth else "pickle"
            self.scan_pickle_stream(data, member, depth)
            if in_file and depth == 0 and has_zip_tail(data):
                self.add(
                    Severity.MEDIUM,
                    "polyglot",
                    member,
                    "a pickle with a zip appended: loaders that read either view see "
                    "different content",
                )
                self.scan_zip(member, depth, start=prepended_bytes(self.path))
            return
        if depth == 0:
            self.scan_with_reader()
        elif compressed:  # nothing else explains why it was compressed: not analysed
            what = "a tar archive" if torch_legacy.is_tar(data[:512]) else "no pickle"
            self.error(
                f"the compressed stream holds {what}, which modelport does not analyse "
                "there; decompress it and scan the result",
                member,
            )
        else:
            self.add(Severity.INFO, "opaque-member", member, "member holds no pickle")

    # -- pickles ----------------------------------------------------------------------------
    def _parses_as_pickle(self, data: memoryview) -> bool:
        """Whether bytes that start like a text pickle are one: they parse to a STOP, or run
        out of bytes while every opcode so far was valid (a cut or long pickle), or name code
        to run before they fail (pickle.loads would have run it by then)."""
        if data[0] == 0x80:
            return len(data) > 2 and 2 <= data[1] <= 5
        try:
            scan_pickle(data[: 1 << 16], limits=Limits(max_opcodes=100_000))
        except UnparsedPickleError as exc:
            serious = (Severity.CRITICAL, Severity.HIGH)
            return exc.truncated or any(f.severity in serious for f in exc.findings)
        except ModelportError:
            return False
        return True

    def scan_pickle_stream(
        self,
        data: memoryview,
        member: str,
        depth: int,
        *,
        torch_archive: bool = False,
        torchscript: bool = False,
    ) -> None:
        """Every pickle of the stream: one for plain pickles, five for legacy torch files."""
        start = 0
        for index in range(limits.MAX_PICKLES_PER_STREAM):
            expect_pids = torch_archive or index == 3  # legacy torch: the object pickle
            try:
                result = scan_pickle(
                    data,
                    start=start,
                    torchscript=torchscript,
                    expect_persistent_ids=expect_pids,
                    limits=self.limits(),
                )
            except ModelportError as exc:
                if isinstance(exc, UnparsedPickleError):  # what it did before it failed
                    self.findings.extend(Finding.from_pickle(f, member) for f in exc.findings)
                self.error(f"pickle at byte {start} could not be analysed: {exc}", member)
                return
            self.findings.extend(Finding.from_pickle(f, member) for f in result.findings)
            for nested in result.nested:
                payload = nested.payload
                blob = (
                    memoryview(payload)
                    if isinstance(payload, bytes)
                    else data[payload.offset : payload.offset + payload.length]
                )
                self.add(
                    Severity.INFO,
                    "nested-torch-storage",
                    member,
                    f"a torch storage pickled inside the pickle at byte {nested.offset}; "
                    "scanned as well",
                )
                self.scan_bytes(blob, f"{member}@{nested.offset}", depth + 1, in_file=False)
            start = result.end
            legacy = index == 0 and torch_legacy.is_magic_number(data[:start])
            if legacy:
                self.format = "torch-legacy" if depth == 0 else self.format
            if torch_archive or (not legacy and index == 0):
                return
            if index >= 4:
                return  # legacy: magic, protocol, sys_info, objects, storage keys; then data

    def scan_compressed(
        self, data: memoryview, kind: _compressed.Compression, member: str, depth: int
    ) -> None:
        inflated = _compressed.inflate(
            data,
            kind,
            min(limits.MAX_SCAN_INFLATED_BYTES, _compressed.decompression_cap()),
            partial=False,
        )
        self.scan_bytes(
            memoryview(inflated),
            f"{member}<{kind.value}>",
            depth + 1,
            in_file=False,
            compressed=True,
        )

    def scan_npy(self, data: memoryview, member: str, depth: int) -> None:
        prefix = bytes(data[: npy.MAX_PREFIX])
        try:
            header = npy.parse_header(prefix, path=self.path, where=member, available=len(data))
        except UnsupportedDtypeError:
            # Strings, dates, records: no pickle unless an object field hides in the dtype,
            # in which case numpy pickles the array after its header, as for object arrays.
            header_text = prefix[: prefix.find(b"}") + 1]
            if re.search(rb"""['"][|<>=]?O""", header_text) is None:
                self.add(
                    Severity.INFO, "plain-array", member, "a numpy array of a non-numeric dtype"
                )
                return
            self.add(
                Severity.MEDIUM,
                "object-array",
                member,
                "numpy record array with object fields: its contents are a pickle",
            )
            self.scan_pickle_stream(
                data[len(header_text) + npy.header_padding(prefix) :], member, depth + 1
            )
            return
        if header.is_object:
            self.add(
                Severity.MEDIUM,
                "object-array",
                member,
                "numpy object array: its contents are a pickle (scanned below)",
            )
            self.scan_pickle_stream(data[header.data_offset :], member, depth + 1)

    def scan_tar(self) -> None:
        """torch 0.1-0.3 saves: a tar whose members hold pickles between raw storages."""
        self.format = "torch-legacy (tar)"
        spans, stopped = torch_legacy.tar_pickle_spans(self.path)
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        data = memoryview(mapped)
        for span in spans:
            label = f"{self.path.name}!{span.member}"
            try:
                result = scan_pickle(
                    data[: span.end],
                    start=span.start,
                    expect_persistent_ids=True,
                    limits=self.limits(),
                )
            except ModelportError as exc:
                self.error(f"pickle at byte {span.start} could not be analysed: {exc}", label)
                continue
            self.findings.extend(Finding.from_pickle(f, label) for f in result.findings)
        if stopped is not None and not spans:
            self.scan_tar_members()
            return
        if stopped is not None:
            self.error(f"the tar layout could not be walked to its end: {stopped}", "")
        if not spans and stopped is None:
            self.error("a tar archive that is not a torch save", "")

    def scan_tar_members(self) -> None:
        """Any other tar (NeMo's ``.nemo``, a packed model folder): every regular member is
        scanned by its content, zips in place, nothing extracted."""
        import tarfile

        self.format = "tar"
        try:
            with tarfile.open(self.path, "r:") as archive:
                members = archive.getmembers()
        except (tarfile.TarError, OSError) as exc:
            self.error(f"the tar archive could not be read: {exc}", "")
            return
        if len(members) > limits.MAX_SCANNED_FILES:
            self.error(f"more than {limits.MAX_SCANNED_FILES:,} tar members", "")
            return
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        data = memoryview(mapped)
        for info in members:
            if not info.isfile():
                if info.issym() or info.islnk():
                    self.add(Severity.MEDIUM, "tar-link", info.name, f"a link to {info.linkname!r}")
                continue
            if ".." in Path(info.name).parts or Path(info.name).is_absolute():
                self.add(
                    Severity.HIGH,
                    "tar-path-traversal",
                    info.name,
                    "member name escapes the archive",
                )
            end = info.offset_data + info.size
            if end > len(data):
                self.error("the tar member runs past the end of the file", info.name)
                continue
            body = data[info.offset_data : end]
            label = f"{self.path.name}!{info.name}"
            if bytes(body[:4]) in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
                self.scan_zip(label, 1, start=info.offset_data, length=info.size)
            elif body:
                self.scan_bytes(body, label, 1, in_file=False)

    # -- zips -------------------------------------------------------------------------------
    def scan_zip(
        self, member: str, depth: int, *, start: int = 0, length: int | None = None
    ) -> None:
        if depth > limits.MAX_CONTAINER_NESTING:
            self.error(f"containers nested deeper than {limits.MAX_CONTAINER_NESTING}", member)
            return
        directory = ZipDirectory.read(self.path, start=start, length=length)
        names = directory.names()
        for name in directory.unsafe_names:
            self.add(
                Severity.HIGH,
                "zip-path-traversal",
                name,
                "member name escapes the archive's folder",
            )
        if len(set(names)) != len(names):
            self.add(
                Severity.MEDIUM,
                "duplicate-member",
                member,
                "the archive lists a member name twice: different loaders read different copies",
            )
        torchscript = any("/code/" in n or n.startswith("code/") for n in names) and any(
            n.endswith("constants.pkl") for n in names
        )
        torch_archive = any(n.endswith("data.pkl") for n in names)
        if depth == 0:
            self.format = "torchscript" if torchscript else "torch-zip" if torch_archive else "zip"
        if torchscript:
            code = sum(1 for n in names if "/code/" in n and n.endswith(".py"))
            self.add(
                Severity.INFO,
                "torchscript-code",
                member,
                f"{code} TorchScript source files under code/: torch.jit.load compiles and "
                "runs them (TorchScript, not Python)",
            )
        for mismatched in directory.mismatched_names:
            self.add(
                Severity.MEDIUM,
                "zip-name-mismatch",
                mismatched,
                "the member's local header names a different file than the directory: "
                "loaders that read either see different content",
            )
        for entry in directory.entries:  # duplicates too: other loaders read the last copy
            if time.monotonic() > self.deadline:
                self.error(
                    f"time limit of {limits.SCAN_SECONDS_PER_FILE:.0f}s per file reached", member
                )
                return
            label = f"{self.path.name}!{entry.name}"
            if entry.name.endswith(TORCH_SAVED) and directory.holds_stored_zip(entry):
                self.scan_zip(label, depth + 1, start=entry.data_offset, length=entry.size)
                continue
            blob = self.zip_member(directory, entry)
            if blob is None:
                continue
            view = memoryview(blob)
            if entry.name.endswith(".pkl") or (view[:1] and view[0] == 0x80):
                self.scan_pickle_stream(
                    view, label, depth + 1, torch_archive=torch_archive, torchscript=torchscript
                )
            elif blob.startswith(npy.MAGIC):
                self.scan_npy(view, label, depth + 1)
            elif torchscript and entry.name.endswith(".py") and "code/" in entry.name:
                self.findings.extend(script_code.findings(blob, entry.name))
        if depth == 0 and not torch_archive:
            self.scan_with_reader(zip_only=True)

    def zip_member(self, directory: ZipDirectory, entry: ZipEntry) -> bytes | None:
        """A member's bytes to scan, or None for what holds no code: tensor data, members too
        large to hold (pickles are always read), zip bombs (reported)."""
        pickled = entry.name.endswith(".pkl")
        if entry.size > limits.MAX_SCANNED_MEMBER_BYTES and not pickled:
            return None
        ratio = entry.size / entry.compressed_size if entry.compressed_size else 0
        if ratio > 1000 and entry.size > 1 << 24:
            message = f"inflates {entry.compressed_size:,} bytes to {entry.size:,}"
            self.add(Severity.HIGH, "zip-bomb", entry.name, message)
            return None
        is_data = "/data/" in entry.name or entry.name.startswith("data/")
        loaded = pickled or entry.name.endswith(TORCH_SAVED)  # torch.load reads .pt members
        if (is_data and entry.is_stored and not loaded) or (entry.size > 1 << 26 and not loaded):
            return None  # raw tensor storage of a torch archive, or too large to be code
        blob = directory.read_member(entry, limits.MAX_SCANNED_MEMBER_BYTES)
        if pickled and zlib.crc32(blob) != entry.crc32:
            message = "the member's CRC-32 does not match its bytes"
            self.add(Severity.MEDIUM, "bad-crc", entry.name, message)
        return blob

    # -- formats without code: their readers check every header field -------------------------
    def scan_with_reader(self, *, zip_only: bool = False) -> None:
        probe = Probe.of(self.path)
        for reader in READERS:
            if not reader.sniff(probe):
                continue
            if self.format in ("unknown", "zip"):
                self.format = reader.format.value
            try:
                contents = reader.contents(probe)
            except ModelportError as exc:
                self.add(
                    Severity.HIGH, "malformed", "", f"{reader.format} header check failed: {exc}"
                )
                return
            self.findings.extend(content_checks.findings(contents))
            if contents.close is not None:
                contents.close()
            return
        if zip_only:
            return
        if content_checks.is_text(self.path):
            self.format = "text"
            self.findings.extend(content_checks.text_findings(self.path))
            return
        self.error("unrecognised binary content: could not be analysed", "")
