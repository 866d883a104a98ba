"""A worker process: ``python -m modelport.fleet.worker``, started and fed by ``pool`` (or
forked from the parent by ``forking``, which calls ``main`` with the same arguments).

The protocol is JSON Lines over the worker's standard streams, one message a line:

- the worker says ``{"ready": PID}`` once it has imported what the tasks of its
  ``--commands`` need (so that start-up never counts against a file's time budget; a task
  of another command imports its own modules) and set its memory limit;
- the parent sends tasks, ``{"command", "path", "options"}``, about ``pool.AHEAD_S`` of
  the worker's time ahead of the answers (at most ``pool.FAST_DEPTH``; ``pool.QUEUE_DEPTH``
  until its files prove quick), several in one write; the answers,
  ``{"outcome": Outcome.to_json()}``, come in the same order: the worker reads one file at a
  time, so a worker that dies was reading the first task not yet answered, and the ones
  after it were never begun;
- the worker stops when its standard input closes, after ``--max-tasks`` files (a fresh
  process then starts with a fresh heap), and after a ``MemoryError``, once it has answered
  for the file that raised it with ``"last": true`` (the tasks queued behind it are unread).

The protocol has its own copy of the standard output descriptor; descriptor 1 is pointed at
standard error, so nothing a library prints can break a message. ``--max-memory`` becomes
``RLIMIT_AS``: the address space the whole process may map, the interpreter, its libraries
and the memory maps of the files read included. The worker ignores Ctrl-C (the parent
stops it) and, on Linux, is killed when the parent dies, so no worker outlives its run.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from modelport.fleet.records import Failure, Identity, Outcome
from modelport.fleet.tasks import perform, preload

MEMORY_EXIT = 3  # the exit status after a MemoryError (the answer was sent first)
_PR_SET_PDEATHSIG = 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelport.fleet.worker")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--max-memory", type=int, default=None)
    parser.add_argument("--max-tasks", type=int, default=10_000)
    parser.add_argument("--commands", default="scan,hash,inspect", help="comma-separated")
    args = parser.parse_args(argv)
    preload(args.commands.split(","))
    protocol = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _bound_to_parent(args.parent):
        return 0  # the parent is gone already: nobody would read an answer
    if args.max_memory:
        # numpy, which many readers import, is mapped before the limit so that the limit
        # is checked against it and a file never finds the library no longer fits; with
        # no limit, the first file that needs numpy imports it (a scan of pickles, torch
        # zips, safetensors or npz never does): two thirds of a worker's start-up
        importlib.import_module("numpy")
        mapped = _mapped_bytes()
        if args.max_memory <= mapped:
            sys.stderr.write(f"it maps {mapped:,} bytes once started\n")
            return 2
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = args.max_memory if hard == resource.RLIM_INFINITY else min(args.max_memory, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    _send(protocol, {"ready": os.getpid()})
    for done, line in enumerate(sys.stdin, start=1):
        task = json.loads(line)
        try:
            outcome = perform(task["command"], task["path"], task["options"])
        except MemoryError:
            spent = _out_of_memory(task["path"], args.max_memory)
            _send(protocol, {"outcome": spent, "last": True})  # the rest of stdin is unread
            return MEMORY_EXIT
        _send(protocol, {"outcome": outcome.to_json()})
        if done >= args.max_tasks:
            break
    return 0


def _leave(status: int) -> None:
    """Exit without the interpreter's teardown (a tenth of a second with numpy loaded, paid
    at the end of every run): every answer is flushed already and nothing else is held."""
    sys.stderr.flush()
    os._exit(status)


def _send(protocol: IO[str], message: dict[str, Any]) -> None:
    protocol.write(json.dumps(message) + "\n")
    protocol.flush()


def _out_of_memory(path: str, limit: int | None) -> dict[str, Any]:
    budget = f"the worker's --max-memory of {limit:,} bytes" if limit else "the machine's memory"
    failure = Failure("MemoryError", f"{path}: reading it needs more than {budget}")
    return Outcome(Identity.of(path), error=failure).to_json()


def _mapped_bytes() -> int:
    """The address space this process maps now (0 where /proc does not say)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * resource.getpagesize()


def _bound_to_parent(parent: int) -> bool:
    """Ask Linux to kill this process when the parent dies; False if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent


if __name__ == "__main__":
    _leave(main())
