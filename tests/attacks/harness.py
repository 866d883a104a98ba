"""Does a file's natural loader reach the payload? The loader runs in a child process whose
audit hook blocks (and records) every way a payload acts.

The hook is installed before the loader snippet runs, so it sees what the loader's own code
does; it raises ``PayloadBlocked`` at each payload action, so nothing the payload asks for
happens (a loader that swallows the exception still leaves the event recorded). It records,
one line per event, to a side file (never stdout, which a library may write to):

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

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_CHILD = r"""
import os, platform, sys

platform.processor()  # cached now: the first call runs `uname -p`, which the hook would block
_LOG = os.open(os.environ["REACH_LOG"], os.O_WRONLY | os.O_APPEND)
_MARKER = os.path.realpath(os.environ["REACH_MARKER"])
_NAME = os.path.basename(_MARKER)
_PATCHES = frozenset(filter(None, os.environ["REACH_SETATTR"].split(",")))
_INSTALLED = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix})
_STARTS = frozenset(
    ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "socket.connect")
)
_ON_PATHS = frozenset(
    ("open", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link",
     "os.truncate", "os.chmod", "os.chown", "os.utime", "os.listdir", "os.scandir")
)
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


sys.addaudithook(_hook)
exec(compile(os.environ["REACH_LOADER"], "<loader>", "exec"), {"PATH": os.environ["REACH_PATH"]})
"""


@dataclass(frozen=True)
class Reach:
    """What one loader run did: each payload action the hook blocked, in order."""

    reached: bool
    events: tuple[str, ...]
    returncode: int | None  # None: killed at the timeout
    stderr_tail: str


def reaches_payload(
    loader: str, path: Path, marker: Path, timeout: float = 120, *, patches: str = ""
) -> Reach:
    """Run ``loader`` (Python that reads the str ``PATH``) on ``path`` in a child process and
    report whether it reached the payload. ``patches``: comma-separated attribute names whose
    ``object.__setattr__`` counts as the payload. The marker must not exist afterwards."""
    marker = marker.absolute()
    with tempfile.TemporaryDirectory(prefix="reach-") as scratch:
        log = Path(scratch, "events.log")
        log.touch()
        env = {
            **os.environ,
            "REACH_LOG": str(log),
            "REACH_MARKER": str(marker),
            "REACH_SETATTR": patches,
            "REACH_LOADER": loader,
            "REACH_PATH": str(path.absolute()),
            "TMPDIR": scratch,  # where loaders extract members (torch's legacy tar)
        }
        try:
            child = subprocess.run(
                [sys.executable, "-c", _CHILD],
                cwd=scratch,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout,
                check=False,
            )
            returncode: int | None = child.returncode
            stderr = child.stderr.decode("utf-8", "replace")
        except subprocess.TimeoutExpired as expired:
            returncode = None
            stderr = (expired.stderr or b"").decode("utf-8", "replace")
        events = [line for line in log.read_text("utf-8").splitlines() if line]
    under = f"{marker}{os.sep}"  # only native payloads name a path under the marker
    events += [
        f"native {line.strip()}"
        for line in stderr.splitlines()
        if under in line and "No such file or directory" in line
    ]
    assert not marker.exists(), f"the payload ran: {marker} exists"
    return Reach(bool(events), tuple(events), returncode, stderr[-2000:])
