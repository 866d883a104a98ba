"""A folder's scan: every file a loader could read in it, each judged once. A Hugging Face
cache is a folder of symbolic links, followed (``walking``); a file that no reader recognises
is raw tensor data when a model beside it names it so; the zips a ``.distcp`` holds back to
back are read one by one (``formats.dcp``). Imported by the scanner only for folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from modelport import limits
from modelport.formats import dcp
from modelport.pickles.symbols import Severity
from modelport.scanning import walking
from modelport.scanning.findings import FileReport, Finding, data_files_as_data

# ``scanner.scan_file``: a file's path, its zip segments, and whether it was met in a folder.
ScanFile = Callable[..., FileReport]


def scan_folder(path: Path, scan_file: ScanFile, reports: list[FileReport]) -> list[FileReport]:
    """``reports`` (those of the paths named before this folder) and the folder's own: data
    files are recognised across all of them, as a model may name its data anywhere."""
    walk = walking.walk(path)
    segments = dcp.segments_of(list(walk.files))
    for file in walk.files:
        aliases = walk.aliases.get(file, ())
        report = scan_file(file, segments.get(file.resolve()), in_folder=True, aliases=aliases)
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
        error_report(link, "link", "a symbolic link that leads nowhere") for link in walk.dangling
    )
    if walk.truncated:
        reports.append(
            error_report(
                path,
                "dir",
                f"more than {limits.MAX_SCANNED_FILES} files; the rest were not scanned",
            )
        )
    reports = data_files_as_data(reports)
    if not walk.files and not walk.dangling:
        reports.append(error_report(path, "dir", "the folder holds no file: nothing to judge"))
    return reports


def error_report(path: Path, kind: str, message: str) -> FileReport:
    finding = Finding(Severity.HIGH, "not-analysed", "", message)
    return FileReport(str(path), kind, "error", (finding,))
