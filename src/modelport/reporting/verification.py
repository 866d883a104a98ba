"""What ``export`` and ``rebuild`` did and how their output was checked, as the one set of
facts both of their reports show: ``--report FILE`` renders them as Markdown
(``cli.markdown``), ``--report FILE.html`` as a section of the ``modelport report`` page
(``html_verification``), which also carries the command's own JSON report for tools.

The facts are a small document: a summary table, then parts made of tables, paragraphs,
lists and code, their text made of spans (plain, code, strong; a number keeps its exact
value beside the rounded text). The wording lives here once; a renderer only decides how a
span, a table or a code block looks, so the two reports cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from modelport.torch_models.agreement import OutputCheck
    from modelport.torch_models.export_report import ExportReport
    from modelport.torch_models.rebuilding import RebuildReport

CHECKS_TABLE: Final = "checks"  # the name of the per-output comparison table
CHECK_COLUMNS: Final = (
    "Inputs",
    "Output",
    "Shape",
    "Dtype",
    "Max abs",
    "Max rel",
    "atol",
    "rtol",
    "Result",
)
CHECK_RULE: Final = (
    "Each output of the written model against eager PyTorch on the same inputs; a comparison "
    "passes when |written - eager| <= atol + rtol * |eager| everywhere."
)


@dataclass(frozen=True)
class Span:
    """A run of text: plain, ``code`` or ``strong``; ``value`` is a number's exact value
    (``text`` holds it rounded)."""

    text: str
    style: Literal["", "code", "strong"] = ""
    value: float | None = None


Inline = tuple[Span, ...]


@dataclass(frozen=True)
class Table:
    """Rows of inline cells under a header; ``name`` lets a page and its tests find it."""

    header: tuple[str, ...]
    rows: tuple[tuple[Inline, ...], ...]
    name: str = ""


@dataclass(frozen=True)
class Paragraph:
    spans: Inline


@dataclass(frozen=True)
class Bullets:
    items: tuple[Inline, ...]


@dataclass(frozen=True)
class Code:
    """A block of code shown as written (the recipe)."""

    language: str
    text: str


Block = Table | Paragraph | Bullets | Code


@dataclass(frozen=True)
class Part:
    title: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Verification:
    """One command's report: ``summary`` rows (label, value), then ``parts``; ``data`` is the
    command's JSON report (``ExportReport.to_json``), ``recipe`` the Python that makes the
    output again (the command line, when there was one)."""

    command: Literal["export", "rebuild"]
    output: str  # the written file's name
    summary: tuple[tuple[str, Inline], ...]
    parts: tuple[Part, ...]
    data: dict[str, Any]
    recipe: str | None = None

    @property
    def title(self) -> str:
        return f"modelport {self.command}: {self.output}"

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "report": self.data, "recipe": self.recipe}


def plain(text: str) -> Inline:
    return (Span(text),)


def code(text: str) -> Inline:
    return (Span(text, "code"),)


def export_facts(
    report: ExportReport, source: str | None = None, recipe: str | None = None
) -> Verification:
    """An export's facts; ``source`` says how the model was named."""
    fmt = report.format
    if report.exporter is not None:
        opset = "the exporter's default" if report.opset is None else str(report.opset)
        fmt += f" ({report.exporter} exporter, opset {opset})"
    rows = [("Model", code(report.model) if report.model else plain("?"))]
    if source:
        rows.append(("Built from", code(source)))
    rows += [("Format", plain(fmt)), ("Verdict", _verdict(report.verified, report.outputs))]
    if report.runtime:
        rows.append(("Verified in", plain(report.runtime)))
    largest = _number(report.max_abs_error) if report.outputs else plain("-")
    rows += [("Largest error", largest), ("Time", plain(f"{report.seconds:.2f} s"))]
    sizes: Sequence[int | None] = report.sizes or [_size(f) for f in report.files]
    parts = [_files(report.files, sizes)]
    if report.inputs:
        inputs = tuple(
            (
                code(i.name),
                plain(_shape(i.shape)),
                plain(i.dtype),
                plain(", ".join(f"{axis}={dim}" for axis, dim in i.dynamic) or "-"),
            )
            for i in report.inputs
        )
        header = ("Name", "Shape", "Dtype", "Dynamic axes")
        parts.append(Part("Inputs", (Table(header, inputs, "inputs"),)))
    parts += _checks(report.outputs) + _recipe(recipe) + _warnings(report.warnings)
    return Verification(
        "export", report.path.name, tuple(rows), tuple(parts), report.to_json(), recipe
    )


