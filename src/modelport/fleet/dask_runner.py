"""``--scheduler``: a run's files processed on a Dask distributed cluster instead of this
machine's worker processes (``pip install 'modelport[dask]'`` here and on every machine of
the cluster: its workers import this module to run a batch).

This process is the client. It cuts the tasks into batches, submits each batch as one Dask
task, and hands back each file's outcome as batches finish (``as_completed``); ``running``
writes the records through the same journal, so resuming, ``--shard`` and the summary work
as on one machine. On the cluster a batch runs in a ``pool.Pool`` of one worker process, so
a file there has what it has here: a process apart from the Dask worker, ``--timeout``,
``--max-memory``, a crash that becomes its ``WorkerDied`` record. That process is kept for
the Dask thread's next batch, this run's or a later one's (it waits idle until the Dask
worker exits), since starting one costs about a third of a second, a hundred times the scan
of a small file; a batch holds several files so that the round trip to the scheduler is
paid once for them.

Retries are for the cluster's failures, never for a file's: a file that is simply malformed
never raises (its error is an outcome, recorded once). A batch whose Dask worker was lost
(the scheduler gave up on it with ``KilledWorker`` after its own ``allowed-failures``
retries, a connection closed, an I/O error while fetching its answer) was never recorded,
so it is submitted again, split into one task per file so that a file that kills every
worker it meets takes no other file with it, each up to ``RETRIES`` more times; a file still
without an answer then gets a ``WorkerDied`` record, as one whose local worker died. A lost
scheduler stops the run instead (a rerun with the same ``--jsonl`` resumes).

dask is imported here only, and only by a run that names a scheduler.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError
from types import ModuleType
from typing import Any, Final

from modelport.errors import MissingDependencyError, ModelportError, UsageError
from modelport.fleet.pool import Pool, Task
from modelport.fleet.records import WORKER_DIED, Budget, Failure, Outcome

RETRIES: Final = 2  # submissions of a lost file after the first, one file to a task
MAX_BATCH: Final = 32  # files to a Dask task: few enough to redo, many enough to pay a trip
BATCHES_PER_THREAD: Final = 4  # enough batches for a slow one not to hold up the end
CONNECT_TIMEOUT_S: Final = 30.0
_LOCAL: Final = re.compile(r"local:(\d+)")
log = logging.getLogger(__name__)
_resident = threading.local()  # on a Dask worker: each thread's Pool, kept between batches

Answer = tuple[Task, Outcome, int]


def check_address(address: str) -> str:
    """``address`` if ``--scheduler`` can use it: a scheduler's address (``tcp://HOST:PORT``,
    ``tls://...``, ``HOST:PORT``) or ``local:N``, a cluster of N processes on this machine."""
    local = _LOCAL.fullmatch(address)
    if (local is not None and int(local.group(1)) >= 1) or (
        local is None and not address.startswith("local:") and ":" in address
    ):
        return address
    raise UsageError(
        f"--scheduler takes a Dask scheduler's address (tcp://HOST:8786) or local:N, "
        f"not {address!r}"
    )


