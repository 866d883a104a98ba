"""Workers forked from the parent (``fleet.forking``): a forked worker holds none of the
parent's descriptors (the journal's lock, the other workers' pipes), answers as a fresh
one does, dies as a fresh one dies; a parent with a second thread or a memory budget
starts fresh workers instead; and a scan worker says it is ready only once it has what a
mixed folder's first files would import. The checks run in one fresh interpreter, with the
one thread a fork calls for; the kernel (``/proc``, ``flock``) is the witness."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
from typing import Any

import pytest

from modelport.fleet import forking, pool
from modelport.fleet.records import Budget

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# Run in a fresh interpreter: lock a file as a journal does, fork a scan worker, and see
# what it holds, what it answers, and how it ends.
_PROBE = """
import fcntl, json, os, signal, sys
from pathlib import Path
from modelport.fleet import pool
from modelport.fleet.records import Budget
lock, model = sys.argv[1:3]
held = os.open(lock, os.O_RDWR | os.O_CREAT)
fcntl.flock(held, fcntl.LOCK_EX)
worker = pool._launch(Budget(60.0), "scan")
said = [json.loads(worker.stdout.readline())]
fds = {e.name: os.readlink(e) for e in Path(f"/proc/{worker.pid}/fd").iterdir()}
os.close(held)
other = os.open(lock, os.O_RDWR)
try:
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock_free = True
except BlockingIOError:
    lock_free = False
task = {"command": "scan", "path": model, "options": {}}
worker.stdin.write(json.dumps(task).encode() + b"\\n")
worker.stdin.flush()
said.append(json.loads(worker.stdout.readline()))
forked = Path(f"/proc/{worker.pid}/cmdline").read_bytes() == Path("/proc/self/cmdline").read_bytes()
os.kill(worker.pid, signal.SIGKILL)
status = worker.wait()
from modelport.fleet import tasks
from modelport.formats import registry
tasks.preload(["scan"])
unread = [s.module for s in registry.FILE_SLOTS if s.module not in sys.modules]
print(json.dumps({
    "kind": type(worker).__name__, "forked": forked, "said": said, "fds": fds,
    "lock_free": lock_free, "status": status, "pid": worker.pid, "unread": unread,
}))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("forking")
    model = folder / "weights.pkl"
    model.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(folder / "out.jsonl"), str(model)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    found: dict[str, Any] = json.loads(done.stdout)
    found["model"] = str(model)
    return found


def test_a_single_threaded_parent_forks_its_workers(probe: dict[str, Any]) -> None:
    assert probe["kind"] == "Forked" and probe["forked"]
    assert probe["said"][0] == {"ready": probe["pid"]}


def test_a_forked_worker_holds_nothing_of_the_parent_but_its_pipes(probe: dict[str, Any]) -> None:
    """Its standard three are pipes (and its protocol's copy of the output); every other
    descriptor it inherited now names /dev/null, so the journal's lock went with the
    parent's own descriptor."""
    fds = probe["fds"]
    pipes = {number: target for number, target in fds.items() if target.startswith("pipe:")}
    assert {"0", "1", "2"} <= set(pipes) and len(pipes) == 4
    assert {target for number, target in fds.items() if number not in pipes} <= {"/dev/null"}
    assert probe["lock_free"]


def test_a_forked_worker_answers_and_dies_as_a_fresh_one(probe: dict[str, Any]) -> None:
    outcome = probe["said"][1]["outcome"]
    assert outcome["error"] is None and outcome["result"]["path"] == probe["model"]
    assert outcome["result"]["verdict"] == "safe"
    assert probe["status"] == -9  # SIGKILL, as ``Popen.wait`` says it


def test_a_second_thread_or_a_memory_budget_means_a_fresh_worker() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not forking.can_fork()
        assert not pool._forks(Budget(60.0))
    finally:
        stop.set()
        thread.join()
    assert not pool._forks(Budget(60.0, 4 << 30))


def test_a_scan_worker_is_ready_with_every_file_reader_imported(probe: dict[str, Any]) -> None:
    """What a mixed folder's first files would import is imported before ``ready`` (as
    ``preload`` imports it in a process that had none of it), so a file's time budget is
    its own; the registry is the list of readers."""
    assert probe["unread"] == []
