"""Readable Markdown reports of ``export`` and ``rebuild`` (``--report FILE``).

A report says what was exported (model, format, exporter), what was written (files with
sizes), on what (the example inputs and their dynamic axes), how every output compared with
eager PyTorch on every input set (max abs / max rel error against the tolerance), the
verdict, and the warnings. It is built from the same report objects ``--json`` prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelport.torch_models.agreement import OutputCheck
    from modelport.torch_models.export_report import ExportReport
    from modelport.torch_models.rebuilding import RebuildReport


def export_markdown(report: ExportReport, source: str | None = None) -> str:
    """The export report as Markdown; ``source`` says how the model was named."""
    fmt = report.format
    if report.exporter is not None:
        opset = "the exporter's default" if report.opset is None else str(report.opset)
        fmt += f" ({report.exporter} exporter, opset {opset})"
    rows = [("Model", f"`{report.model}`" if report.model else "?")]
    if source:
        rows.append(("Built from", f"`{_cell(source)}`"))
    rows += [
        ("Format", fmt),
        ("Verdict", _verdict(report.verified, report.outputs)),
        ("Largest error", _number(report.max_abs_error) if report.outputs else "-"),
        ("Time", f"{report.seconds:.2f} s"),
    ]
    lines = [f"# modelport export: {report.path.name}", "", *_table(("", ""), rows)]
    sizes: Sequence[int | None] = report.sizes or [_size(f) for f in report.files]
    lines += ["", "## Files", "", *_files(report.files, sizes)]
    if report.inputs:
        lines += ["", "## Inputs", ""]
        lines += _table(
            ("Name", "Shape", "Dtype", "Dynamic axes"),
            [
                (
                    f"`{i.name}`",
                    _shape(i.shape),
                    i.dtype,
                    ", ".join(f"{axis}={dim}" for axis, dim in i.dynamic) or "-",
                )
                for i in report.inputs
            ],
        )
    lines += _checks(report.outputs)
    lines += _warnings(report.warnings)
    return "\n".join(lines) + "\n"


def rebuild_markdown(report: RebuildReport) -> str:
    """The rebuild report as Markdown."""
    if report.mismatched:
        verdict = f"**FAILED**: {len(report.mismatched)} state-dict tensors differ"
    elif report.outputs:
        verdict = _verdict(report.verified, report.outputs)
    else:
        verdict = "**verified**" if report.verified else "**FAILED**"
    rows = [
        ("Model", f"`{_cell(report.model)}`"),
        ("Weights", f"`{report.weights}`"),
        ("Format", report.format),
        ("Verdict", verdict),
        ("Checked", report.method.replace("+", " and ").replace("_", "-")),
        ("Load with", f"`{_cell(report.load_with)}`"),
        ("Requires", _cell(report.requires)),
        ("Time", f"{report.seconds:.2f} s"),
    ]
    lines = [f"# modelport rebuild: {report.path.name}", "", *_table(("", ""), rows)]
    lines += ["", "## Files", "", *_files(report.files, [_size(f) for f in report.files])]
    if report.tensors_compared:
        lines += ["", "## State dict", ""]
        lines.append(
            f"{report.tensors_compared} tensors compared bit for bit with the eager model's; "
            + (
                "all equal."
                if not report.mismatched
                else "these differ: " + ", ".join(f"`{n}`" for n in report.mismatched)
            )
        )
    lines += _checks(report.outputs)
    lines += _warnings(report.warnings)
    return "\n".join(lines) + "\n"


def _verdict(verified: bool | None, checks: Sequence[OutputCheck]) -> str:
    samples = len({c.sample for c in checks})
    if verified is None:
        return "not verified (`--no-verify`)"
    if verified:
        return f"**verified**: every output within tolerance on {samples} input sets"
    failed = sum(not c.ok for c in checks)
    return f"**FAILED**: {failed} of {len(checks)} comparisons outside tolerance"


def _checks(checks: Sequence[OutputCheck]) -> list[str]:
    if not checks:
        return []
    lines = [
        "",
        "## Verification",
        "",
        "Each output of the written model against eager PyTorch on the same inputs; a "
        "comparison passes when |written - eager| <= atol + rtol * |eager| everywhere.",
        "",
    ]
    lines += _table(
        ("Inputs", "Output", "Shape", "Dtype", "Max abs", "Max rel", "atol", "rtol", "Result"),
        [
            (
                c.sample,
                f"`{_cell(c.name)}`",
                _shape(c.shape),
                c.dtype or "-",
                _number(c.max_abs),
                _number(c.max_rel),
                f"{c.atol:g}",
                f"{c.rtol:g}",
                "ok" if c.ok else "**FAIL**",
            )
            for c in checks
        ],
    )
    padded = max(c.padded for c in checks)
    if padded:
        lines += [
            "",
            "Positions the `attention_mask` input marks as padding are not compared (up to "
            f"{padded} per input set): masked rows have no defined value.",
        ]
    return lines


def _warnings(notes: Sequence[str]) -> list[str]:
    if not notes:
        return []
    return ["", "## Warnings", "", *(f"- {note}" for note in notes)]


def _files(files: Sequence[Path], sizes: Sequence[int | None]) -> list[str]:
    return _table(
        ("File", "Size"),
        [
            (f"`{f}`", "missing" if size is None else f"{size:,} bytes")
            for f, size in zip(files, sizes, strict=True)
        ],
    )


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.exists() else None


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _number(value: float) -> str:
    return f"{value:.3g}"


def _cell(text: str) -> str:
    """Text safe inside a table cell: no pipes, no line breaks."""
    return " ".join(text.replace("|", "\\|").split())
