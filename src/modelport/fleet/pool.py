"""The parent's side of the workers: ``--jobs`` processes kept busy, one file each at a time.

A ``concurrent.futures`` pool loses track of which file a dead worker held and breaks the
whole pool when one dies; here each worker is a plain child process (``worker``) spoken to
over pipes, so the parent always knows which file each holds. When a worker dies (a crash,
a signal, the kernel's OOM killer) that file gets an ``error`` record of type
``WorkerDied`` naming how it died and the last lines the worker wrote to stderr; when a file
overruns ``Budget.timeout_s`` the parent kills its worker and the file gets a ``timeout``
record. Either way a fresh worker takes the next file, and every other file is unaffected:
each file is answered for exactly once.

Workers are started with one thread for the numeric libraries (``OMP_NUM_THREADS=1`` and
friends, unless set): the parallelism is the processes'. A worker is forked from the parent
where that is safe (``forking``: one thread, no memory limit), inheriting the imports the
parent made, else started fresh (a tenth of a second more of a core: the interpreter's own
start and those imports again). Its start-up is kept off the run's critical path: the CLI
starts the workers (``prestart``) before it walks the folders it was named, and a worker
nearing its last file (``TASKS_PER_WORKER``) has its successor started while it reads its
last ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Final, Protocol

from modelport.errors import ModelportError, UsageError
from modelport.fleet import forking
from modelport.fleet.records import TIMED_OUT, WORKER_DIED, Budget, Failure, Outcome

# Then a fresh process, so a long run's heap never fragments. A worker's start-up costs
# about 0.1 s of a core, 10 microseconds a file at this count; a scan worker's memory grew
# from 18 to 24 MB over 2,000 small files.
TASKS_PER_WORKER: Final = 10_000
# Files before a worker's last at which its successor starts: about a start-up's worth.
SUCCESSOR_LEAD: Final = 200
# Tasks sent to a worker ahead of its answers: the next file waits in its pipe, so it never
# idles while the parent, sharing the cores, gets round to reading the last answer.
QUEUE_DEPTH: Final = 2
# A worker whose files take under FAST_S each (its pace) is sent files for about AHEAD_S of
# its time (at most FAST_DEPTH), and while every busy worker has more than QUEUE_DEPTH queued
# the parent sleeps before it looks at the pipes, for half the time the shortest queue needs
# (at most GATHER_S): it then wakes for many answers at once and sends tasks in batches,
# instead of a wake-up and two system calls a file. A wake-up costs the parent about 0.3 ms
# of a core and takes that from a worker when the workers fill the cores, so the queue is
# counted in time, not files: files of 2 ms queue 50 deep and the parent wakes about every
# GATHER_S. A timeout is then seen up to GATHER_S late, and a queue behind a file that turns
# out slow costs the run's end about AHEAD_S.
FAST_S: Final = 0.02
AHEAD_S: Final = 0.1
FAST_DEPTH: Final = 64
GATHER_S: Final = 0.05
# A worker with a task queued is sent another only while its queued tasks come to fewer bytes
# than this, half of Linux's pipe buffer: a write to a worker then never blocks the parent
# while that worker reads a file (long paths or options would fill the pipe 64 files deep).
PIPE_ROOM: Final = 32 << 10
FAILED_STARTS: Final = 3  # workers in a row that die before they are ready: give up
_TAIL_BYTES: Final = 2000
_THREAD_VARIABLES: Final = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


class _Process(Protocol):
    """A worker process as the pool sees it: ``subprocess.Popen`` or ``forking.Forked``."""

    pid: int
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


@dataclass(frozen=True)
class Task:
    """One file to send to a worker; ``key`` is the caller's name for it."""

    key: int
    command: str
    path: str
    options: dict[str, Any]


