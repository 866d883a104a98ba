"""The options ``scan``, ``hash`` and ``inspect`` share for many files, and the fleet run they
describe (``modelport.fleet``).

One path named with none of these options runs as it always has, in this process; several
paths, a folder of files, or any of the options run each file in a worker process, on every
core by default. Output stays in the order the inputs were named either way.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from modelport.errors import UsageError
from modelport.fleet.inputs import Input, Shard, expand, read_list
from modelport.fleet.records import Budget, Record
from modelport.fleet.running import Plan, Tally, run

DEFAULT_TIMEOUT: Final = 300.0
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
    group = parser.add_argument_group(
        "many files",
        "Several paths, a folder of files, or any of these options run each file in a worker "
        "process of its own, with a time and memory budget per file.",
    )
    group.add_argument(
        "--from-file",
        action="append",
        default=[],
        metavar="LIST",
        help="also take the paths listed in LIST, one per line ('-': standard input)",
    )
    group.add_argument(
        "--jsonl",
        metavar="OUT",
        help="append one JSON record per file to OUT as each finishes; a rerun with the same "
        "OUT skips the files whose record still matches them",
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
        help=f"time budget per file (default {DEFAULT_TIMEOUT:g}); a file over it is "
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


def plan(args: argparse.Namespace, command: str, options: dict[str, Any]) -> Plan | None:
    """The fleet run ``args`` ask for, or None when they name one path and none of the
    many-files options: that runs in this process, exactly as before."""
    named = list(args.paths)
    for source in args.from_file:
        named.extend(read_list(source))
    if not named and not args.from_file:
        raise UsageError(f"name at least one path to {command}, or a list with --from-file")
    options_given = (
        args.from_file,
        args.jsonl,
        args.shard,
        args.jobs,
        args.timeout,
        args.max_memory,
    )
    inputs = _without(expand(command, named, args.shard), args.jsonl)
    if not any(options_given) and len(named) == 1 and inputs == [Input(named[0], 0)]:
        return None
    jobs = args.jobs or (_cores() if len(inputs) > 1 else 1)
    budget = Budget(args.timeout or DEFAULT_TIMEOUT, args.max_memory)
    return Plan(command, tuple(inputs), budget, options, jobs, args.jsonl)


def records(plan: Plan) -> Iterator[Record]:
    """The run's records in input order, each record's warnings said on stderr as it comes;
    with ``--jsonl``, a closing line on stderr says what was resumed."""
    tally = Tally()
    for record in run(plan, tally):
        for warning in record.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        yield record
    if plan.jsonl:
        repaired = f"; cut a partial last line ({tally.cut_bytes} bytes)" if tally.cut_bytes else ""
        print(
            f"{len(plan.inputs)} inputs: {tally.processed} processed now, {tally.reused} "
            f"already recorded in {plan.jsonl}{repaired}",
            file=sys.stderr,
        )


def error_json(record: Record) -> dict[str, Any]:
    """A failed file in a command's ``--json`` list, as the command words its errors."""
    error = record.error
    kind, message = (error.type, error.message) if error else ("Error", "no result")
    return {"path": record.path, "error": {"type": kind, "message": message}}


def _without(inputs: list[Input], output: str | None) -> list[Input]:
    """The inputs less the run's own JSONL output, when a folder it sits in was named."""
    if not output or not Path(output).exists():
        return inputs
    name = Path(output).name
    return [i for i in inputs if Path(i.path).name != name or not _same(i.path, output)]


def _same(path: str, other: str) -> bool:
    try:
        return Path(path).samefile(other)
    except OSError:
        return False


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    try:
        return Shard.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
