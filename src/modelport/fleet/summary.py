"""A command's summary rebuilt from a JSONL output alone: the table, ``--json`` and
``--sarif`` of a run are functions of its records, so they can be printed again (``scan
--from-jsonl OUT``), after a resume, or for shards run on several machines and concatenated.

The latest record of each path counts (a rerun's record supersedes the one it redid), in
the order of the inputs' ``index``: the order of the run's own summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport.errors import UsageError
from modelport.fleet.journal import latest, read
from modelport.fleet.records import Record
from modelport.pickles.symbols import Severity
from modelport.scanning.findings import FileReport, Finding, ScanReport, data_files_as_data, worst


@dataclass(frozen=True)
class Summary:
    """The records of one command's run (or runs) that stand, in input order."""

    command: str
    records: tuple[Record, ...]

    def counts(self) -> dict[str, int]:
        """Records by status (``ok``, ``error``, ``timeout``)."""
        found: dict[str, int] = {}
        for record in self.records:
            found[record.status] = found.get(record.status, 0) + 1
        return found

    def scan_report(self) -> ScanReport:
        """The ``ScanReport`` a scan run's records make: what ``scan`` prints."""
        if self.command != "scan":
            raise UsageError(f"these are records of `{self.command}`, not of `scan`")
        return scan_report(self.records)


def summarize(jsonl_path: str | Path, command: str | None = None) -> Summary:
    """The summary of the records in ``jsonl_path`` (of ``command``, when the file holds
    several commands' records)."""
    records = read(jsonl_path).records
    commands = sorted({r.command for r in records})
    if command is None:
        if len(commands) > 1:
            raise UsageError(
                f"{jsonl_path} holds records of {', '.join(commands)}: say which command"
            )
        command = commands[0] if commands else "scan"
    chosen = [r for r in records if r.command == command]
    standing = sorted(latest(chosen), key=lambda r: (r.index, r.path))
    return Summary(command, tuple(standing))


def scan_report(records: tuple[Record, ...] | list[Record]) -> ScanReport:
    """The report of the records' files together: a file that a model among them reads as
    raw tensor data is judged as such, as ``scan`` judges a folder."""
    files = tuple(data_files_as_data([file_report(r) for r in records]))
    return ScanReport(worst([f.verdict for f in files]), files)


def file_report(record: Record) -> FileReport:
    """A scan record as the scanner's report: its result, or, for a file that has none (its
    worker died, it ran out of time), an ``error`` verdict that says why."""
    result = record.result
    if record.status == "ok" and isinstance(result, dict):
        findings = tuple(_finding(f) for f in result["findings"])
        fetched = result.get("bytes_fetched")  # an object behind a URL
        data_files = tuple(result.get("data_files", ()))
        return FileReport(
            result["path"], result["format"], result["verdict"], findings, data_files, fetched
        )
    message = record.error.message if record.error else "no result recorded"
    finding = Finding(Severity.HIGH, "not-analysed", "", message)
    return FileReport(record.path, record.format or record.status, "error", (finding,))


def _finding(data: dict[str, Any]) -> Finding:
    return Finding(
        Severity(data["severity"]),
        data["rule"],
        data["member"],
        data["message"],
        data["offset"],
        data["opcode"],
        data["global"],
        data["usage"],
    )