@dataclass(eq=False)  # each worker is itself: compared and removed by identity
class _Worker:
    process: _Process
    buffer: bytearray = field(default_factory=bytearray)
    tail: bytearray = field(default_factory=bytearray)
    ready: bool = False  # said it is ready: it started
    gone: bool = False  # its input pipe broke: it is dead, its end of output on the way
    retiring: bool = False  # said its last answer: the rest of its queue was never read
    queue: deque[Task] = field(default_factory=deque)  # sent, not answered; the first runs
    sizes: deque[int] = field(default_factory=deque)  # the bytes of each task in the queue
    started: float = 0.0  # when the first of the queue began
    sent: int = 0
    pace: float = FAST_S  # seconds a file, averaged over its last few; FAST_S until known
    pipe_data: bytearray = field(default_factory=bytearray)  # tasks not yet written

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ending(self) -> bool:
        """Whether it is dead, leaving, or near its last file: its successor may start."""
        return self.gone or self.retiring or self.sent >= TASKS_PER_WORKER - SUCCESSOR_LEAD

    @property
    def room(self) -> int:
        """Files it may still be sent."""
        return 0 if self.gone or self.retiring else TASKS_PER_WORKER - self.sent

    @property
    def depth(self) -> int:
        """Tasks it may hold, sent and not answered: about ``AHEAD_S`` of its time."""
        if self.pace >= FAST_S:
            return QUEUE_DEPTH
        ahead = int(AHEAD_S / self.pace) if self.pace > 0 else FAST_DEPTH
        return max(QUEUE_DEPTH, min(FAST_DEPTH, ahead))

    @property
    def task(self) -> Task | None:
        """The file it is reading now."""
        return self.queue[0] if self.queue else None


def _limit(worker: _Worker) -> int:
    """The most tasks ``worker`` may hold now, sent and not answered: none while it starts or
    leaves, and none past its last file (it leaves after ``TASKS_PER_WORKER``)."""
    if not worker.ready or worker.gone or worker.retiring:
        return 0
    return min(worker.depth, len(worker.queue) + TASKS_PER_WORKER - worker.sent)


