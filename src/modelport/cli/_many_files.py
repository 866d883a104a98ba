"""The options ``scan``, ``hash`` and ``inspect`` share for many files (``convert`` takes them
with a manifest of conversions), and the way to the fleet run they describe (``_fleet``, over
``modelport.fleet``).

One path named with none of these options runs as it always has, in this process; several
paths, a folder of files, or any of the options run each file in a worker process, on every
core by default. Output stays in the order the inputs were named either way.

A run of one file imports nothing of the fleet: worker pools, journals and records cost a
one-file command more start-up than its own work takes. ``_fleet`` is imported on a fleet
run's first call here, through ``importlib`` as ``main`` imports a command, since a modelport
import inside a function is not the house style.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from modelport.conversion.options import ConvertOptions
    from modelport.fleet.inputs import Shard
    from modelport.fleet.records import Record
    from modelport.fleet.running import Plan
    from modelport.fleet.summary import Summary
    from modelport.scanning.findings import FileReport

DEFAULT_TIMEOUT: Final = 300.0
DEFAULT_CONVERT_TIMEOUT: Final = 3600.0  # a conversion writes and reads back the whole model
_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)

MANY_FILES = """many files:
  modelport {command} ./models/ --jsonl {command}.jsonl         (every core; rerun to resume)
  find /data -name '*.bin' | modelport {command} --from-file - --jsonl out.jsonl --jobs 8
  modelport {command} --from-file all.txt --shard 2/4 --jsonl part2.jsonl  (machine 2 of 4)
"""


def add_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The positional paths (``what`` says what they may be) and the many-files options."""
    parser.add_argument("paths", nargs="*", metavar="PATH", help=what)
    group = add_options(
        parser,
        "many files",
        "Several paths, a folder of files, or any of these options run each file in a worker "
        "process of its own, with a time and memory budget per file.",
        "also take the paths listed in LIST, one per line ('-': standard input)",
        DEFAULT_TIMEOUT,
    )
    group.add_argument(
        "--dedupe",
        action="store_true",
        help="read each file's sha256 first and judge the same bytes under the same file name "
        "once; the other copies' records say which file they copy (deduplicated_from)",
    )


def add_options(
    parser: argparse.ArgumentParser,
    title: str,
    about: str,
    list_help: str,
    timeout: float,
    list_name: str = "LIST",
) -> argparse._ArgumentGroup:
    """The many-files options every fleet command takes, in a group ``title`` that ``about``
    describes; ``--from-file list_name`` reads what ``list_help`` says; ``timeout`` is the
    default budget."""
    group = parser.add_argument_group(title, about)
    group.add_argument(
        "--from-file", action="append", default=[], metavar=list_name, help=list_help
    )
    group.add_argument(
        "--jsonl",
        metavar="OUT",
        help="append one JSON record per input to OUT as each finishes; a rerun with the same "
        "OUT skips the inputs whose record still matches them",
    )
    group.add_argument(
        "--jobs",
        type=_count,
        metavar="N",
        help="worker processes (default: one per core when there are several files)",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help=f"time budget per input (default {timeout:g}); an input over it is "
        "recorded as 'timeout' and its worker replaced",
    )
    group.add_argument(
        "--max-memory",
        type=_size,
        metavar="SIZE",
        help="address space per worker (RLIMIT_AS, e.g. 2G), the interpreter and the memory "
        "maps of the file included; a file over it is recorded as an error",
    )
    group.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="process only part I of N (1 <= I <= N), chosen by a hash of each path, so that "
        "N machines split one list with no coordinator",
    )
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the inputs on the Dask cluster whose scheduler is at ADDRESS "
        "(tcp://HOST:8786), or on local:N, N Dask worker processes here; needs "
        "pip install 'modelport[dask]'",
    )
    return group


def options_given(args: argparse.Namespace) -> bool:
    """Whether any of the many-files options is given (each makes a run a fleet run)."""
    return any(
        (
            args.from_file,
            args.jsonl,
            args.shard,
            args.jobs,
            args.timeout,
            args.max_memory,
            args.scheduler,
            getattr(args, "dedupe", False),  # convert has none
        )
    )


def plan(args: argparse.Namespace, command: str, options: dict[str, Any]) -> Plan | None:
    """The fleet run ``args`` ask for, or None when they name one path and none of the
    many-files options: that runs in this process, exactly as before. A folder is for
    ``_fleet.plan`` to sort out (a model folder is one path; any other, its files)."""
    paths = args.paths
    if len(paths) == 1 and not options_given(args) and not Path(paths[0]).is_dir():
        return None
    found: Plan | None = _fleet().plan(args, command, options)
    return found


def convert_plan(args: argparse.Namespace, options: ConvertOptions) -> Plan:
    """The fleet run of ``convert --from-file`` (``_fleet_convert``); ``options`` are
    the command line's, which every entry takes unless it sets its own."""
    found: Plan = importlib.import_module("modelport.cli._fleet_convert").convert_plan(
        args, options
    )
    return found


def records(plan: Plan) -> Iterator[Record]:
    """The run's records in input order (``_fleet.records``)."""
    found: Iterator[Record] = _fleet().records(plan)
    return found


def error_json(record: Record) -> dict[str, Any]:
    """A failed file in a command's ``--json`` list (``_fleet.error_json``)."""
    found: dict[str, Any] = _fleet().error_json(record)
    return found


def file_report(record: Record) -> FileReport:
    """A scan record as the report ``scan`` gives that file (``fleet.summary``)."""
    found: FileReport = _fleet().file_report(record)
    return found


def summarize(path: str, command: str) -> Summary:
    """The summary of the records an earlier ``--jsonl`` run wrote (``fleet.summary``)."""
    found: Summary = _fleet().summarize(path, command)
    return found


def _fleet() -> ModuleType:
    return importlib.import_module("modelport.cli._fleet")


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, not {text!r}")
    return value


def _size(text: str) -> int:
    found = _SIZE.match(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 2G, not {text!r}")
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


def _shard(text: str) -> Shard:
    """Read as it is parsed, by ``_fleet``: a run with ``--shard`` is a fleet run anyway."""
    shard: Shard = _fleet().parse_shard(text)
    return shard
