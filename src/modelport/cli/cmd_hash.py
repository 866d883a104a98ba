"""``modelport hash``: a content fingerprint of model weights, the same in every format."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from modelport.cli import _errors
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.comparing.fingerprint import HashReport, fingerprint

EXAMPLES = """examples:
  modelport hash model.safetensors pytorch_model.bin
  modelport hash checkpoint.pt --json

The digest covers tensor names, dtypes, shapes and bytes, in no particular order: the same
weights saved as .bin, .safetensors or .npz, or inside a training checkpoint, hash alike.
It is not the sha256 of the file.

exit codes: 0 every file hashed, 2 a file could not be read
"""


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
    parser.add_argument("paths", nargs="+", metavar="FILE", help="model files or directories")
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
            print(f"{report.digest}  {path}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return ExitCode.ERROR if failed else ExitCode.OK