class Pool:
    """Runs tasks on up to ``jobs`` workers; ``results`` yields each task's outcome once,
    in the order they finish, with the pid of the worker that answered. The workers leave
    when ``results`` ends, unless the pool is ``resident``: then idle workers wait for the
    next call (a Dask worker's batches share one) until ``close``."""

    def __init__(self, jobs: int, budget: Budget, *, resident: bool = False) -> None:
        self.jobs = max(1, jobs)
        self.budget = budget
        self.resident = resident
        self._selector = selectors.DefaultSelector()
        self._workers: list[_Worker] = []
        self._pending: deque[Task] = deque()
        self._failed_starts = 0
        self._last_failure = ""

    def results(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Outcome, int]]:
        self._pending.extend(tasks)
        try:
            while self._pending or any(w.task for w in self._workers):
                self._start_workers()
                self._dispatch()
                gather = self._gather()
                if gather > 0:
                    time.sleep(gather)
                for key, _ in self._selector.select(self._wait()):
                    yield from self._read(key.data[0], key.data[1])
                yield from self._expire()
        finally:
            if self.resident:  # cut short: busy workers are killed, the rest stay
                for worker in [w for w in self._workers if w.queue]:
                    self._stop(worker)
                self._pending.clear()
            else:
                self.close()

    def close(self) -> None:
        """Stop every worker: idle ones leave together, busy ones are killed; workers
        started early for a pool and never taken leave too."""
        discard_early()
        for worker in self._workers:
            if not worker.queue and worker.process.stdin is not None:
                with contextlib.suppress(OSError):
                    worker.process.stdin.close()
        for worker in list(self._workers):
            self._stop(worker)
        self._selector.close()

    # -- workers ------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        """Workers for the files left, up to ``jobs`` of them not ending; the files that
        ending workers may still take are theirs, the rest call for successors."""
        lasting = [w for w in self._workers if not w.ending]
        busy = sum(w.task is not None for w in lasting)
        left = len(self._pending) - sum(w.room for w in self._workers if w.ending)
        wanted = min(self.jobs, busy + max(0, left))
        while len(lasting) < wanted:
            if self._failed_starts >= FAILED_STARTS:
                raise self._cannot_start()
            worker = self._spawn(self._pending[0].command)
            self._workers.append(worker)
            lasting.append(worker)

    def _spawn(self, command: str) -> _Worker:
        process = _take_early(self.budget, command) or _launch(self.budget, command)
        worker = _Worker(process)
        assert process.stdout is not None and process.stderr is not None
        self._selector.register(process.stdout, selectors.EVENT_READ, (worker, "out"))
        self._selector.register(process.stderr, selectors.EVENT_READ, (worker, "err"))
        return worker

    def _cannot_start(self) -> ModelportError:
        said = f": {self._last_failure}" if self._last_failure else ""
        if self.budget.max_memory:
            return UsageError(
                f"no worker could start within --max-memory {self.budget.max_memory:,} bytes; "
                f"give it more than the interpreter and modelport map{said}"
            )
        return ModelportError(f"no worker process could start{said}")

    def _dispatch(self) -> None:
        """Give every worker a file before any gets a second one queued; an idle worker
        begins only while fewer than ``jobs`` are busy (a successor waits for the worker it
        succeeds to finish its last file)."""
        busy = sum(bool(w.queue) for w in self._workers)
        limits = {w: _limit(w) for w in self._workers}
        rooms = {w: PIPE_ROOM - sum(w.sizes) for w in self._workers}
        written: dict[_Worker, None] = {}  # each worker's tasks in one write
        lowest = min((len(w.queue) for w in self._workers), default=0)
        deepest = max(limits.values(), default=0)
        for depth in range(lowest + 1, deepest + 1):  # below ``lowest``, every queue is full
            for worker in self._workers:
                if not self._pending:
                    break
                idle = not worker.queue
                full = len(worker.queue) >= min(depth, limits[worker])
                if full or (idle and busy >= self.jobs) or (not idle and rooms[worker] <= 0):
                    continue
                self._send(worker, self._pending.popleft())
                rooms[worker] -= worker.sizes[-1] if worker.sizes else 0
                written[worker] = None
                if idle and worker.queue:
                    busy += 1
        for worker in written:
            self._flush(worker)

    def _gather(self) -> float:
        """Seconds the parent may let answers gather: while every busy worker has more than
        ``QUEUE_DEPTH`` files queued, half the time the shortest queue takes (0: none)."""
        busy = [w for w in self._workers if w.queue]
        if not busy or any(len(w.queue) <= QUEUE_DEPTH for w in busy):
            return 0.0
        drained = min((len(w.queue) - 1) * w.pace for w in busy)
        deadline = self._wait()
        return min(drained / 2, GATHER_S, GATHER_S if deadline is None else deadline)

    def _send(self, worker: _Worker, task: Task) -> None:
        """Queue ``task`` in the worker's input buffer; ``_flush`` writes it."""
        message = {"command": task.command, "path": task.path, "options": task.options}
        assert worker.process.stdin is not None
        line = json.dumps(message).encode() + b"\n"
        worker.pipe_data += line
        if not worker.queue:
            worker.started = time.monotonic()
        worker.queue.append(task)
        worker.sizes.append(len(line))
        worker.sent += 1

    def _flush(self, worker: _Worker) -> None:
        """Write the tasks queued for the worker; if it died, they were never sent."""
        data, worker.pipe_data = bytes(worker.pipe_data), bytearray()
        try:
            assert worker.process.stdin is not None
            worker.process.stdin.write(data)
            worker.process.stdin.flush()
        except BrokenPipeError:  # it died; its end of output is on the way
            unsent = data.count(b"\n")
            for _ in range(unsent):
                self._pending.appendleft(worker.queue.pop())
                worker.sizes.pop()
            worker.sent -= unsent
            worker.gone = True

    def _wait(self) -> float | None:
        """Seconds until the first busy worker's file overruns its budget."""
        deadlines = [w.started + self.budget.timeout_s for w in self._workers if w.task]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    # -- what workers say ---------------------------------------------------------------------

    def _read(self, worker: _Worker, stream: str) -> Iterator[tuple[Task, Outcome, int]]:
        if worker not in self._workers:
            return  # stopped earlier in this round of events
        pipe = worker.process.stdout if stream == "out" else worker.process.stderr
        assert pipe is not None
        data = os.read(pipe.fileno(), 1 << 16)
        if stream == "err":
            worker.tail = (worker.tail + data)[-_TAIL_BYTES:]
            if not data:
                self._selector.unregister(pipe)
            return
        if not data:
            yield from self._ended(worker)
            return
        worker.buffer += data
        *lines, worker.buffer = worker.buffer.split(b"\n")
        if not lines:
            return
        now = time.monotonic()
        for message in json.loads(b"[" + b",".join(lines) + b"]"):  # one call for the batch
            if "ready" in message:
                worker.ready = True
                self._failed_starts = 0
            elif worker.queue:
                task = worker.queue.popleft()
                worker.sizes.popleft()
                worker.started = now  # the next one in its queue begins
                worker.retiring = worker.retiring or bool(message.get("last"))
                outcome = Outcome.from_json(message["outcome"])
                worker.pace = (worker.pace + outcome.duration_s) / 2
                yield task, outcome, worker.pid

    def _ended(self, worker: _Worker) -> Iterator[tuple[Task, Outcome, int]]:
        """A worker closed its output: it finished its tasks, left after saying its answer
        was its last (its queue was never read), or died reading the first of its queue."""
        elapsed = time.monotonic() - worker.started
        task = None if worker.retiring else worker.task
        self._stop(worker)
        status = worker.process.returncode
        if not worker.ready:
            self._failed_starts += 1
            self._last_failure = _how(status, worker.tail)
        if task is not None:
            message = (
                f"{task.path}: the worker reading this file died ({_how(status, worker.tail)})"
            )
            yield task, Outcome(None, error=Failure(WORKER_DIED, message), duration_s=elapsed), 0

    def _expire(self) -> Iterator[tuple[Task, Outcome, int]]:
        now = time.monotonic()
        for worker in list(self._workers):
            task = worker.task
            if task is None or now - worker.started < self.budget.timeout_s:
                continue
            self._stop(worker)
            message = (
                f"{task.path}: not finished within {self.budget.timeout_s:g} s (--timeout); "
                "its worker was stopped"
            )
            failure = Failure(TIMED_OUT, message)
            yield task, Outcome(None, error=failure, duration_s=now - worker.started), 0

    def _stop(self, worker: _Worker) -> None:
        """Kill (if need be) and reap one worker, and forget it; the files queued for it and
        not begun go back to the front of the line, in order."""
        process = worker.process
        if process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                if not worker.queue and process.stdin is not None:
                    process.stdin.close()  # idle: let it leave on its own
                    process.wait(timeout=0.5)
            if process.poll() is None:
                process.kill()
                process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(pipe)
            if pipe is process.stderr:
                with contextlib.suppress(OSError, ValueError):
                    worker.tail = (worker.tail + pipe.read())[-_TAIL_BYTES:]
            pipe.close()
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        self._workers.remove(worker)
        unread = list(worker.queue)[0 if worker.retiring else 1 :]
        self._pending.extendleft(reversed(unread))
        worker.queue.clear()
        worker.sizes.clear()


