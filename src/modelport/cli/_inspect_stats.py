"""``modelport inspect --stats``: the per-tensor statistics of ``modelport.stats`` beside what
``inspect`` reads, as a table for people and as the ``"stats"`` member of ``--json``.

Statistics read every tensor's bytes, which plain ``inspect`` never does; so they are asked
for by name, for one local file at a time (``report`` shows them for a file, with
histograms you can sort and filter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import modelport
from modelport.errors import UsageError
from modelport.transfer.remote import is_url

if TYPE_CHECKING:
    from rich.console import Console

    from modelport.measuring.stats_records import StatsReport, TensorStats

MAX_ROWS: Final = 10_000  # rows laid out in the table; --json lists every tensor
MAX_FLAG_NAMES: Final = 8  # names shown under one flag
BARS: Final = " ▁▂▃▄▅▆▇█"  # a histogram bar's height, from none to the tallest
SPARK_WIDTH: Final = 16  # characters of a row's histogram


def refuse(paths: list[str], *, several: bool) -> None:
    """``--stats`` reads every value of one local file: say so before anything is read."""
    if several or len(paths) != 1:
        raise UsageError(
            "--stats reads every tensor of one file; give one file (modelport report shows "
            "the statistics of a file as a page, or two side by side)"
        )
    if is_url(paths[0]):
        raise UsageError("--stats reads every byte of the file; download it, then inspect it")


def measure(path: str) -> StatsReport:
    return modelport.stats(path)


def to_json(report: StatsReport) -> dict[str, Any]:
    """The statistics as ``inspect --json`` carries them, under ``"stats"``."""
    return report.to_json()


def show(console: Console, report: StatsReport) -> None:
    """The statistics as a table, the flags below it; every cell is plain text, so a name
    that looks like rich markup prints as itself."""
    from rich.table import Table  # the people path only: --json goes without rich
    from rich.text import Text  # names from the file are text, never markup

    table = Table(
        "name",
        "dtype",
        "histogram",
        "min",
        "max",
        "mean",
        "std",
        "NaN",
        "Inf",
        "zeros",
        "subnormal",
        ">fp16",
        ">bf16",
        "flags",
        title=f"statistics ({report.seconds:.2f} s on {report.threads} threads)",
        title_justify="left",
    )
    for column in table.columns[3:13]:
        column.justify = "right"
    for item in report.tensors[:MAX_ROWS]:
        table.add_row(*(Text(cell) for cell in _cells(item)))
    console.print(table)
    hidden = len(report.tensors) - MAX_ROWS
    if hidden > 0:
        console.print(f"[dim]… {hidden:,} more tensors (--json lists every one)[/dim]")
    for flag in report.flags:
        names = ", ".join(flag.names[:MAX_FLAG_NAMES])
        more = len(flag.names) - MAX_FLAG_NAMES
        names += f" and {more:,} more" if more > 0 else ""
        console.print(
            f"flag {flag.kind}: {flag.message}: {names}",
            style="yellow",
            markup=False,
            highlight=False,
        )
    if not report.flags:
        console.print("[dim]nothing flagged[/dim]")


def _cells(item: TensorStats) -> list[str]:
    if not item.computed:
        return [item.name, item.dtype, "", *(["-"] * 10), item.note]
    numbers = [number(v) for v in (item.min, item.max, item.mean, item.std)]
    counts = [
        f"{n:,}"
        for n in (
            item.nan,
            item.inf,
            item.zeros,
            item.subnormal,
            item.over_float16,
            item.over_bfloat16,
        )
    ]
    said = ", ".join(item.flags)
    if item.note:
        said = f"{said}; {item.note}" if said else item.note
    return [item.name, item.dtype, sparkline(item), *numbers, *counts, said]


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def sparkline(item: TensorStats) -> str:
    """Negative magnitudes (largest leftmost), zeros, positive magnitudes (largest
    rightmost), a character per power of two, the tallest bar full; the widest tensors
    keep their largest magnitudes, as those are what overflow."""
    histogram = item.histogram
    if histogram is None:
        return BARS[-1] if item.zeros else ""
    side = SPARK_WIDTH // 2
    negative = list(reversed(histogram.negative))[:side]
    positive = list(histogram.positive)[-side:]
    counts = [*negative, item.zeros, *positive]
    tallest = max(counts) or 1
    steps = len(BARS) - 1
    return "".join(BARS[0 if n == 0 else max(1, round(n / tallest * steps))] for n in counts)
