"""The scanner's fast path: CPython's C unpickler runs the pickle, the scan's resolver gives
every global and call its meaning, and nothing from the file is imported or called.

Most pickles a scan meets are clean model files, and most of a scan's time went to
interpreting their opcodes in Python. Here ``_pickle.Unpickler`` interprets them in C; its
``find_class`` hands back the resolver's own ``Symbol`` (never an import) and calls, BUILD,
APPEND and SETITEM on what it made go to the resolver as in the Python machine, so the
resolver ends up with the same records. The caller keeps this run's verdict only when it is
clean; any doubt, and every finding, sends the pickle to the Python machine, whose report
locates each finding.

C and the Python machine must agree on every pickle this path accepts, so a walk over the
opcodes (``fast_walk``) comes first and admits only opcodes whose effect both give
identically, with arguments inside the machine's bounds. C's NEWOBJ would want a real
class, so C runs a copy in which each NEWOBJ is a REDUCE of the argument tuple and a marker
that only ``find_class`` hands out: a call with the marker goes to the resolver's ``new``,
as the Python machine sends it. C hashes the keys of
its own dicts before anything can look at them, so it makes none: each EMPTY_DICT names a
global that ``find_class`` answers with a dict measuring each key first, as the Python
machine does (``keys.bounded_key``), and the opcodes that make other dicts and sets are
refused. joblib's array wrappers are refused when C builds them (the Python machine skips
their raw bytes).

What C does was read from CPython 3.11's Modules/_pickle.c and checked by the differential
tests on 3.11; another interpreter's C unpickler may differ in a way no test shows, so the
path is off there (``ENABLED``).
"""

from __future__ import annotations

import _pickle
import sys
from typing import Any, Final, Protocol

from modelport.limits import MAX_PICKLE_SHORT_LINE
from modelport.pickles import fast_walk, policy
from modelport.pickles.interface import Limits, Resolver, Step
from modelport.pickles.keys import bounded_key
from modelport.pickles.symbols import Made, Symbol

__all__ = ["ENABLED", "LiveMade", "LiveSymbol", "RecordingResolver", "clean_run"]

ENABLED: Final = sys.version_info[:2] == (3, 11)


class RecordingResolver(Resolver, Protocol):
    """The scan's resolver: what it noted as it went, besides its symbols; and the globals
    whose calls it only records on the symbol (``Symbol.calls`` and ``Symbol.made``, a
    ``made_type`` record each), which a record of a C run then records itself."""

    findings: list[Any]
    nested: list[Any]

    @property
    def calls_only_recorded(self) -> frozenset[tuple[str, str]]: ...


# The only globals the rules leave without a finding (rules._judge_use): a run naming any
# other is not clean, and stops at once.
_MAY_BE_CLEAN: Final = policy.SAFE_CALLS | policy.SAFE_VALUES | frozenset(policy.SAFE_CLASSES)
_DEADLINE_EVERY = 1 << 16  # the Python machine looks at the clock every 65,536 opcodes


def clean_run(
    data: memoryview, start: int, resolver: RecordingResolver, limits: Limits
) -> int | None:
    """Run the pickle at ``start`` through the C unpickler with ``resolver`` giving every
    global and call its meaning: where the pickle ends (just past STOP), or None when this
    path cannot vouch for mirroring the Python machine (the caller then runs that machine on
    a fresh resolver). ``resolver`` holds the run's records afterwards; the caller judges
    them."""
    if not ENABLED or start < 0:
        return None
    if not data.c_contiguous:
        return None  # the Python machine cannot read it as bytes either, and says so
    # indexes are bytes only in a flat view of bytes: the Python machine reads it so
    data = data if data.format == "B" and data.ndim == 1 else data.cast("B")
    admitted = fast_walk.admit(data, start, _most_opcodes(limits))
    if admitted is None:
        return None
    source = _Source(memoryview(admitted.program), 0)
    unpickler = _InertUnpickler(source, resolver)
    try:
        unpickler.load()
    except Exception:  # C refused the bytes, or a callback found what it cannot mirror
        return None
    finally:
        unpickler.cursor.resolver = None  # the records' way back to it: no cycle outlives the run
    if source.pos != admitted.program_end:
        return None
    return start + admitted.end


def _most_opcodes(limits: Limits) -> int:
    """The most opcodes a pickle may hold for no limit to be reachable: each opcode adds at
    most one item to the stack, the memo or the marks; the clock is read only every
    65,536 opcodes."""
    most = min(limits.max_opcodes, limits.max_memo, limits.max_stack, limits.max_marks) - 1
    if limits.max_seconds is not None:
        most = min(most, _DEADLINE_EVERY - 1)
    return most


class _Unsure(Exception):
    """Raised inside the C run where it would stop mirroring the Python machine."""


class _Source:
    """The file the C unpickler reads: ``peek`` hands it every remaining byte at once, so it
    reads from memory; ``pos`` is what it consumed (it reads that much back after STOP).
    There is no ``readinto``: C reaches the file only when the bytes run short, and then
    through ``read``, which copies."""

    __slots__ = ("data", "pos", "start")

    def __init__(self, data: memoryview, start: int) -> None:
        self.data = data
        self.start = start
        self.pos = 0

    def peek(self, n: int = 0) -> memoryview:
        return self.data[self.start + self.pos :]

    def read(self, n: int = -1) -> bytes:
        at = self.start + self.pos
        chunk = bytes(self.data[at:] if n < 0 else self.data[at : at + n])
        self.pos += len(chunk)
        return chunk

    def readline(self, size: int = -1) -> bytes:
        at = self.start + self.pos
        found = bytes(self.data[at : at + MAX_PICKLE_SHORT_LINE]).find(b"\n")
        return self.read(found + 1 if found >= 0 else MAX_PICKLE_SHORT_LINE)


