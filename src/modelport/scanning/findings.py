"""What ``scan`` reports: findings, one verdict per file, one for the whole scan.

Verdicts, worst last: ``safe`` (info findings at most), ``suspicious`` (medium), ``error``
(could not be fully analysed: never reported as safe), ``unsafe`` (high or critical).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelport.pickles.interface import Value, fill
from modelport.severity import Severity

if TYPE_CHECKING:
    from modelport.pickles.symbols import PickleFinding

_ORDER = ("safe", "suspicious", "error", "unsafe")

FIXES: dict[str, str] = {
    "known-gadget": "do not load this file; it carries an exploit",
    "unknown-call": "trust its author before loading; modelport.load(allow_unsafe=True) "
    "extracts the tensors without running anything",
    "stdlib-call": "do not load this file with pickle; modelport.load(allow_unsafe=True) "
    "extracts the tensors without running anything",
    "indirect-call": "do not load this file; it hides a call behind an allowed reconstructor",
    "attribute-patching": "do not load this file; it changes code other loads will run",
    "dynamic-global": "do not load this file; it hides what it calls",
    "computed-call": "do not load this file; it hides what it calls",
    "attribute-smuggling": "do not load this file",
    "extension-code": "do not load this file; it names code through the copyreg registry",
    "custom-class": "modelport.load reads its weights without the class; load it whole only "
    "with its author's code",
    "custom-class-call": "modelport.load reads its weights without the class; load it whole "
    "only with its author's code",
    "custom-state": "modelport.load reads its weights without the class; load it whole only "
    "with its author's code",
    "unknown-global": "inspect the file; modelport.load reads only its tensors",
    "unknown-constructor-args": "do not load this file with pickle",
    "value-called": "do not load this file",
    "trailing-data": "inspect the bytes after the pickle; loaders that read on see them",
    "polyglot": "find out why the file reads as two formats before loading it",
    "reaches-outside": "do not load it: it makes its loader read files outside the model",
    "keras-lambda": "load with safe_mode=True, or rebuild the model in code and load weights only",
    "torchscript-file-access": "do not run this model; it reads files of the machine",
    "torchscript-custom-op": "run it only where you trust the library that defines the operator",
    "template-injection": "do not use this chat template",
    "template-suspicious-access": "render it only in Jinja's sandbox, and read it first",
    "template-include": "render it without a template loader",
    "template-resource": "do not render this chat template",
    "remote-code": "read the named code before loading with trust_remote_code=True",
    "config-torch-call": "do not load this model: its loader calls the torch function the "
    "configuration names, with no trust_remote_code asked",
    "config-target": "read what the configuration names before its loader instantiates it "
    "(Hydra, NeMo, LightningCLI import and call it)",
    "yaml-python-tag": "load this YAML only with yaml.safe_load; its python/ tags build objects",
    "yaml-unparsed": "find out why the YAML does not parse before a loader reads it",
    "zip-path-traversal": "do not extract this archive",
    "zip-bomb": "do not extract this archive",
    "zip-directory-mismatch": "do not load it: torch and Python's zipfile (numpy, Keras) read "
    "different archives from this file",
    "zip-name-nul": "do not load it: loaders name its members differently",
    "not-analysed": "",
}


class Finding(Value):
    """One thing a file does that its loader would act on, located in the file: the member
    (archive entry, nested stream) and, for pickles, the opcode's offset and the global it
    names with how it is used."""

    FIELDS = (
        "severity",
        "rule",
        "member",
        "message",
        "offset",
        "opcode",
        "global_name",
        "usage",
    )
    __slots__ = FIELDS
    severity: Severity
    rule: str
    member: str
    message: str
    offset: int | None
    opcode: str
    global_name: str
    usage: str

    def __init__(
        self,
        severity: Severity,
        rule: str,
        member: str,
        message: str,
        offset: int | None = None,
        opcode: str = "",
        global_name: str = "",
        usage: str = "",
    ) -> None:
        fill(
            self,
            severity=severity,
            rule=rule,
            member=member,
            message=message,
            offset=offset,
            opcode=opcode,
            global_name=global_name,
            usage=usage,
        )

    @classmethod
    def from_pickle(cls, finding: PickleFinding, member: str) -> Finding:
        """A pickle's finding, located in the file by its member."""
        return cls(
            finding.severity,
            finding.rule,
            member,
            finding.message,
            finding.offset,
            finding.opcode,
            finding.global_name,
            finding.usage,
        )

    @property
    def fix(self) -> str:
        return FIXES.get(self.rule, "")

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value,
            "rule": self.rule,
            "member": self.member,
            "offset": self.offset,
            "opcode": self.opcode,
            "global": self.global_name,
            "usage": self.usage,
            "message": self.message,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class FileReport:
    """One file's verdict. ``data_files``: files beside it that its loader reads as raw
    tensor bytes (an ONNX model's external data), which a folder scan judges as such."""

    path: str
    format: str
    verdict: str
    findings: tuple[Finding, ...]
    data_files: tuple[str, ...] = ()
    bytes_fetched: int | None = None  # an object behind a URL: the bytes its scan fetched

    def noted(self, finding: Finding) -> FileReport:
        """The same report with one more (informational) finding."""
        return replace(self, findings=(*self.findings, finding))

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "verdict": self.verdict,
            "findings": [f.to_json() for f in self.findings],
        }
        if self.data_files:
            found["data_files"] = list(self.data_files)
        if self.bytes_fetched is not None:
            found["bytes_fetched"] = self.bytes_fetched
        return found


class ScanReport(Value):
    """One verdict for everything scanned (the worst of its files), and each file's report."""

    FIELDS = ("verdict", "files")
    __slots__ = FIELDS
    verdict: str
    files: tuple[FileReport, ...]

    def __init__(self, verdict: str, files: tuple[FileReport, ...]) -> None:
        fill(self, verdict=verdict, files=files)

    @property
    def serious(self) -> tuple[Finding, ...]:
        """Every finding above ``info``, file by file."""
        return tuple(
            f for file in self.files for f in file.findings if f.severity is not Severity.INFO
        )

    def summary(self, shown: int = 2) -> str:
        """The first serious findings in one line, for refusals and warnings."""
        found = "; ".join(f"{f.rule}: {f.message}" for f in self.serious[:shown])
        return found or "no findings"

    def to_json(self) -> dict[str, Any]:
        if len(self.files) == 1:
            return self.files[0].to_json()
        return {"verdict": self.verdict, "files": [f.to_json() for f in self.files]}


def data_files_as_data(reports: list[FileReport]) -> list[FileReport]:
    """A file no reader recognises is an error, unless a model beside it names it as its raw
    tensor data: its loader copies those bytes into tensors and interprets nothing."""
    owners = {
        (Path(report.path).parent / name).resolve(): Path(report.path).name
        for report in reports
        for name in report.data_files
    }
    if not owners:
        return list(reports)  # nothing names a data file: no path needs resolving
    judged = []
    for report in reports:
        owner = owners.get(Path(report.path).resolve()) if report.format == "unknown" else None
        if owner is not None:
            finding = Finding(
                Severity.INFO, "tensor-data", "", f"raw tensor data that {owner} reads"
            )
            report = FileReport(report.path, "tensor-data", "safe", (finding,))
        judged.append(report)
    return judged


def worst(verdicts: list[str]) -> str:
    return max(verdicts, key=_ORDER.index, default="safe")
