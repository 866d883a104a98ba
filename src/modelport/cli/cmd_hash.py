"""``modelport hash``: a content fingerprint of model weights, the same in every format."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from modelport.cli import _errors, _many_files
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.comparing.fingerprint import HashReport, fingerprint

if TYPE_CHECKING:
    from modelport.fleet.running import Plan

EXAMPLES = (
    """examples:
  modelport hash model.safetensors pytorch_model.bin
  modelport hash checkpoint.pt --json

The digest covers tensor names, dtypes, shapes and bytes, in no particular order: the same
weights saved as .bin, .safetensors or .npz, or inside a training checkpoint, hash alike.
It is not the sha256 of the file.

"""
    + _many_files.MANY_FILES.format(command="hash")
    + """
exit codes: 0 every file hashed, 2 a file could not be read
"""
)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "hash",
        help=COMMANDS["hash"].help,
        description="Print a content fingerprint of each file's model weights, one "
        "'<digest>  <path>' line per file like sha256sum. Tensor data is streamed in "
        "bounded memory; nothing in the files is executed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _many_files.add_arguments(
        parser, "model files or directories (a folder that is no model: its models)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list, with per-tensor digests"
    )
    parser.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="hash files the scanner calls unsafe (still executes nothing)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = _many_files.plan(args, "hash", {"allow_unsafe": args.allow_unsafe})
    if plan is not None:
        return _run_fleet(args, plan)
    results: list[dict[str, Any]] = []
    failed = False
    for path in args.paths:
        try:
            report: HashReport = fingerprint(path, allow_unsafe=args.allow_unsafe)
        except Exception as exc:
            message = _errors.describe(exc)
            if message is None:
                raise
            failed = True
            if args.json:
                results.append(
                    {"path": path, "error": {"type": type(exc).__name__, "message": message}}
                )
            else:
                print(f"error: {message}", file=sys.stderr)
            continue
        if args.json:
            results.append(report.to_json())
        else:
            print(f"{report.digest}  {report.path}", flush=True)
            if report.bytes_fetched is not None:  # stderr: stdout stays sha256sum's layout
                print(f"{report.path}: fetched {report.bytes_fetched:,} bytes", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return ExitCode.ERROR if failed else ExitCode.OK


def _run_fleet(args: argparse.Namespace, plan: Plan) -> int:
    """Hash in workers: the same lines and JSON as one by one, in the order named."""
    results: list[dict[str, Any]] = []
    failed = False
    for record in _many_files.records(plan):
        if record.status != "ok":
            failed = True
            failure = _many_files.error_json(record)
            if args.json:
                results.append(failure)
            else:
                print(f"error: {failure['error']['message']}", file=sys.stderr)
        elif args.json:
            results.append(record.result)
        else:
            print(f"{record.result['digest']}  {record.path}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return ExitCode.ERROR if failed else ExitCode.OK
