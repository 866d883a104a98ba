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
opcodes comes first and admits only opcodes whose effect both give identically: data, the
memo, containers, GLOBAL and STACK_GLOBAL, REDUCE, OBJ, BUILD, BINPERSID. It refuses what C
does differently or cannot do without the file's code: NEWOBJ/NEWOBJ_EX (C wants a real
class), EXT1/2/4 (C reads copyreg's registry), NEXT_BUFFER/READONLY_BUFFER, the 8-byte
lengths, the protocol 0 text opcodes other than GLOBAL (their number syntax is C's
``strtol``), and joblib's array wrappers (the Python machine skips their raw bytes). The
walk also holds C to what the Python machine enforces: no length past the end, no memo
index C would allocate an array for (C's memo is indexed, the machine's a dict), LONG4 and
text-line bounds, and fewer opcodes than any ``Limits`` count, so no limit is reached.

What C does was read from CPython 3.11's Modules/_pickle.c and checked by the differential
tests on 3.11; another interpreter's C unpickler may differ in a way no test shows, so the
path is off there (``ENABLED``).
"""

from __future__ import annotations

import _pickle
import pickletools
import struct
import sys
from typing import Any, Final, Protocol

from modelport.limits import MAX_PICKLE_SHORT_LINE
from modelport.pickles import joblib_arrays, policy
from modelport.pickles.interface import Limits, Resolver, Step, Value, fill
from modelport.pickles.symbols import Made, Symbol

__all__ = ["ENABLED", "CleanRun", "LiveMade", "LiveSymbol", "RecordingResolver", "clean_run"]

ENABLED: Final = sys.version_info[:2] == (3, 11)


class RecordingResolver(Resolver, Protocol):
    """The scan's resolver: what it noted as it went, besides its symbols."""

    findings: list[Any]
    nested: list[Any]


_CODES: Final = {op.name: op.code.encode("latin-1")[0] for op in pickletools.opcodes}
# Opcodes whose whole argument has a fixed width, and the width with the opcode byte.
_FIXED: Final = {
    **dict.fromkeys(
        [
            *("DUP", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2"),
            *("TUPLE3", "EMPTY_LIST", "LIST", "EMPTY_DICT", "DICT", "APPEND", "SETITEM"),
            *("SETITEMS", "MEMOIZE", "REDUCE", "BUILD", "BINPERSID", "STACK_GLOBAL"),
            *("EMPTY_SET", "ADDITEMS", "FROZENSET", "OBJ"),
        ],
        1,
    ),
    "BININT1": 2,
    "BINGET": 2,
    "BINPUT": 2,
    "BININT2": 3,
    "BININT": 5,
    "LONG_BINGET": 5,
    "BINFLOAT": 9,
}
_WIDTH: Final = [0] * 256
for _name, _width in _FIXED.items():
    _WIDTH[_CODES[_name]] = _width
# Opcodes followed by a length and that many bytes: the length's format and width.
_COUNTED: Final = {
    _CODES["SHORT_BINUNICODE"]: (struct.Struct("<B"), 2),
    _CODES["BINUNICODE"]: (struct.Struct("<I"), 5),
    _CODES["SHORT_BINBYTES"]: (struct.Struct("<B"), 2),
    _CODES["BINBYTES"]: (struct.Struct("<I"), 5),
    _CODES["SHORT_BINSTRING"]: (struct.Struct("<B"), 2),
    _CODES["BINSTRING"]: (struct.Struct("<i"), 5),
    _CODES["LONG1"]: (struct.Struct("<B"), 2),
    _CODES["LONG4"]: (struct.Struct("<i"), 5),
}
_STOP, _PROTO, _FRAME = _CODES["STOP"], _CODES["PROTO"], _CODES["FRAME"]
_MARK, _APPENDS = _CODES["MARK"], _CODES["APPENDS"]
_GLOBAL, _LONG_BINPUT, _LONG4 = _CODES["GLOBAL"], _CODES["LONG_BINPUT"], _CODES["LONG4"]
_U32, _U64 = struct.Struct("<I").unpack_from, struct.Struct("<Q").unpack_from
_MAX_LONG4 = 1 << 16  # the Python machine's own bound (opcodes.op_long4)
# C grows its memo array to twice a new index and clears every slot: an index costs
# 16 bytes of memory per unit, so a crafted one could ask for gigabytes.
_MAX_MEMO_INDEX = 1 << 16
# The only globals the rules leave without a finding (rules._judge_use): a run naming any
# other is not clean, and stops at once.
_MAY_BE_CLEAN: Final = policy.SAFE_CALLS | policy.SAFE_VALUES | frozenset(policy.SAFE_CLASSES)
_DEADLINE_EVERY = 1 << 16  # the Python machine looks at the clock every 65,536 opcodes
_HIGHEST_PROTOCOL = 5  # the Python machine's (opcodes.op_proto), and C's in Python 3.11
# The walk copies this much first; a pickle that runs on is walked whole up to the last
# (past it the Python machine, which never copies, takes the pickle). The windows also
# bound the walk's work when a pickle holds more opcodes than it may.
_FIRST_WINDOW, _LAST_WINDOW = 1 << 17, 1 << 22
_TOO_LONG = -2


class CleanRun(Value):
    """Where the pickle ends (just past STOP) and how many opcodes it holds, STOP included,
    as the Python machine counts them."""

    FIELDS = ("end", "opcodes")
    __slots__ = FIELDS
    end: int
    opcodes: int

    def __init__(self, end: int, opcodes: int) -> None:
        fill(self, end=end, opcodes=opcodes)


def clean_run(
    data: memoryview, start: int, resolver: RecordingResolver, limits: Limits
) -> CleanRun | None:
    """Run the pickle at ``start`` through the C unpickler with ``resolver`` giving every
    global and call its meaning; None when this path cannot vouch for mirroring the Python
    machine (the caller then runs that machine on a fresh resolver). ``resolver`` holds the
    run's records afterwards; the caller judges them."""
    if not ENABLED or start < 0:
        return None
    data = data if data.format == "B" else data.cast("B")
    walked = _walk_from(data, start, _most_opcodes(limits))
    if walked is None:
        return None
    source = _Source(data, start)
    unpickler = _InertUnpickler(source, resolver)
    try:
        unpickler.load()
    except Exception:  # C refused the bytes, or a callback found what it cannot mirror
        return None
    finally:
        unpickler.cursor.resolver = None  # the records' way back to it: no cycle outlives the run
    if start + source.pos != walked.end:
        return None
    return walked


def _most_opcodes(limits: Limits) -> int:
    """The most opcodes a pickle may hold for no limit to be reachable: each opcode adds at
    most one item to the stack, the memo or the marks; the clock is read only every
    65,536 opcodes."""
    most = min(limits.max_opcodes, limits.max_memo, limits.max_stack, limits.max_marks) - 1
    if limits.max_seconds is not None:
        most = min(most, _DEADLINE_EVERY - 1)
    return most


def _walk_from(data: memoryview, start: int, most: int) -> CleanRun | None:
    """The walk over a copy of the bytes (indexing bytes is twice as fast as a view): of the
    first ``_FIRST_WINDOW`` bytes, then of all of them when the pickle runs on."""
    for window in (_FIRST_WINDOW, _LAST_WINDOW):
        chunk = bytes(data[start : start + window])
        walked = _walk(chunk, most)
        if walked is not _RAN_OUT:
            return None if walked is None else CleanRun(start + walked.end, walked.opcodes)
        if len(chunk) < window:
            return None  # the bytes end before STOP
    return None


def _walk(data: bytes, most: int) -> CleanRun | None:
    """The opcodes of ``data`` up to STOP if each is one this path admits and its argument
    is within the Python machine's bounds; None when one is not, ``_RAN_OUT`` when the
    bytes end first. (Past the end, indexing raises: that is how the end is found.)"""
    width, counted, count, pos, marked = _WIDTH, _COUNTED, 0, 0, -1
    try:
        while True:
            while step := width[data[pos]]:
                pos += step
                count += 1
            code = data[pos]
            count += 1
            if count > most:
                return None
            if code == _MARK:
                marked = pos = pos + 1
            elif code == _APPENDS:
                if pos == marked:
                    return None  # no items: C appends nothing to anything, the machine checks
                pos += 1
            elif code in counted:
                length, head = counted[code]
                n = length.unpack_from(data, pos + 1)[0]
                if n < 0 or (code == _LONG4 and n > _MAX_LONG4):
                    return None
                pos += head + n
            elif code == _LONG_BINPUT:
                if _U32(data, pos + 1)[0] >= _MAX_MEMO_INDEX:
                    return None
                pos += 5
            elif code == _STOP:
                return CleanRun(pos + 1, count)
            elif code == _GLOBAL:
                pos = _past_lines(data, pos + 1)
                if pos < 0:
                    return None if pos == _TOO_LONG else _RAN_OUT
            elif code == _PROTO:
                if data[pos + 1] > _HIGHEST_PROTOCOL:
                    return None
                marked = pos + 2 if pos == marked else marked
                pos += 2
            elif code == _FRAME:
                if _U64(data, pos + 1)[0] > len(data) - pos - 9:
                    return _RAN_OUT
                marked = pos + 9 if pos == marked else marked
                pos += 9
            else:
                return None
    except (IndexError, struct.error):
        return _RAN_OUT


def _past_lines(data: bytes, pos: int) -> int:
    """Past GLOBAL's two lines, each of at least one character (C refuses an empty one) and
    short enough for the Python machine; ``_TOO_LONG`` when one is not, -1 when the bytes
    end first."""
    for _ in range(2):
        end = data.find(b"\n", pos, pos + MAX_PICKLE_SHORT_LINE)
        if end < 0:
            return -1 if pos + MAX_PICKLE_SHORT_LINE > len(data) else _TOO_LONG
        if end == pos:
            return _TOO_LONG
        pos = end + 1
    return pos


_RAN_OUT: Final = CleanRun(-1, -1)


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
    (so a record can reach it from C's callbacks) and refuses to read, because C has no
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


class _InertUnpickler(_pickle.Unpickler):
    """Names globals through the resolver and never imports; the strings of protocol 0-2
    pickles decode as latin-1, as the Python machine decodes them."""

    def __init__(self, source: _Source, resolver: RecordingResolver) -> None:
        super().__init__(source, encoding="latin1")
        self.cursor = _RunCursor(resolver)
        self.step = self.cursor.step
        self.resolver = resolver

    def find_class(self, module: str, name: str) -> Any:
        symbol = self.resolver.find_global(module, name, self.step)
        if type(symbol) is not LiveSymbol or symbol.key not in _MAY_BE_CLEAN:
            raise _Unsure("a global the rules would report, or no symbol C can call")
        return symbol

    def persistent_load(self, pid: Any) -> Any:
        value = self.resolver.persistent_load(pid, self.step)
        if self.resolver.findings:
            raise _Unsure("not clean: the resolver noted something")
        return value


def _made(record: Symbol | Made, args: tuple[Any, ...]) -> Made:
    """What REDUCE or OBJ made of a record: the resolver's ``Made``, which C can use in turn.
    Every record of a run carries the run's step, and so its resolver."""
    step = record.step
    resolver = step.cursor.resolver  # type: ignore[attr-defined]  # a _RunCursor
    made = resolver.call(record, args, step)
    if resolver.findings or resolver.nested:
        raise _Unsure("not clean: the resolver noted something")
    if type(made) is not LiveMade:
        raise _Unsure("the resolver made a record C cannot call")
    return made


class _Live:
    """What C does to a record besides calling it, each handed to the resolver as the
    Python machine hands it: BUILD (``__setstate__``), SETITEM(S), APPEND(S)."""

    __slots__ = ()
    step: Step

    def __call__(self: Any, *args: Any) -> Made:
        return _made(self, args)

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


class LiveMade(_Live, Made):
    """A ``Made`` C can call and fill: what the resolver of a C run makes. The BUILD of
    joblib's array wrapper is refused (the Python machine reads the array bytes after it)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if joblib_arrays.is_wrapper(self.origin):
            raise _Unsure("joblib's array bytes follow this BUILD")
        super().__setstate__(state)
