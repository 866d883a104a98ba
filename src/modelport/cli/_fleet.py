"""The fleet run the many-files options describe (``_many_files``), over
``modelport.fleet``: imported only by a run that has one, through ``_many_files``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelport.cli._many_files import DEFAULT_TIMEOUT, options_given
from modelport.errors import UsageError
from modelport.fleet.inputs import Input, Shard, expand, read_list
from modelport.fleet.pool import discard_early, prestart
from modelport.fleet.records import Budget, Record
from modelport.fleet.running import Plan, Tally, run
from modelport.fleet.summary import file_report as file_report
from modelport.fleet.summary import summarize as summarize


def plan(args: argparse.Namespace, command: str, options: dict[str, Any]) -> Plan | None:
    """The fleet run ``args`` ask for, or None when they name one path and none of the
    many-files options: that runs in this process, exactly as before."""
    named = list(args.paths)
    for source in args.from_file:
        named.extend(read_list(source))
    if not named and not args.from_file:
        raise UsageError(f"name at least one path to {command}, or a list with --from-file")
    budget = Budget(args.timeout or DEFAULT_TIMEOUT, args.max_memory)
    if args.scheduler is None and not (args.jsonl and Path(args.jsonl).exists()):
        prestart(_likely_jobs(args, command, named), budget, command)  # a resume may need none
    try:
        inputs = _without(expand(command, named, args.shard), args.jsonl)
    except BaseException:
        discard_early()
        raise
    if not options_given(args) and len(named) == 1 and inputs == [Input(named[0], 0)]:
        discard_early()
        return None
    jobs = args.jobs or (cores() if len(inputs) > 1 else 1)
    return Plan(
        command, tuple(inputs), budget, options, jobs, args.jsonl, args.scheduler, args.dedupe
    )


def records(plan: Plan) -> Iterator[Record]:
    """The run's records in input order, each record's warnings said on stderr as it comes;
    with ``--jsonl``, a closing line on stderr says what was resumed."""
    tally = Tally()
    try:
        for record in run(plan, tally):
            for warning in record.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            yield record
    finally:
        discard_early()  # the run failed before its pool took them (a locked output)
    if plan.jsonl:
        notes = f"; cut a partial last line ({tally.cut_bytes} bytes)" if tally.cut_bytes else ""
        if tally.deduplicated:
            notes += f"; {tally.deduplicated} copied from files with the same bytes"
        print(
            f"{len(plan.inputs)} inputs: {tally.processed} processed now, {tally.reused} "
            f"already recorded in {plan.jsonl}{notes}",
            file=sys.stderr,
        )


def _likely_jobs(args: argparse.Namespace, command: str, named: list[str]) -> int:
    """The workers a run will want, guessed before its folders are walked: ``--jobs``, else
    a worker a core, but no more than the paths named when none is a folder a scan walks
    (one that ``hash`` or ``inspect`` is named may be one model, read in this process)."""
    if args.jobs:
        return int(args.jobs)
    if command == "scan" and any(Path(path).is_dir() for path in named):
        return cores()
    return min(cores(), len(named)) if len(named) > 1 else 0


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


def cores() -> int:
    """The CPUs this process may use: ``--jobs`` when it is not given."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_shard(text: str) -> Shard:
    """``--shard``, read as argparse reads the other options (``_many_files``)."""
    try:
        return Shard.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
