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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelport import limits
from modelport.errors import (
    EscapingReferenceError,
    ModelportError,
    UnsupportedDtypeError,
)
from modelport.formats import _compressed, dcp, npy, tf_bundle, torch_legacy
from modelport.formats._zip import (
    EOCD_SIGNATURE,
    LOCAL_SIGNATURE,
    ZipDirectory,
    has_zip_tail,
    prepended_bytes,
)
from modelport.formats.protocol import Contents, Format, Probe, refuse_special_file
from modelport.formats.registry import candidates
from modelport.pickles.judging import Severity
from modelport.scanning import content_checks, content_kinds, embedded, remote_inputs, walking
from modelport.scanning.archives import TORCH_SAVED, ArchiveScanning, mapped_view
from modelport.scanning.content_kinds import PickleReading
from modelport.scanning.findings import FileReport, Finding, ScanReport, worst
from modelport.scanning.streams import StreamScanning
from modelport.transfer import remote

# Formats whose readers check a file that holds no pickle; the scanner reads the others.
_CODE_FREE = frozenset(
    (
        Format.SAFETENSORS,
        Format.GGUF,
        Format.GGML,
        Format.ONNX,
        Format.HDF5,
        Format.TFLITE,
        Format.KERAS,
        Format.TF_CHECKPOINT,
        Format.TF_SAVEDMODEL,
        Format.FLAX_MSGPACK,
        Format.EXECUTORCH_PTE,
    )
)


def scan(*paths: str | Path) -> ScanReport:
    """Scan files and directories (recursively); never executes anything from them."""
    reports: list[FileReport] = []
    for raw in paths:
        if remote.is_url(raw):
            reports.append(remote_inputs.scan_url(str(raw), scan_file))
            continue
        path = Path(raw)
        if not path.is_dir():
            reports.append(scan_file(path))
            continue
        walk = walking.walk(path)
        segments = dcp.segments_of(list(walk.files))
        for file in walk.files:
            report = scan_file(file, segments.get(file.resolve()), in_folder=True)
            if file in walk.outside:
                report = report.noted(
                    Finding(
                        Severity.INFO,
                        "link-outside",
                        "",
                        f"a symbolic link to {walk.outside[file]}, outside {path}: a loader "
                        "reads that file, so it was judged there",
                    )
                )
            reports.append(report)
        reports.extend(
            _error_report(link, "link", "a symbolic link that leads nowhere")
            for link in walk.dangling
        )
        if walk.truncated:
            reports.append(
                _error_report(
                    path,
                    "dir",
                    f"more than {limits.MAX_SCANNED_FILES} files; the rest were not scanned",
                )
            )
        reports = _data_files_as_data(reports)
        if not walk.files and not walk.dangling:
            reports.append(_error_report(path, "dir", "the folder holds no file: nothing to judge"))
    return ScanReport(worst([r.verdict for r in reports]), tuple(reports))


def scan_file(
    path: Path,
    segments: list[tuple[int, int]] | None = None,
    *,
    in_folder: bool = False,
    read: Contents | None = None,
) -> FileReport:
    """One file's verdict; errors while reading become an ``error`` verdict, not a crash.
    ``segments`` lists (offset, length) of zips stored back to back (DCP ``.distcp`` files);
    ``in_folder``: met in a folder scan, where a model's companion files (README, tokenizer
    data) leave the verdict alone instead of being an error as files that are no model.
    ``read``: what the file's reader already gave (``inspect`` has it), so a code-free
    format's header, a million tensors perhaps, is not read twice."""
    scanner = _FileScanner(path, segments, in_folder=in_folder, read=read)
    try:
        scanner.run()
    except ModelportError as exc:
        scanner.error(str(exc), "")
    except OSError as exc:
        scanner.error(f"could not read the file: {exc.strerror or exc}", "")
    return scanner.report()


def _data_files_as_data(reports: list[FileReport]) -> list[FileReport]:
    """A file no reader recognises is an error, unless a model beside it names it as its raw
    tensor data: its loader copies those bytes into tensors and interprets nothing."""
    owners = {
        (Path(report.path).parent / name).resolve(): Path(report.path).name
        for report in reports
        for name in report.data_files
    }
    judged = []
    for report in reports:
        owner = owners.get(Path(report.path).resolve())
        if owner is not None and report.format == "unknown":
            finding = Finding(
                Severity.INFO, "tensor-data", "", f"raw tensor data that {owner} reads"
            )
            report = FileReport(report.path, "tensor-data", "safe", (finding,))
        judged.append(report)
    return judged


def _error_report(path: Path, kind: str, message: str) -> FileReport:
    finding = Finding(Severity.HIGH, "not-analysed", "", message)
    return FileReport(str(path), kind, "error", (finding,))


