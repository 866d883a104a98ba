"""Checking written bytes: comparing file ranges, and doing it while the writing goes on.

A verified conversion must compare every copied byte with its source, and a zip writer
needs the CRC-32 of every member. Both mean reading what was just written. Done after the
write, that doubles the time; done on a second thread while the main thread copies the
next tensor, it reads the page cache the copy has just filled and adds almost nothing on
two cores. ``checking_output`` starts that thread; ``write_tensor`` hands it each range it
writes: bytes copied unchanged are compared with their source range, and a tensor written
element by element (a cast, a gathered view) goes through ``ElementCheck`` (the read-back's
own comparison, a cast's error included). The read-back verification then still reads the
header the way the format's reader does, checks every tensor lies where it was compared,
and only skips comparing it again. Without the thread, the CRC is taken by re-reading.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from modelport.errors import ConversionError, TruncatedFileError, VerificationError
from modelport.tensors import Storage, TensorRef
from modelport.transfer.progress import advance

if TYPE_CHECKING:
    from modelport.transfer.write_plan import OutputTensor

COMPARE_CHUNK = 2 << 20  # two of these stay in the CPU cache between read and compare
PIECE = 64 << 20  # a cancelled check stops within one piece
MAP_WINDOW = 8 << 20  # the written file is compared through a map of this many bytes at a time

Checksum = Callable[[], int]  # the CRC-32 of written bytes, waited for when asked
# Compares a tensor written element by element (cast, gathered) with its source: returns
# what the read-back verification would (a cast's error), raises VerificationError.
ElementCheck = Callable[["OutputTensor", TensorRef], Any]


class RangeComparer:
    """Compares a range of a source with a range of the file just written. The source is
    read through a buffer reused for every chunk (fresh memory would cost a page fault per
    4 KiB, more than the reading), small enough to stay in the CPU cache until compared;
    the written file is read through a map of a window at a time, so its bytes come from
    its page cache without a copy (half the system time of reading both, 2 GHz ext4; the
    window's pages leave the process with the window). Chunks are compared whole
    (``bytearray`` equality is one ``memcmp``: a third of numpy's time for the same bytes,
    and no numpy import for a plain copy)."""

    def __init__(self, chunk: int = COMPARE_CHUNK) -> None:
        self.left = bytearray(chunk)
        self.right = bytearray(chunk)
        self._unmapped = bytearray()  # where the written file cannot be mapped

    def same(
        self,
        a: tuple[str | os.PathLike[str], int],
        b: tuple[str | os.PathLike[str], int],
        length: int,
    ) -> bool:
        return self.check(a, b, length)[0]

    def check(
        self,
        a: tuple[str | os.PathLike[str], int],
        b: tuple[str | os.PathLike[str], int],
        length: int,
        crc: int | None = None,
    ) -> tuple[bool, int]:
        """Whether ``a``'s range (the source) holds the same bytes as ``b``'s (the file
        written); with ``crc``, also the CRC-32 of ``b``'s range, continued from ``crc``."""
        with open(a[0], "rb") as first, open(b[0], "rb") as second:
            done = 0
            while done < length:
                size = min(MAP_WINDOW, length - done)
                with self._window(second, b[1] + done, size) as written:
                    for at in range(0, size, len(self.left)):
                        n = min(len(self.left), size - at)
                        _read_exactly(first, memoryview(self.left)[:n], a[1] + done + at)
                        with written[at : at + n] as out:
                            if crc is not None:
                                crc = zlib.crc32(out, crc)
                            if not self._equal(out):
                                return False, 0
                        advance(n)
                done += size
        return True, crc or 0

    @contextmanager
    def _window(self, handle: BinaryIO, offset: int, length: int) -> Iterator[memoryview]:
        """``length`` bytes at ``offset`` of ``handle``, mapped: the file just written,
        which only this process writes (a map of a file that shrinks underneath faults).
        Where the file cannot be mapped, they are read into a buffer kept for that (and a
        range past its end is reported by that read)."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(
                handle.fileno(), offset + length - start, prot=mmap.PROT_READ, offset=start
            )
        except (OSError, ValueError):  # a file system without maps, a range past the end
            mapped = None
        if mapped is None:
            if len(self._unmapped) < length:
                self._unmapped = bytearray(MAP_WINDOW)
            view = memoryview(self._unmapped)[:length]
            _read_exactly(handle, view, offset)
            yield view
            return
        view = memoryview(mapped)[offset - start :]
        try:
            yield view
        finally:
            view.release()
            mapped.close()

    def crc32(self, path: str | os.PathLike[str], offset: int, length: int, crc: int = 0) -> int:
        """The CRC-32 of a range, read through the same reused buffer."""
        with open(path, "rb") as handle:
            return crc32_of_range(handle, offset, length, self.right, crc)

    def _equal(self, written: memoryview) -> bool:
        """Whether ``written`` agrees with the first ``len(written)`` bytes of ``left``.
        A shorter last chunk is copied into ``right`` and given ``left``'s tail, so that
        the comparison is still of whole buffers: slicing a ``bytearray`` would copy into
        fresh memory, and ``memoryview`` equality goes byte by byte (each 20-40x slower
        than ``memcmp`` here)."""
        n = len(written)
        if n == len(self.left):
            return self.left == written
        memoryview(self.right)[:n] = written
        memoryview(self.right)[n:] = memoryview(self.left)[n:]
        return self.left == self.right


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` at ``offset`` with ``os.preadv`` (no copy); where the platform
    lacks it (macOS builds of Python), ``os.pread`` and one copy. Returns the bytes read."""
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        got: int = preadv(fd, [view], offset)
        return got
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def crc32_of_range(
    handle: BinaryIO, offset: int, length: int, buffer: bytearray, crc: int = 0
) -> int:
    """The CRC-32 of ``length`` bytes at ``offset``, read through ``buffer`` (reused by the
    caller: reading into fresh memory would cost a page fault per 4 KiB)."""
    for start in range(0, length, len(buffer)):
        view = memoryview(buffer)[: min(len(buffer), length - start)]
        _read_exactly(handle, view, offset + start)
        crc = zlib.crc32(view, crc)
    return crc


def _read_exactly(handle: BinaryIO, view: memoryview, offset: int) -> None:
    got = read_into(handle.fileno(), view, offset)
    if got != len(view):
        raise TruncatedFileError(
            "a range being checked ends early",
            expected=offset + len(view),
            actual=offset + got,
            path=str(getattr(handle, "name", "")),
        )


@dataclass(frozen=True)
class CopiedRange:
    """Bytes copied unchanged from one file range to another (paths resolved)."""

    source: str
    source_offset: int
    output: str
    output_offset: int
    length: int

    @classmethod
    def of(
        cls,
        source: str | os.PathLike[str],
        source_offset: int,
        output: str | os.PathLike[str],
        output_offset: int,
        length: int,
    ) -> CopiedRange:
        return cls(
            str(Path(source).resolve()),
            source_offset,
            str(Path(output).resolve()),
            output_offset,
            length,
        )


@dataclass
class _Job:
    """One written range: compare it with ``copied``'s source, take its CRC, or both."""

    output: str
    offset: int
    length: int
    copied: CopiedRange | None
    wants_crc: bool
    written: OutputTensor | None = None  # compared element by element (``ElementCheck``)
    crc: int = 0
    failure: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def checksum(self) -> int:
        self.done.wait()
        if self.failure is not None:
            raise self.failure
        return self.crc


class OutputChecks:
    """The second thread: takes each written range in order and, when ``compare`` is on,
    compares it with its source (bytes copied unchanged) or runs ``elements`` on it (a
    tensor written element by element); takes its CRC-32 when the writer asked for one."""

    def __init__(self, *, compare: bool, elements: ElementCheck | None = None) -> None:
        self.compare = compare
        self._elements = elements if compare else None
        self._pending: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._verdicts: dict[CopiedRange, bool] = {}
        self._outcomes: dict[tuple[str, int], tuple[Any, VerificationError | None]] = {}
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="modelport-checks", daemon=True)
        self._worker.start()

    def submit(
        self,
        output: str | os.PathLike[str],
        offset: int,
        length: int,
        copied: CopiedRange | None,
        *,
        crc: bool,
        written: OutputTensor | None = None,
    ) -> Checksum:
        """Check a range just written: ``copied``, bytes copied unchanged from a source;
        ``written``, a tensor written element by element; ``crc``, its CRC-32 is wanted."""
        job = _Job(
            os.fspath(output),
            offset,
            length,
            copied if self.compare else None,
            crc,
            written if self._elements is not None else None,
        )
        if job.copied is None and job.written is None and not crc:
            job.done.set()
        else:
            self._pending.put(job)
        return job.checksum

    def verdict(self, copied: CopiedRange) -> bool | None:
        """True: compared equal; False: differs; None: never compared here."""
        return self._verdicts.get(copied)

    def outcome(self, output: str | os.PathLike[str], offset: int) -> tuple[Any, bool]:
        """What the element check of the tensor written at ``offset`` returned, and whether
        there was one; its ``VerificationError`` is raised here."""
        found = self._outcomes.get((str(Path(output).resolve()), offset))
        if found is None:
            return None, False
        value, error = found
        if error is not None:
            raise error
        return value, True

    def finish(self) -> None:
        """Wait for every check; an error met on the thread is raised here."""
        self._pending.put(None)
        self._worker.join()
        if self._failure is not None:
            raise self._failure

    def cancel(self) -> None:
        self._stop.set()
        self._pending.put(None)
        self._worker.join()

    def _run(self) -> None:
        comparer: RangeComparer | None = None  # its buffers (and numpy) once there is work
        while (job := self._pending.get()) is not None:
            try:
                if self._stop.is_set():
                    raise ConversionError("the conversion stopped before this range was checked")
                if self._failure is not None:  # every later checksum reports the first error
                    raise self._failure
                comparer = comparer or RangeComparer()
                self._check(comparer, job)
            except BaseException as exc:  # handed to the writing thread by ``finish``
                job.failure = exc
                if not self._stop.is_set():
                    self._failure = self._failure or exc
            finally:
                job.done.set()

    def _check(self, comparer: RangeComparer, job: _Job) -> None:
        same = True
        for start in range(0, job.length, PIECE):
            if self._stop.is_set():
                raise ConversionError("the conversion stopped before this range was checked")
            length = min(PIECE, job.length - start)
            output = (job.output, job.offset + start)
            crc = job.crc if job.wants_crc else None
            if job.copied is not None and same:
                source = (job.copied.source, job.copied.source_offset + start)
                same, job.crc = comparer.check(source, output, length, crc)
            elif job.wants_crc:
                job.crc = comparer.crc32(*output, length, job.crc)
        if job.copied is not None:
            self._verdicts[job.copied] = same
        if job.written is not None and self._elements is not None:
            storage = Storage(Path(job.output), job.offset, job.length)
            out = TensorRef(job.written.dtype, job.written.shape, storage)
            key = (str(Path(job.output).resolve()), job.offset)
            try:
                self._outcomes[key] = (self._elements(job.written, out), None)
            except VerificationError as exc:  # raised when the read-back asks for it
                self._outcomes[key] = (None, exc)


_CURRENT = threading.local()  # the ``OutputChecks`` that ``checking_output`` installs


@contextmanager
def checking_output(
    *, compare: bool, elements: ElementCheck | None = None
) -> Iterator[OutputChecks]:
    """Within the block, every range ``write_tensor`` writes on this thread is checked on
    the second thread; on leaving, every check is done (or, on an error or Ctrl-C,
    abandoned)."""
    checks = OutputChecks(compare=compare, elements=elements)
    previous = getattr(_CURRENT, "checks", None)
    _CURRENT.checks = checks
    try:
        yield checks
    except BaseException:
        checks.cancel()
        raise
    finally:
        _CURRENT.checks = previous
    checks.finish()


def current() -> OutputChecks | None:
    checks: OutputChecks | None = getattr(_CURRENT, "checks", None)
    return checks
