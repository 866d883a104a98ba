"""``modelport scan``: is it safe to load? Static analysis; nothing in the files is executed."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import modelport
from modelport.cli import _console, _many_files
from modelport.cli._console import Segment
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.errors import UsageError
from modelport.scanning.findings import FileReport, ScanReport, data_files_as_data, worst
from modelport.severity import Severity

if TYPE_CHECKING:
    from modelport.fleet.running import Plan

EXAMPLES = (
    """examples:
  modelport scan model.pt
  modelport scan ./downloaded-model/ --json
  modelport scan *.bin --sarif > scan.sarif
  modelport scan --from-jsonl scan.jsonl --sarif    (the summary of an earlier --jsonl run)

"""
    + _many_files.MANY_FILES.format(command="scan")
    + """
exit codes: 0 safe, 1 suspicious or unsafe, 2 error (a file could not be fully analysed)
"""
)

_STYLE = {
    Severity.CRITICAL: "bold red",
    Severity.HIGH: "red",
    Severity.MEDIUM: "yellow",
    Severity.INFO: "dim",
}
_VERDICT_STYLE = {"safe": "green", "suspicious": "yellow", "unsafe": "bold red", "error": "magenta"}


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "scan",
        help=COMMANDS["scan"].help,
        description="Statically analyse model files and directories by content: every pickle "
        "opcode, every archive member, every header. Nothing is imported or executed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _many_files.add_arguments(parser, "files or directories")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object")
    output.add_argument("--sarif", action="store_true", help="print SARIF 2.1.0 for code scanning")
    parser.add_argument(
        "--from-jsonl",
        metavar="OUT",
        help="scan nothing: print the summary of the records an earlier --jsonl run wrote",
    )
    parser.set_defaults(run=run)


def exit_code(verdict: str) -> int:
    return {"safe": ExitCode.OK, "suspicious": ExitCode.NO, "unsafe": ExitCode.NO}.get(
        verdict, ExitCode.ERROR
    )


def run(args: argparse.Namespace) -> int:
    if args.from_jsonl:
        if args.paths or args.from_file:
            raise UsageError("--from-jsonl prints an earlier run's summary; it takes no paths")
        return _print(args, _many_files.summarize(args.from_jsonl, "scan").scan_report())
    plan = _many_files.plan(args, "scan", {})
    if plan is None:
        return _print(args, modelport.scan(*args.paths))
    return _print(args, _run_fleet(plan, show_lines=_human(args)), streamed=True)


def _human(args: argparse.Namespace) -> bool:
    return not (args.json or args.sarif)


def _print(args: argparse.Namespace, report: ScanReport, *, streamed: bool = False) -> int:
    """The report as asked (the table, --json or --sarif), and the exit code of its verdict;
    ``streamed``: the table's file lines are out already."""
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif args.sarif:
        print(json.dumps(to_sarif(report), indent=2))
    elif streamed:
        _console.write(verdict_lines(report))
    else:
        _console.write(report_lines(report))
    return exit_code(report.verdict)


def _run_fleet(plan: Plan, *, show_lines: bool) -> ScanReport:
    """Scan in workers; with ``show_lines``, each file's lines print as it is judged, in the
    order the files were named. A file no reader recognised waits for the end: a model among
    the files may read it as raw tensor data (ONNX external data), which is judged as such."""
    files, held = [], []
    for record in _many_files.records(plan):
        file = _many_files.file_report(record)
        files.append(file)
        if show_lines and file.format == "unknown":
            held.append(file.path)
        elif show_lines:
            _console.write(file_lines(file))
    judged = data_files_as_data(files)
    by_path = {file.path: file for file in judged}
    for path in held:
        _console.write(file_lines(by_path[path]))
    return ScanReport(worst([f.verdict for f in judged]), tuple(judged))


def report_lines(report: ScanReport) -> Iterator[list[Segment]]:
    """One line per file, then each finding above info: where, what, how it is used, the fix."""
    for file in report.files:
        yield from file_lines(file)
    yield from verdict_lines(report)


def file_lines(file: FileReport) -> Iterator[list[Segment]]:
    style = _VERDICT_STYLE.get(file.verdict, "")
    yield [
        (f"{file.verdict.upper():10}", style),
        (f" {file.path} ", ""),
        (f"({file.format})", "dim"),
        *(
            [(f" fetched {file.bytes_fetched:,} bytes", "dim")]
            if file.bytes_fetched is not None
            else []
        ),
    ]
    for finding in file.findings:
        if finding.severity is Severity.INFO:
            continue
        where = finding.member or file.path.rsplit("/", 1)[-1]
        if finding.offset is not None:
            where += f" @{finding.offset} {finding.opcode}"
        used = f" {finding.global_name} ({finding.usage})" if finding.global_name else ""
        yield [
            ("  ", ""),
            (f"{finding.severity.value:8}", _STYLE.get(finding.severity, "")),
            (f" {finding.rule}  {where}{used}", ""),
        ]
        yield [(f"           {finding.message}", "")]
        if finding.fix:
            yield [("           ", ""), (f"fix: {finding.fix}", "dim")]


def verdict_lines(report: ScanReport) -> Iterator[list[Segment]]:
    """The closing line of a scan of several files: the worst verdict and the counts."""
    if len(report.files) > 1:
        counts = {v: sum(f.verdict == v for f in report.files) for v in _VERDICT_STYLE}
        summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        yield [(f"verdict: {report.verdict} ({summary})", "")]


def to_sarif(report: ScanReport) -> dict[str, Any]:
    """SARIF 2.1.0: one result per finding above info, so code-scanning UIs can show them."""
    level = {
        Severity.CRITICAL: "error",
        Severity.HIGH: "error",
        Severity.MEDIUM: "warning",
        Severity.INFO: "note",
    }
    rules = sorted({f.rule for file in report.files for f in file.findings})
    results = [
        {
            "ruleId": finding.rule,
            "level": level.get(finding.severity, "warning"),
            "message": {
                "text": f"{finding.message}" + (f" Fix: {finding.fix}" if finding.fix else "")
            },
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": file.path}}}],
            "properties": {
                "member": finding.member,
                "offset": finding.offset,
                "opcode": finding.opcode,
                "global": finding.global_name,
                "usage": finding.usage,
                "verdict": file.verdict,
            },
        }
        for file in report.files
        for finding in file.findings
        if finding.severity is not Severity.INFO
    ]
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "modelport",
                        "version": modelport.__version__,
                        "rules": [{"id": r} for r in rules],
                    }
                },
                "results": results,
            }
        ],
    }
