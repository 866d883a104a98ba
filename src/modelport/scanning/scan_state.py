"""What one file's scan holds while it runs, and the moves every part of it makes: record
a finding, record what could not be analysed. The parts (``archives``, ``tars``, pickle
``streams``, the readings in ``scanner``) are functions over this state, imported only when
a file's bytes call for them; each reaches the others only through the stubs below, which
``scanner._FileScanner`` implements by importing the part that does the work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelport.formats._zip import ZipDirectory
from modelport.formats._zip_ends import ZipView
from modelport.formats.protocol import Contents, Format
from modelport.scanning.findings import Finding
from modelport.severity import Severity

# Members a loader hands to torch.load: the sample inputs, weights and constants of a .pt2.
TORCH_SAVED = ".pt"


class ScanState:
    path: Path
    data: memoryview
    format: str
    in_folder: bool  # met in a folder scan, beside the model it may belong to
    aliases: tuple[Path, ...]  # the folder's other paths to this file (links), by name
    deadline: float
    findings: list[Finding]
    zip_starts: set[int]
    embedded_seen: set[int]
    read: Contents | None  # the file's contents as a caller read them already, if it did
    data_files: tuple[str, ...]  # files beside it that its reader says it reads (ONNX data)

    def error(self, message: str, member: str) -> None:
        self.findings.append(Finding(Severity.HIGH, "not-analysed", member, message))

    def add(self, severity: Severity, rule: str, member: str, message: str) -> None:
        self.findings.append(Finding(severity, rule, member, message))

    # -- implemented by the scanner: one part reaching another ------------------------------
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
        raise NotImplementedError

    def scan_member(
        self, data: memoryview, member: str, depth: int, *, torch_archive: bool, torchscript: bool
    ) -> bool:
        raise NotImplementedError

    def scan_plain_member(self, data: memoryview, member: str, depth: int) -> bool:
        raise NotImplementedError

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
        raise NotImplementedError

    def scan_with_reader(
        self,
        *,
        zip_only: bool = False,
        passing: frozenset[Format] = frozenset(),
        behind: ZipDirectory | None = None,
    ) -> str | None:
        raise NotImplementedError

    def scan_embedded(self, document: Any, member: str) -> None:
        raise NotImplementedError