@dataclass
class _FileScanner(ArchiveScanning, StreamScanning):
    path: Path
    segments: list[tuple[int, int]] | None = None
    in_folder: bool = False
    read: Contents | None = None
    format: str = "unknown"
    findings: list[Finding] = field(default_factory=list)
    data: memoryview = field(default_factory=lambda: memoryview(b""))
    zip_starts: set[int] = field(default_factory=set)
    embedded_seen: set[int] = field(default_factory=set)
    deadline: float = field(default_factory=lambda: time.monotonic() + limits.SCAN_SECONDS_PER_FILE)

    data_files: tuple[str, ...] = ()

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
        if self.path.stat().st_size == 0:
            self.format = "empty"
            self.error("the file is empty: nothing a loader reads, nothing to judge", "")
            return
        # Views into the map may outlive this call inside findings' arguments; the map is
        # unmapped when the last of them is collected.
        self.data = mapped_view(self.path)
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
            self.scan_unrecognised()

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
        if torch_legacy.is_tar(head[:512]):
            readings.append("tar")
        reading = content_kinds.pickle_reading(data)
        if reading is PickleReading.WHOLE:
            readings.append("pickle")
        if head.startswith(npy.MAGIC):
            readings.append("npy")
            self.format = "npy"
            self.scan_npy(data, "", 0)
        kind = _compressed.compression_of(head[:16])
        if kind is not None:
            readings.append(f"{kind.value} stream")
            self.format = f"pickle ({kind.value})"
            self.scan_compressed(data, kind, "", 0)
        if "zip" not in readings:
            reader_format = self.scan_with_reader()
            if reader_format is not None:
                readings.append(reader_format)
        if (
            reading is PickleReading.CUT
            and not readings
            and not self.is_tensor_shard()
            and not content_kinds.is_text_not_pickle(data)
        ):
            readings.append("pickle")
        if "pickle" in readings:
            self.format = self.format if self.format != "unknown" else "pickle"
            explained = len(readings) > 1 or zip_behind
            self.scan_pickle_stream(data, "", 0, explained=explained)
        if "tar" in readings:
            self.scan_tar()
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
            ZipDirectory.read(self.path, start=start)
        except ModelportError:
            return False  # an end record by chance in data: no zip reader opens it
        self.scan_zip("", 0, start=start)
        return True

    def _polyglot_severity(self) -> Severity:
        """Readings that are each plain data harm no loader: then the polyglot is noted; when
        any reading does more, the file's shape is part of the trick and counts too."""
        serious = any(f.severity is not Severity.INFO for f in self.findings)
        return Severity.MEDIUM if serious else Severity.INFO

    def is_tensor_shard(self) -> bool:
        """A TensorFlow data shard its ``.index`` names: raw tensor bytes, noted as such (its
        first bytes may open like a cut pickle, which no loader of it reads)."""
        owner = tf_bundle.shard_owner(self.path)
        if owner is not None and self.format != "tensor-data":
            self.format = "tensor-data"
            self.add(Severity.INFO, "tensor-data", "", f"raw tensor data that {owner.name} reads")
        return owner is not None

    def scan_unrecognised(self) -> None:
        """No model reading: a file a loader reads for what it makes it do (a config, a chat
        template), a model's companion in a folder, or else not a model at all (an error
        that says what it is, never ``safe``)."""
        head = bytes(self.data[:_SNIFF])
        if head.startswith(_LFS_POINTER):
            self.format = "git-lfs-pointer"
            self.error("a Git LFS pointer, not the file it names: run `git lfs pull`", "")
            return
        if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
            self.format = "html"
            self.error("an HTML page, not a model (a download that returned a web page?)", "")
            return
        if self.is_tensor_shard():
            return
        suffix = self.path.suffix.lower()
        if content_checks.is_text(self.path):
            self.format = "text"
            found = content_checks.text_findings(self.path)
            self.findings.extend(found)
            serious = any(f.severity is not Severity.INFO for f in found)
            if serious or self.in_folder or suffix in _LOADER_TEXT:
                return
            self.error("a text file that is not a model and that no model loader reads", "")
            return
        if self.in_folder and (suffix in _TOKENIZER_DATA or self.path.name in _TOKENIZER_NAMES):
            self.format = "tokenizer-data"
            self.add(Severity.INFO, "tokenizer-data", "", "tokenizer data: read as data, no code")
            return
        self.error("unrecognised binary content: could not be analysed", "")

    # -- bytes inside a container -------------------------------------------------------------
    def scan_member(
        self, data: memoryview, member: str, depth: int, *, torch_archive: bool, torchscript: bool
    ) -> bool:
        """One member's bytes, judged by content; whether it held something analysed."""
        if depth > limits.MAX_CONTAINER_NESTING:
            self.error(f"containers nested deeper than {limits.MAX_CONTAINER_NESTING}", member)
            return True
        head = bytes(data[:_SNIFF])
        if head.startswith(npy.MAGIC):
            self.scan_npy(data, member, depth)
            return True
        kind = _compressed.compression_of(head[:16])
        if kind is not None:
            self.scan_compressed(data, kind, member, depth)
            return True
        # A cut pickle that named no code runs nothing: as a member it is data (tensor bytes
        # can open like a length opcode); one its loader unpickles by name is read below.
        if content_kinds.pickle_reading(data) is PickleReading.WHOLE or member.endswith(
            (".pkl", TORCH_SAVED)
        ):
            self.scan_pickle_stream(
                data, member, depth, torch_archive=torch_archive, torchscript=torchscript
            )
            return True
        if torch_legacy.is_tar(head[:512]):
            self.error("a tar inside a member is not analysed", member)
            return True
        if member.endswith((".pkl", TORCH_SAVED)):
            self.error("a member its loader unpickles does not parse as a pickle", member)
            return True
        return False

    def scan_plain_member(self, data: memoryview, member: str, depth: int) -> bool:
        return self.scan_member(data, member, depth, torch_archive=False, torchscript=False)

    def scan_compressed(
        self, data: memoryview, kind: _compressed.Compression, member: str, depth: int
    ) -> None:
        inflated = memoryview(
            _compressed.inflate(
                data,
                kind,
                min(limits.MAX_SCAN_INFLATED_BYTES, _compressed.decompression_cap()),
                partial=False,
            )
        )
        label = f"{member}<{kind.value}>"
        if bytes(inflated[:4]) in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
            self.scan_zip(label, depth + 1, blob=bytes(inflated))
        elif not self.scan_member(
            inflated, label, depth + 1, torch_archive=False, torchscript=False
        ):
            what = "a tar archive" if torch_legacy.is_tar(inflated[:512]) else "no pickle"
            self.error(
                f"the compressed stream holds {what}, which modelport does not analyse "
                "there; decompress it and scan the result",
                label,
            )

    def scan_npy(self, data: memoryview, member: str, depth: int) -> None:
        """numpy evaluates ``descr`` with ``ast.literal_eval`` and builds the dtype from it;
        the same evaluation decides whether the data after the header is a pickle."""
        prefix = bytes(data[: npy.MAX_PREFIX])
        size = len(data)
        offset = npy.object_data_offset(prefix, path=self.path, where=member, available=size)
        if offset is None:
            try:
                header = npy.parse_header(prefix, path=self.path, where=member, available=size)
            except UnsupportedDtypeError:
                self.add(Severity.INFO, "plain-array", member, "a numpy array of a rarer dtype")
                return
            if header.data_offset + header.nbytes > size:
                self.error(
                    f"the header promises {header.nbytes:,} bytes of data, "
                    f"{max(0, size - header.data_offset):,} follow it (truncated?)",
                    member,
                )
            return
        self.add(
            Severity.INFO,
            "object-array",
            member,
            "numpy array whose dtype holds objects: np.load(allow_pickle=True) unpickles its "
            "contents, judged below",
        )
        self.scan_pickle_stream(data[offset:], member, depth + 1)

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

    # -- formats without code: their readers check every header field -------------------------
    def scan_with_reader(self, *, zip_only: bool = False) -> str | None:
        """The first reader of a code-free format (or, inside a zip, any reader) that takes
        the file; its format's name, or None when none does."""
        probe = Probe.of(self.path)
        for reader in candidates(probe):
            if not zip_only and reader.format not in _CODE_FREE:
                continue
            if not reader.sniff(probe):
                continue
            if self.format in ("unknown", "zip"):
                self.format = reader.format.value
            if self.read is not None and self.read.format is reader.format:
                self._judge_contents(self.read)
                return reader.format.value
            try:
                contents = reader.contents(probe)
            except EscapingReferenceError as exc:
                self.add(Severity.HIGH, "reaches-outside", "", str(exc))
                return reader.format.value
            except ModelportError as exc:
                self.error(f"damaged or not a {reader.format} file: {exc}", "")
                return reader.format.value
            self._judge_contents(contents)
            if contents.close is not None:
                contents.close()
            return reader.format.value
        return None

    def _judge_contents(self, contents: Contents) -> None:
        self.findings.extend(content_checks.findings(contents))
        self.data_files = tuple(str(n) for n in contents.details.get("external_data") or ())
        for document in _configs_of(contents):
            self.scan_embedded(document, "")


_SNIFF = 1 << 16


def _configs_of(contents: Contents) -> list[Any]:
    """The model configurations a reader found (a Keras ``model_config``, parsed or as the
    JSON text an HDF5 attribute holds)."""
    found: list[Any] = []
    for source in (contents.details.get("model_config"), contents.metadata.get("model_config")):
        if isinstance(source, str):
            try:
                source = json.loads(source)
            except (ValueError, RecursionError):
                continue
        if isinstance(source, (dict, list)):
            found.append(source)
    return found


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# Text a model loader reads for what it makes it do: configs name code, templates render.
_LOADER_TEXT = frozenset((".json", ".jinja", ".jinja2", ".yaml", ".yml"))
# Binary files a model folder carries beside its weights, which tokenizer libraries parse
# as data (sentencepiece protobufs, tiktoken ranks).
_TOKENIZER_DATA = frozenset((".model", ".spm", ".tiktoken", ".bpe"))
_TOKENIZER_NAMES = frozenset(("tokenizer.model", "spiece.model", "sentencepiece.bpe.model"))
