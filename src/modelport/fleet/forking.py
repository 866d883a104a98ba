"""Workers forked from the parent instead of started as fresh interpreters.

A fresh worker spends about 0.13 s of a core before its first file: the interpreter's own
start and the imports the parent made already (the records, dataclasses, typing, the
package). A child forked from the parent has them; it imports only what the parent lacks
(the scanner and its readers), about a third of that. The saving is on every run's critical
path (the first files wait for it) and paid again by each successor and replacement.

Forking is safe here only because the child leaves the parent's world at once and never
returns to it:

- the parent must have one thread (checked in ``/proc``, which counts the threads of C
  libraries too): a lock another thread held would stay locked in the child forever. A
  process with threads (a Dask worker, a test run that loaded OpenMP) starts fresh workers;
- every descriptor the child inherits besides its three pipes is pointed at ``/dev/null``
  (not closed: a Python object of the parent's that still names the number may close it
  later, and must not close a file the child opened since). The journal's lock, the other
  workers' pipes and the parent's output are then held by the parent alone, so a worker
  closing its input still sees the end of it, and a lock goes when the parent lets it go;
- standard streams, Ctrl-C and SIGTERM, the warnings filters and the thread variables are
  set as a fresh worker has them; the parent's objects are frozen out of the child's
  garbage collector (``gc.freeze``), which would otherwise touch, and so copy, every page
  of the parent's heap;
- the child ends with ``os._exit``: the parent's ``finally`` blocks and ``atexit`` handlers
  never run in it.

A run with ``--max-memory`` starts fresh workers: the limit is for a file's reading, and a
forked child would count the parent's heap and libraries against it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Final, NoReturn, cast

# The warnings filters this module found when first imported (in the CLI, the interpreter's
# own, as a fresh worker has them): a caller's ``catch_warnings`` since then is the
# caller's affair, not the worker's.
_STARTING_FILTERS: Final = tuple(warnings.filters)
_LONGEST_WAIT_S: Final = 0.05  # between looks at a child that was asked to leave


def can_fork() -> bool:
    """Whether a worker may be forked from this process now: Linux (where the child can
    ask to die with its parent) and one thread."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    try:
        return len(list(Path("/proc/self/task").iterdir())) == 1
    except OSError:
        return False


class Forked:
    """A forked worker, with what the pool uses of ``subprocess.Popen``."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes], stderr: IO[bytes]):
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.stderr: IO[bytes] | None = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            while self.returncode is None:
                self._reap(0)
            return self.returncode
        deadline, pause = time.monotonic() + timeout, 0.0005
        while (found := self.poll()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(min(pause, left))
            pause = min(pause * 2, _LONGEST_WAIT_S)
        return found

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _reap(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): as Popen, status 0
            self.returncode = 0
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)


def fork_worker(arguments: Sequence[str], thread_variables: Sequence[str]) -> Forked:
    """A worker forked from this process, run as ``python -m modelport.fleet.worker
    ARGUMENTS`` would run; the caller checked ``can_fork``."""
    child_in, parent_in = os.pipe()
    parent_out, child_out = os.pipe()
    parent_err, child_err = os.pipe()
    for stream in (sys.stdout, sys.stderr):  # or the child would hold a copy to write
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    gc.freeze()
    try:
        pid = os.fork()
        if pid == 0:
            _child((child_in, child_out, child_err), arguments, thread_variables)
    except OSError:  # no process to be had: the pool says why, its pipes are not left open
        for descriptor in (child_in, parent_in, parent_out, child_out, parent_err, child_err):
            os.close(descriptor)
        raise
    finally:
        gc.unfreeze()  # reached by the parent alone
    for descriptor in (child_in, child_out, child_err):
        os.close(descriptor)
    return Forked(
        pid, os.fdopen(parent_in, "wb"), os.fdopen(parent_out, "rb"), os.fdopen(parent_err, "rb")
    )


def _child(
    pipes: tuple[int, int, int], arguments: Sequence[str], thread_variables: Sequence[str]
) -> NoReturn:
    """The forked worker: its own streams, signals and warnings, then the worker's loop."""
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        moved = [fcntl.fcntl(pipe, fcntl.F_DUPFD, 3) for pipe in pipes]  # none is 0 to 2 now
        for target, descriptor in enumerate(moved):
            os.dup2(descriptor, target)
        _forget_descriptors()
        sys.stdin = os.fdopen(0, encoding="utf-8", closefd=False)
        sys.stdout = os.fdopen(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = os.fdopen(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        warnings.resetwarnings()  # marks every module's record of warnings said as stale
        cast("list[Any]", warnings.filters)[:] = _STARTING_FILTERS
        for name in thread_variables:
            os.environ.setdefault(name, "1")
        worker = importlib.import_module("modelport.fleet.worker")
        status = worker.main(list(arguments))
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(status)


def _forget_descriptors() -> None:
    """Point every descriptor above the standard three at ``/dev/null``."""
    null = os.open(os.devnull, os.O_RDWR)
    for entry in list(Path("/proc/self/fd").iterdir()):
        descriptor = int(entry.name)
        if descriptor > 2 and descriptor != null:  # the listing's own is closed: no matter
            os.dup2(null, descriptor, inheritable=False)
    if null > 2:
        os.close(null)
