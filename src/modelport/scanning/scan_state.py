"""What one file's scan holds while it runs, and the moves every part of it makes: record
a finding, record what could not be analysed, bound a pickle's time. The parts (archives,
pickle streams, the readings in ``scanner``) are mixins over this state; each calls the
others only through the stubs below, which ``scanner._FileScanner`` implements."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from modelport.pickles.interface import Limits
from modelport.pickles.symbols import Severity
from modelport.scanning.findings import Finding

MAX_OPCODES_PER_PICKLE = 20_000_000


class ScanState:
    path: Path
    data: memoryview
    format: str
    deadline: float
    findings: list[Finding]
    zip_starts: set[int]
    embedded_seen: set[int]

    def error(self, message: str, member: str) -> None:
        self.findings.append(Finding(Severity.HIGH, "not-analysed", member, message))

    def add(self, severity: Severity, rule: str, member: str, message: str) -> None:
        self.findings.append(Finding(severity, rule, member, message))

    def limits(self) -> Limits:
        return Limits(
            max_opcodes=MAX_OPCODES_PER_PICKLE,
            max_seconds=max(1.0, self.deadline - time.monotonic()),
        )

    # -- implemented by the scanner: one part reaching another ------------------------------
    def scan_zip(
        self,
        member: str,
        depth: int,
        *,
        start: int = 0,
        length: int | None = None,
        blob: bytes | None = None,
    ) -> None:
        raise NotImplementedError

    def scan_member(
        self, data: memoryview, member: str, depth: int, *, torch_archive: bool, torchscript: bool
    ) -> bool:
        raise NotImplementedError

    def scan_plain_member(self, data: memoryview, member: str, depth: int) -> bool:
        raise NotImplementedError

    def scan_with_reader(self, *, zip_only: bool = False) -> str | None:
        raise NotImplementedError

    def scan_embedded(self, document: Any, member: str) -> None:
        raise NotImplementedError
