"""``modelport diff``: do two model files hold the same weights, and where do they differ?"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from modelport.cli._output import WIDE_HELP, people_console
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.comparing.diffing import DiffReport, diff

EXAMPLES = """examples:
  modelport diff model.bin model.safetensors
  modelport diff before.pt after.pt --atol 1e-5 --rtol 1e-3
  modelport diff ddp_checkpoint.pt model.safetensors --strip-prefix auto
  modelport diff a.pt b.pt --json

exit codes: 0 same, 1 different, 2 error
"""

TOP = 20


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "diff",
        help=COMMANDS["diff"].help,
        description="Pair the tensors of A and B by name and compare dtypes, shapes and "
        "values (max abs/rel difference, cosine, bit equality), streaming both in bounded "
        "memory. Checkpoints are compared by their model weights. B is the reference for "
        "relative differences and tolerances: |a - b| <= atol + rtol * |b|.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("a", help="first model file or directory")
    parser.add_argument("b", help="second model file or directory (the reference)")
    parser.add_argument("--atol", type=_tolerance, default=0.0, help="absolute tolerance")
    parser.add_argument("--rtol", type=_tolerance, default=0.0, help="relative tolerance")
    parser.add_argument(
        "--strip-prefix",
        metavar="auto|PREFIX",
        default=None,
        help="ignore a name prefix: 'auto' strips module./_orig_mod./model. when one side "
        "carries it on every name; any other value is stripped wherever it starts a name",
    )
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--wide", action="store_true", help=WIDE_HELP)
    parser.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="compare files the scanner calls unsafe (still executes nothing)",
    )
    parser.set_defaults(run=run)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    report = diff(
        args.a,
        args.b,
        atol=args.atol,
        rtol=args.rtol,
        strip_prefix=args.strip_prefix,
        allow_unsafe=args.allow_unsafe,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        show(people_console(wide=args.wide), report)
    return ExitCode.OK if report.same else ExitCode.NO


def show(console: Console, report: DiffReport) -> None:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("A", f"{report.a} ({report.format_a})")
    summary.add_row("B", f"{report.b} ({report.format_b})")
    if not report.exact:
        summary.add_row("tolerance", f"atol {report.atol:g}, rtol {report.rtol:g}")
    counts = report.to_json()["counts"]
    summary.add_row("common", f"{counts['common']:,}")
    summary.add_row("only in A", f"{counts['only_in_a']:,}")
    summary.add_row("only in B", f"{counts['only_in_b']:,}")
    summary.add_row("dtype/shape changed", f"{counts['changed']:,}")
    summary.add_row("values differ", f"{counts['differing']:,}")
    console.print(summary, highlight=False)
    for note in report.notes:
        console.print(f"[dim]note: {note}[/dim]", highlight=False)
    _names(console, "only in A", report.only_in_a)
    _names(console, "only in B", report.only_in_b)
    if report.changed:
        table = Table("name", "A", "B", title="dtype/shape changed", title_justify="left")
        for change in report.changed[:TOP]:
            table.add_row(
                change.name,
                f"{change.dtype_a} {list(change.shape_a)}",
                f"{change.dtype_b} {list(change.shape_b)}",
            )
        console.print(table)
        _more(console, len(report.changed))
    differing = report.differing
    if differing:
        table = Table(
            "name",
            "dtype",
            "shape",
            "max abs",
            "max rel",
            "cosine",
            "mismatched",
            title="differing values (largest max abs first)",
            title_justify="left",
        )
        for item in differing[:TOP]:
            dtype = (
                item.dtype_a if item.dtype_a == item.dtype_b else f"{item.dtype_a}/{item.dtype_b}"
            )
            table.add_row(
                item.name,
                dtype,
                str(list(item.shape)),
                _number(item.max_abs),
                _number(item.max_rel),
                _number(item.cosine, "{:.6f}"),
                f"{item.mismatched:,}",
            )
        console.print(table)
        _more(console, len(differing))
    if report.same:
        how = "bit-identical" if report.exact else "within tolerance"
        console.print(f"[green]same[/green]: every tensor {how}")
    else:
        console.print("[red]different[/red]")


def _names(console: Console, title: str, names: tuple[str, ...]) -> None:
    if not names:
        return
    console.print(f"[bold]{title}[/bold]", highlight=False)
    for name in names[:TOP]:
        console.print(f"  {name}", highlight=False, markup=False)
    _more(console, len(names))


def _more(console: Console, count: int) -> None:
    if count > TOP:
        console.print(f"  [dim]... and {count - TOP:,} more (see --json)[/dim]")


def _number(value: float | None, spec: str = "{:.3g}") -> str:
    return "-" if value is None else spec.format(value)