class _RunCursor:
    """The cursor of the one ``Step`` every record of a C run carries: it knows the resolver
    (so a record can reach it from C's callbacks), and refuses to read, because C has no
    position to give (joblib's arrays, which read on, never reach it)."""

    __slots__ = ("resolver", "step")
    resolver: RecordingResolver | None

    def __init__(self, resolver: RecordingResolver) -> None:
        self.resolver = resolver
        self.step = Step(-1, "", self)

    @property
    def position(self) -> int:
        raise _Unsure("no byte position inside the C unpickler")

    def read(self, n: int) -> memoryview:
        raise _Unsure("no byte position inside the C unpickler")

    @property
    def frame_end(self) -> int:
        raise _Unsure("no byte position inside the C unpickler")


class _InertUnpickler(_pickle.Unpickler):
    """Names globals through the resolver and never imports; the strings of protocol 0-2
    pickles decode as latin-1, as the Python machine decodes them."""

    def __init__(self, source: _Source, resolver: RecordingResolver) -> None:
        super().__init__(source, encoding="latin1")
        self.cursor = _RunCursor(resolver)
        self.step = self.cursor.step
        self.resolver = resolver

    def find_class(self, module: str, name: str) -> Any:
        if module == "modelport":  # the walk refuses a pickle that names these itself
            if name == _CHECKED_DICT_NAME:
                return _CheckedDict()
            if name == _NEW_MARKER_NAME:
                return _NEW
        symbol = self.resolver.find_global(module, name, self.step)
        if type(symbol) is not LiveSymbol or symbol.key not in _MAY_BE_CLEAN:
            raise _Unsure("a global the rules would report, or no symbol C can call")
        if symbol.key in self.resolver.calls_only_recorded:
            symbol.__class__ = _RecordedLiveSymbol  # the same record, calls recorded in place
        return symbol

    def persistent_load(self, pid: Any) -> Any:
        value = self.resolver.persistent_load(pid, self.step)
        if self.resolver.findings:
            raise _Unsure("not clean: the resolver noted something")
        return value


_CHECKED_DICT_NAME: Final = fast_walk.CHECKED_DICT[1]
_NEW_MARKER_NAME: Final = fast_walk.NEW_MARKER[1]
_NEW: Final = object()  # the last argument of a call that was a NEWOBJ (fast_walk)


class _CheckedDict(dict[Any, Any]):
    """The dict C makes for each EMPTY_DICT (``fast_walk``): C hashes a real dict's keys
    itself, a subclass's through ``__setitem__``, where each key is measured first as the
    Python machine measures it. No ``__dict__``: C's BUILD cannot set attributes on it."""

    __slots__ = ()

    def __setitem__(self, key: Any, value: Any) -> None:
        dict.__setitem__(self, bounded_key(key) if type(key) is tuple else key, value)


class _Live:
    """What C does to a record besides calling it, each handed to the resolver as the
    Python machine hands it: BUILD (``__setstate__``), SETITEM(S), APPEND(S)."""

    __slots__ = ()
    step: Step

    def __call__(self: Any, *args: Any) -> Made:
        """What REDUCE, OBJ or NEWOBJ made of this record: the resolver's ``Made``, which C
        can use in turn. Every record of a run carries the run's step, and so its resolver."""
        step = self.step
        resolver = step.cursor.resolver  # type: ignore[attr-defined]
        if resolver is None:
            raise _Unsure("the run is over")
        if len(args) == 2 and args[1] is _NEW:
            if type(args[0]) is not tuple:
                raise _Unsure("NEWOBJ of arguments that are not a tuple")
            made = resolver.new(self, args[0], None, step)
        else:
            made = resolver.call(self, args, step)
        if resolver.findings or resolver.nested:
            raise _Unsure("not clean: the resolver noted something")
        if type(made) is not LiveMade:
            raise _Unsure("the resolver made a record C cannot call")
        return made

    def __setstate__(self, state: Any) -> None:
        self.step.cursor.resolver.build(self, state, self.step)  # type: ignore[attr-defined]

    def __setitem__(self, key: Any, value: Any) -> None:
        resolver = self.step.cursor.resolver  # type: ignore[attr-defined]
        resolver.set_items(self, [(key, value)], self.step)

    def extend(self, items: list[Any]) -> None:
        self.step.cursor.resolver.append(self, list(items), self.step)  # type: ignore[attr-defined]

    def append(self, item: Any) -> None:
        self.step.cursor.resolver.append(self, [item], self.step)  # type: ignore[attr-defined]


class LiveSymbol(_Live, Symbol):
    """A ``Symbol`` C can call (REDUCE, OBJ) and fill: what the resolver of a C run makes."""

    __slots__ = ()


class _RecordedLiveSymbol(LiveSymbol):
    """A ``LiveSymbol`` whose calls the resolver only records: recorded here as it would,
    without the way through the resolver, which most calls in a model file take."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Made:
        step = self.step
        if (len(args) == 2 and args[1] is _NEW) or step.cursor.resolver is None:  # type: ignore[attr-defined]
            return _Live.__call__(self, *args)
        made = LiveMade(self, step, args)
        self.made.append(made)
        self.calls.append((step, args))
        return made


class LiveMade(_Live, Made):
    """A ``Made`` C can call and fill: what the resolver of a C run makes. The BUILD of
    joblib's array wrapper ends the run: the resolver then reads the array bytes after it
    through the cursor, which has no position in C (``_RunCursor``)."""

    __slots__ = ()