def rebuild_facts(report: RebuildReport, recipe: str | None = None) -> Verification:
    """A rebuild's facts."""
    if report.mismatched:
        said = _failed(f"{len(report.mismatched)} state-dict tensors differ")
    elif report.outputs:
        said = _verdict(report.verified, report.outputs)
    else:
        said = (Span("verified" if report.verified else "FAILED", "strong"),)
    rows = [
        ("Model", code(report.model)),
        ("Weights", code(str(report.weights))),
        ("Format", plain(report.format)),
        ("Verdict", said),
        ("Checked", plain(report.method.replace("+", " and ").replace("_", "-"))),
        ("Load with", code(report.load_with)),
        ("Requires", plain(report.requires)),
        ("Time", plain(f"{report.seconds:.2f} s")),
    ]
    parts = [_files(report.files, [_size(f) for f in report.files])]
    if report.tensors_compared:
        said_of = f"{report.tensors_compared} tensors compared bit for bit with the eager model's; "
        if report.mismatched:
            differ = [Span("these differ: ")]
            for index, name in enumerate(report.mismatched):
                differ += [*([Span(", ")] if index else []), Span(name, "code")]
            spans: Inline = (Span(said_of), *differ)
        else:
            spans = plain(said_of + "all equal.")
        parts.append(Part("State dict", (Paragraph(spans),)))
    parts += _checks(report.outputs) + _recipe(recipe) + _warnings(report.warnings)
    return Verification(
        "rebuild", report.path.name, tuple(rows), tuple(parts), report.to_json(), recipe
    )


def _verdict(verified: bool | None, checks: Sequence[OutputCheck]) -> Inline:
    if verified is None:
        return (Span("not verified ("), Span("--no-verify", "code"), Span(")"))
    if verified:
        samples = len({c.sample for c in checks})
        return (
            Span("verified", "strong"),
            Span(f": every output within tolerance on {samples} input sets"),
        )
    failed = sum(not c.ok for c in checks)
    return _failed(f"{failed} of {len(checks)} comparisons outside tolerance")


def _failed(why: str) -> Inline:
    return (Span("FAILED", "strong"), Span(f": {why}"))


def _checks(checks: Sequence[OutputCheck]) -> list[Part]:
    if not checks:
        return []
    rows = tuple(
        (
            plain(c.sample),
            code(c.name),
            plain(_shape(c.shape)),
            plain(c.dtype or "-"),
            _number(c.max_abs),
            _number(c.max_rel),
            _number(c.atol, "g"),
            _number(c.rtol, "g"),
            plain("ok") if c.ok else (Span("FAIL", "strong"),),
        )
        for c in checks
    )
    table = Table(CHECK_COLUMNS, rows, CHECKS_TABLE)
    blocks: list[Block] = [Paragraph(plain(CHECK_RULE)), table]
    padded = max(c.padded for c in checks)
    if padded:
        blocks.append(
            Paragraph(
                (
                    Span("Positions the "),
                    Span("attention_mask", "code"),
                    Span(
                        " input marks as padding are not compared (up to "
                        f"{padded} per input set): masked rows have no defined value."
                    ),
                )
            )
        )
    return [Part("Verification", tuple(blocks))]


def _recipe(recipe: str | None) -> list[Part]:
    if recipe is None:
        return []
    said = plain(
        "Python that makes the output again (its first line: the same command for a shell):"
    )
    return [Part("Recipe", (Paragraph(said), Code("python", recipe)))]


def _warnings(notes: Sequence[str]) -> list[Part]:
    if not notes:
        return []
    return [Part("Warnings", (Bullets(tuple(plain(note) for note in notes)),))]


def _files(files: Sequence[Path], sizes: Sequence[int | None]) -> Part:
    rows = tuple(
        (code(str(f)), plain("missing" if size is None else f"{size:,} bytes"))
        for f, size in zip(files, sizes, strict=True)
    )
    return Part("Files", (Table(("File", "Size"), rows, "files"),))


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.exists() else None


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _number(value: float, spec: str = ".3g") -> Inline:
    return (Span(format(value, spec), value=value),)
