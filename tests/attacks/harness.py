"""Does a file's natural loader reach the payload? The loader runs in a child process whose
audit hook blocks (and records) every way a payload acts.

Each file is loaded in a child of its own, forked from a server process that has already run
the loader's leading imports (``import torch``): a fresh child per file keeps one payload's
leftovers away from the next file, and the fork spares each file the seconds its loader's
library takes to import. The hook is installed in the child before the loader snippet runs,
so it sees everything the loader does with the file; it raises ``PayloadBlocked`` at each
payload action, so nothing the payload asks for happens (a loader that swallows the exception
still leaves the event recorded). It records, one line per event, to a side file (never
stdout, which a library may write to):

- starting anything: ``os.system``, ``os.exec``, ``os.posix_spawn``, ``os.spawn``,
  ``subprocess.Popen``, ``socket.connect``, and ``ctypes.dlopen`` of a library from outside
  this Python installation;
- touching the marker: ``open`` (any mode), ``os.remove``, ``os.rename`` and the other
  ``os`` path events, and every ``shutil.*`` event, on the marker or a path under it;
- ``object.__setattr__`` of an attribute named in ``patches``: the event fires for the
  attributes of functions and classes that change how later code runs (``__kwdefaults__``,
  ``__code__``, ``__bases__``), but also for some that imports set, so a test names the one
  its technique patches.

Payloads that bypass Python (TorchScript's native file reads) open a path under the marker
instead, which cannot exist; the native error that names the path is recorded as a
``native`` event.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_SERVER = r"""
import json, os, platform, signal, sys, tempfile, time, traceback

platform.processor()  # cached now: the first call runs `uname -p`, which the hook would block
_STARTS = frozenset(
    ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "socket.connect")
)
_ON_PATHS = frozenset(
    ("open", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link",
     "os.truncate", "os.chmod", "os.chown", "os.utime", "os.listdir", "os.scandir")
)
_INSTALLED = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix})
_LOG = _MARKER = _NAME = _PATCHES = None
_busy = False


class PayloadBlocked(RuntimeError):
    pass


def _on_marker(args):
    for arg in args:
        if not isinstance(arg, (str, bytes, os.PathLike)):
            continue
        text = os.fsdecode(arg)
        if _NAME not in text:
            continue
        path = os.path.realpath(text)
        if path == _MARKER or path.startswith(_MARKER + os.sep):
            return True
    return False


def _outside_python(name):
    if not isinstance(name, str) or os.sep not in name:
        return False
    return not os.path.realpath(name).startswith(_INSTALLED)


def _is_payload(event, args):
    if event in _STARTS:
        return True
    if event in _ON_PATHS or event.startswith("shutil."):
        return _on_marker(args)
    if event == "ctypes.dlopen":
        return _outside_python(args[0])
    if event == "object.__setattr__":
        return len(args) > 1 and args[1] in _PATCHES
    return False


def _hook(event, args):
    global _busy
    if _busy:
        return
    _busy = True
    try:
        hit = _is_payload(event, args)
        if hit:
            shown = repr(args)[:300].replace("\n", " ")
            os.write(_LOG, f"{event} {shown}\n".encode("utf-8", "backslashreplace"))
    finally:
        _busy = False
    if hit:
        raise PayloadBlocked(event)


def _load(job):
    # In the forked child: this file's scratch, stderr, marker and hook, then the loader.
    global _LOG, _MARKER, _NAME, _PATCHES
    os.chdir(job["scratch"])
    os.environ["TMPDIR"] = job["scratch"]  # where loaders extract members (torch's legacy tar)
    tempfile.tempdir = None
    os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_TRUNC), 2)
    _LOG = os.open(job["log"], os.O_WRONLY | os.O_APPEND)
    _MARKER = os.path.realpath(job["marker"])
    _NAME = os.path.basename(_MARKER)
    _PATCHES = frozenset(filter(None, job["patches"].split(",")))
    sys.addaudithook(_hook)
    code = 0
    try:
        exec(compile(job["loader"], "<loader>", "exec"), {"PATH": job["path"]})
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(jobs, parallel, timeout):
    # Fork one child per job, at most `parallel` at once; None for a child killed at timeout.
    codes, running, waiting = {}, {}, list(range(len(jobs)))
    while waiting or running:
        while waiting and len(running) < parallel:
            index = waiting.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    _load(jobs[index])
                finally:
                    os._exit(70)
            running[pid] = (index, time.monotonic() + timeout)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            index, deadline = running.pop(pid)
            codes.setdefault(index, os.waitstatus_to_exitcode(status))
            continue
        for pid, (index, deadline) in running.items():
            if time.monotonic() > deadline and index not in codes:
                codes[index] = None
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return [codes[index] for index in range(len(jobs))]