# Workers started by ``prestart``, not yet taken by a pool: (budget, command, process).
_EARLY: list[tuple[Budget, str, _Process]] = []


def prestart(jobs: int, budget: Budget, command: str) -> None:
    """Start ``jobs`` workers for ``command`` now, for the next pool with this budget to
    take: their start-up then overlaps what the parent does before its pool runs (walking
    the folders it was named) instead of following it."""
    while len(_EARLY) < jobs:
        _EARLY.append((budget, command, _launch(budget, command)))


def discard_early() -> None:
    """Stop the workers started early and never taken: they hold no file, and one still
    importing would take its time to notice its input close."""
    while _EARLY:
        _, _, process = _EARLY.pop()
        with contextlib.suppress(OSError):
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _take_early(budget: Budget, command: str) -> _Process | None:
    for position, (wanted, preloaded, process) in enumerate(_EARLY):
        if wanted == budget and preloaded == command:
            del _EARLY[position]
            return process
    return None


def _launch(budget: Budget, command: str) -> _Process:
    """A worker forked from this process where that is safe (``forking``), else a fresh one."""
    if _forks(budget):
        return forking.fork_worker(_arguments(budget, command), _THREAD_VARIABLES)
    return _start(budget, command)


def _forks(budget: Budget) -> bool:
    """Whether a worker for ``budget`` is forked: not under a memory limit (it would count
    this process's heap and libraries), and only where ``forking`` finds it safe."""
    return budget.max_memory is None and forking.can_fork()


def _arguments(budget: Budget, command: str) -> list[str]:
    """The worker's command line, after ``python -m modelport.fleet.worker``."""
    arguments = ["--parent", str(os.getpid()), "--max-tasks", str(TASKS_PER_WORKER)]
    arguments += ["--commands", command]
    if budget.max_memory:
        arguments += ["--max-memory", str(budget.max_memory)]
    return arguments


def _start(budget: Budget, command: str) -> subprocess.Popen[bytes]:
    """A fresh worker process, ready once it has imported what ``command`` needs."""
    arguments = [sys.executable, "-m", "modelport.fleet.worker", *_arguments(budget, command)]
    environment = dict(os.environ)
    for name in _THREAD_VARIABLES:
        environment.setdefault(name, "1")
    return subprocess.Popen(
        arguments,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    )


def _how(status: int | None, tail: bytes | bytearray) -> str:
    """How a worker ended, in words, with the last line it wrote to stderr."""
    if status is not None and status < 0:
        try:
            how = f"killed by {signal.Signals(-status).name}"
        except ValueError:
            how = f"killed by signal {-status}"
    else:
        how = f"exit status {status}"
    lines = bytes(tail).decode("utf-8", "replace").strip().splitlines()
    return f"{how}; it last said: {lines[-1]}" if lines else how