class DaskRunner:
    """Runs tasks on the Dask cluster at ``address``; ``results`` yields each task's outcome
    once, in the order batches finish, with the pid of the worker process that answered."""

    def __init__(self, address: str, budget: Budget) -> None:
        self.address = check_address(address)
        self.budget = budget
        self._distributed = _distributed()  # a missing extra fails before any file is read

    def results(self, tasks: Iterable[Task]) -> Iterator[Answer]:
        pending = list(tasks)
        if not pending:
            return
        distributed = self._distributed
        lost = _transient(distributed)
        with self._client() as client:
            threads = sum(client.nthreads().values())
            size = batch_size(len(pending), threads)
            attempts: dict[Any, tuple[list[Task], int]] = {}

            def submit(batch: list[Task], attempt: int) -> Any:
                future = client.submit(run_batch, batch, self.budget, pure=False)
                attempts[future] = (batch, attempt)
                return future

            batches = [pending[i : i + size] for i in range(0, len(pending), size)]
            finished = distributed.as_completed([submit(b, 0) for b in batches], loop=client.loop)
            for future in finished:
                batch, attempt = attempts.pop(future)
                try:
                    answers = future.result()
                except lost as exc:
                    if client.status != "running":
                        raise self._scheduler_lost(exc) from exc
                    retried = [[t] for t in batch] if attempt < RETRIES else []
                    for single in retried:
                        finished.add(submit(single, attempt + 1))
                    log.warning(_said_lost(batch, exc, bool(retried)))
                    if not retried:
                        yield from _died(batch, exc)
                    continue
                yield from answers

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        distributed = self._distributed
        local = _LOCAL.fullmatch(self.address)
        with contextlib.ExitStack() as stack:
            try:
                if local is not None:
                    cluster = distributed.LocalCluster(
                        n_workers=int(local.group(1)),
                        threads_per_worker=1,
                        processes=True,
                        host="127.0.0.1",
                        dashboard_address=None,
                    )
                    target: Any = stack.enter_context(cluster)
                else:
                    target = self.address
                client = distributed.Client(target, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
            except OSError as exc:
                raise UsageError(
                    f"cannot reach the Dask scheduler at {self.address}: {exc}"
                ) from exc
            yield stack.enter_context(client)

    def _scheduler_lost(self, exc: BaseException) -> ModelportError:
        return ModelportError(
            f"lost the Dask scheduler at {self.address} ({type(exc).__name__}: {exc}); the "
            "files recorded so far are kept: rerun with the same --jsonl to do the rest"
        )


def run_batch(tasks: list[Task], budget: Budget) -> list[Answer]:
    """What a Dask worker runs: the batch's files, one at a time, in a worker process with
    the run's budget, exactly as ``--jobs 1`` runs them here. The process stays for the
    thread's next batch (it dies with the thread), so a batch pays no start-up."""
    pool: Pool | None = getattr(_resident, "pool", None)
    if pool is None or pool.budget != budget:
        if pool is not None:
            pool.close()
        pool = _resident.pool = Pool(1, budget, resident=True)
    return list(pool.results(tasks))


def batch_size(count: int, threads: int) -> int:
    """Files to a Dask task: ``BATCHES_PER_THREAD`` batches for each of the cluster's
    threads, at most ``MAX_BATCH`` files each."""
    return max(1, min(MAX_BATCH, math.ceil(count / (max(1, threads) * BATCHES_PER_THREAD))))


def _distributed() -> ModuleType:
    try:
        return importlib.import_module("distributed")
    except ImportError:
        raise MissingDependencyError(
            "distributed", "dask", "Running on a Dask cluster (--scheduler)"
        ) from None


def _transient(distributed: ModuleType) -> tuple[type[BaseException], ...]:
    """What a batch raises when the cluster, not a file, failed it."""
    comm = importlib.import_module("distributed.comm")
    return (
        distributed.KilledWorker,
        comm.CommClosedError,
        OSError,
        CancelledError,  # the scheduler forgot the task (it restarted, the client reconnected)
    )


def _said_lost(batch: list[Task], exc: BaseException, retried: bool) -> str:
    then = "submitted again, one task per file" if retried else "recorded as WorkerDied"
    return (
        f"a Dask worker was lost with {len(batch)} file(s) unanswered ({type(exc).__name__}: "
        f"{exc}); {then}"
    )


def _died(batch: list[Task], exc: BaseException) -> Iterator[Answer]:
    for task in batch:
        message = (
            f"{task.path}: every Dask worker that read this file was lost, "
            f"{RETRIES + 1} times ({type(exc).__name__}: {exc})"
        )
        yield task, Outcome(None, error=Failure(WORKER_DIED, message)), 0