_JOBS = json.loads(os.environ["REACH_JOBS"])
exec(compile(os.environ["REACH_PRELUDE"], "<prelude>", "exec"), {})
_CODES = _serve(_JOBS, int(os.environ["REACH_PARALLEL"]), float(os.environ["REACH_TIMEOUT"]))
with open(os.environ["REACH_CODES"], "w") as codes:
    json.dump(_CODES, codes)
"""


@dataclass(frozen=True)
class Reach:
    """What one loader run did: each payload action the hook blocked, in order."""

    reached: bool
    events: tuple[str, ...]
    returncode: int | None  # None: killed at the timeout
    stderr_tail: str


@dataclass(frozen=True)
class Run:
    """One file to load: ``loader`` is Python that reads the str ``PATH``; ``patches`` names
    the attributes (comma-separated) whose ``object.__setattr__`` counts as the payload."""

    loader: str
    path: Path
    marker: Path
    patches: str = ""


def prelude(loader: str) -> str:
    """The loader's leading imports: what its server runs once, before any fork."""
    body = ast.parse(loader).body
    leading: list[ast.stmt] = []
    for statement in body:
        if not isinstance(statement, ast.Import | ast.ImportFrom):
            break
        leading.append(statement)
    return ast.unparse(ast.Module(body=leading, type_ignores=[]))


def reaches_payload(
    loader: str, path: Path, marker: Path, timeout: float = 120, *, patches: str = ""
) -> Reach:
    """Run ``loader`` (Python that reads the str ``PATH``) on ``path`` in a child process and
    report whether it reached the payload. The marker must not exist afterwards."""
    return reaches_payloads([Run(loader, path, marker, patches)], timeout)[0]


def reaches_payloads(runs: Sequence[Run], timeout: float = 120) -> list[Reach]:
    """Each run's ``Reach``, in order: one server per distinct prelude, the servers side by
    side, each forking as many loaders at once as there are CPUs."""
    groups: dict[str, list[int]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(prelude(run.loader), []).append(index)
    reaches: dict[int, Reach] = {}

    def serve(item: tuple[str, list[int]]) -> None:
        lead, indexes = item
        found = _serve([runs[i] for i in indexes], lead, timeout)
        reaches.update(zip(indexes, found, strict=True))

    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        list(pool.map(serve, groups.items()))
    return [reaches[index] for index in range(len(runs))]


def _cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, max(2, cpus or 1))


def _serve(runs: list[Run], lead: str, timeout: float) -> list[Reach]:
    with tempfile.TemporaryDirectory(prefix="reach-") as scratch:
        jobs = []
        for number, run in enumerate(runs):
            folder = Path(scratch, str(number))
            folder.mkdir()
            (folder / "events.log").touch()
            (folder / "stderr").touch()
            jobs.append(
                {
                    "loader": run.loader,
                    "path": str(run.path.absolute()),
                    "marker": str(run.marker.absolute()),
                    "patches": run.patches,
                    "scratch": str(folder),
                    "log": str(folder / "events.log"),
                    "stderr": str(folder / "stderr"),
                }
            )
        codes = Path(scratch, "codes.json")
        env = {
            **os.environ,
            "REACH_JOBS": json.dumps(jobs),
            "REACH_PRELUDE": lead,
            "REACH_PARALLEL": str(_cpus()),
            "REACH_TIMEOUT": str(timeout),
            "REACH_CODES": str(codes),
        }
        server = subprocess.run(
            [sys.executable, "-c", _SERVER],
            cwd=scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout * len(runs) + 120,
            check=False,
        )
        assert codes.exists(), server.stderr.decode("utf-8", "replace")[-2000:]
        returncodes = json.loads(codes.read_text())
        return [
            _reach(run, Path(job["log"]), Path(job["stderr"]), code)
            for run, job, code in zip(runs, jobs, returncodes, strict=True)
        ]


def _reach(run: Run, log: Path, stderr_file: Path, returncode: int | None) -> Reach:
    marker = run.marker.absolute()
    stderr = stderr_file.read_bytes().decode("utf-8", "replace")
    events = [line for line in log.read_text("utf-8").splitlines() if line]
    under = f"{marker}{os.sep}"  # only native payloads name a path under the marker
    events += [
        f"native {line.strip()}"
        for line in stderr.splitlines()
        if under in line and "No such file or directory" in line
    ]
    assert not marker.exists(), f"the payload ran: {marker} exists"
    return Reach(bool(events), tuple(events), returncode, stderr[-2000:])
