"""``modelport``: the entry point. Parses argv, then imports only the command it names, and
turns errors into the exit codes of ``commands.ExitCode`` (documented in README)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

from modelport._version import __version__
from modelport.cli import _errors
from modelport.cli.commands import COMMANDS, ExitCode
from modelport.errors import ModelportError, VerificationError


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full arguments of ``chosen`` and a stub carrying the help line
    for every other command, so that ``--help`` lists them all and imports none."""
    parser = argparse.ArgumentParser(
        prog="modelport",
        description="Inspect, scan and convert model files by content, without executing them.",
    )
    parser.add_argument("--version", action="version", version=f"modelport {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        if name == chosen:
            importlib.import_module(command.module).register(commands)
        else:
            commands.add_parser(name, help=command.help)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The command argv names: the first argument that is not an option (the top-level
    parser has no option taking a value)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    return f"warning: {message}\n"


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that it unwinds as Ctrl-C does: every
    ``finally`` removes what it was writing, and nothing half-written stays behind."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    caller_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # library warnings, said plainly on stderr
    in_main_thread = threading.current_thread() is threading.main_thread()
    caller_sigterm = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        args = build_parser(_chosen_command(arguments)).parse_args(arguments)
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except _Terminated:
        print("terminated", file=sys.stderr)
        return ExitCode.TERMINATED
    finally:  # later code in this process keeps its own warning format and SIGTERM handling
        warnings.formatwarning = caller_format
        if in_main_thread:
            signal.signal(signal.SIGTERM, caller_sigterm)


def _run(args: argparse.Namespace) -> int:
    try:
        code: int = args.run(args)
        return code
    except BrokenPipeError:  # output piped into `head` and friends: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK
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
        return ExitCode.NO if isinstance(exc, VerificationError) else ExitCode.ERROR


if __name__ == "__main__":
    raise SystemExit(main())
