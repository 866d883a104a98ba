"""``modelport``: the entry point. Wires subcommands and turns errors into exit codes.

Exit codes (stable, documented in README):
    0  success
    1  the command ran and the answer is "no" (a scan found something, verification failed)
    2  error: bad input, unreadable file, missing dependency, bad usage
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence

from modelport._version import __version__
from modelport.cli import (
    _errors,
    cmd_check,
    cmd_convert,
    cmd_diff,
    cmd_export,
    cmd_hash,
    cmd_inspect,
    cmd_rebuild,
    cmd_scan,
)
from modelport.errors import ModelportError, VerificationError

EXIT_OK = 0
EXIT_NO = 1
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelport",
        description="Inspect, scan and convert model files by content, without executing them.",
    )
    parser.add_argument("--version", action="version", version=f"modelport {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd_inspect.register(commands)
    cmd_scan.register(commands)
    cmd_convert.register(commands)
    cmd_diff.register(commands)
    cmd_hash.register(commands)
    cmd_check.register(commands)
    cmd_export.register(commands)
    cmd_rebuild.register(commands)
    return parser


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # library warnings, said plainly on stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except BrokenPipeError:  # output piped into `head` and friends: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("MODELPORT_DEBUG"):
            raise
        message = _errors.describe(exc) or (
            f"internal error ({type(exc).__name__}: {exc}); please report it with the file's "
            "first bytes"
        )
        if getattr(args, "json", False):
            print(json.dumps({"error": {"type": type(exc).__name__, "message": message}}))
        else:
            print(f"error: {message}", file=sys.stderr)
            if not isinstance(exc, ModelportError) or exc.__cause__ is not None:
                # a refusal says all there is; a failure underneath has more to show
                print("(set MODELPORT_DEBUG=1 for the full traceback)", file=sys.stderr)
        return EXIT_NO if isinstance(exc, VerificationError) else EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
