"""The scanner's fast path: CPython's C unpickler runs the pickle, the scan's resolver gives
every global and call its meaning, and nothing from the file is imported or called.

Most pickles a scan meets are clean model files, and most of a scan's time went to
interpreting their opcodes in Python. Here ``_pickle.Unpickler`` interprets them in C; its
``find_class`` hands back the resolver's own ``Symbol`` (never an import) and calls, BUILD,
APPEND and SETITEM on what it made are recorded as the resolver records them, so the rules
judge the same uses. Each callback from C costs about a microsecond, so the records do what
they can themselves: a global whose calls the rules never look at gives one shared result
(``_PlainLiveSymbol``), a call the rules would report ends the run at once, a dict takes
all the items of a SETITEMS in one call. The caller keeps this run's verdict only when it
is clean; any doubt, and every finding, sends the pickle to the Python machine, whose report
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
from functools import partial
from itertools import chain
from typing import Any, Final, Protocol

from modelport.limits import MAX_PICKLE_SHORT_LINE
from modelport.pickles import fast_walk, hooks, joblib_arrays, policy
from modelport.pickles.interface import Limits, Resolver, Step
from modelport.pickles.keys import bounded_key
from modelport.pickles.rules import PLAIN_SAFE_CALLS, passes_computed, special_names
from modelport.pickles.symbols import Made, Symbol

__all__ = ["ENABLED", "LiveMade", "LiveSymbol", "RecordingResolver", "clean_run"]

ENABLED: Final = sys.version_info[:2] == (3, 11)


class RecordingResolver(Resolver, Protocol):
    """The scan's resolver: what it noted as it went, besides its symbols; and the globals
    whose calls it only records on the symbol (``Symbol.calls`` and ``Symbol.made``, a
    ``made_type`` record each), which a record of a C run then records itself."""

    findings: list[Any]
    nested: list[Any]
    symbols: list[Symbol]

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
    if admitted.opens_like_payload and hooks.may_hold_payload(admitted.program):
        return None  # (a constant that may be a nested payload: the resolver scans it)
    source = _Source(memoryview(admitted.program), 0)
    unpickler = _InertUnpickler(source, resolver)
    try:
        unpickler.load()
        judge_records(resolver)
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
        self.kinds = _kinds(resolver.calls_only_recorded)
        # C calls the resolver itself for each BINPERSID (no method of this class between):
        # the C unpickler takes any callable here
        self.persistent_load = partial(resolver.persistent_load, at=self.step)  # type: ignore[method-assign]

    def find_class(self, module: str, name: str) -> Any:
        if module == "modelport":  # the walk refuses a pickle that names these itself
            if name == _CHECKED_DICT_NAME:
                return _CheckedDict()
            if name == _NEW_MARKER_NAME:
                return _NEW
            if name == _SET_ITEMS_NAME:
                return _SET_ITEMS
        symbol = self.resolver.find_global(module, name, self.step)
        kind = self.kinds.get(symbol.key) if type(symbol) is LiveSymbol else None
        if kind is None:
            raise _Unsure("a global the rules would report, or no symbol C can call")
        symbol.__class__ = kind  # the same record, its calls handled as its key needs
        if kind is _PlainLiveSymbol or kind is _PassingLiveSymbol:
            symbol.made.append(LiveMade(symbol, self.step))
        return symbol


_CHECKED_DICT_NAME: Final = fast_walk.CHECKED_DICT[1]
_NEW_MARKER_NAME: Final = fast_walk.NEW_MARKER[1]
_SET_ITEMS_NAME: Final = fast_walk.SET_ITEMS_MARKER[1]
_NEW: Final = object()  # the last argument of a call that was a NEWOBJ (fast_walk)
_SET_ITEMS: Final = object()  # the last item of a BUILD state that was a SETITEMS


def _items(state: Any) -> tuple[Any, ...] | None:
    """The keys and values of a SETITEMS that C ran as a BUILD (``fast_walk``); None for a
    BUILD of the pickle's own."""
    if type(state) is not tuple or not state or state[-1] is not _SET_ITEMS:
        return None
    if len(state) % 2 == 0:
        raise _Unsure("SETITEMS of an odd number of items: the Python machine refuses it")
    return state  # type: ignore[no-any-return]


_set_item: Final = dict.__setitem__


class _CheckedDict(dict[Any, Any]):
    """The dict C makes for each EMPTY_DICT (``fast_walk``): C hashes a real dict's keys
    itself, a subclass's through ``__setitem__``, where each key is measured first as the
    Python machine measures it. No ``__dict__``: C's BUILD cannot set attributes on it."""

    __slots__ = ()

    def __setitem__(self, key: Any, value: Any) -> None:
        if type(key) is tuple:
            bounded_key(key)
        _set_item(self, key, value)

    def __setstate__(self, state: Any) -> None:
        """SETITEMS (``fast_walk``): every key measured, then all stored at once."""
        items = _items(state)
        if items is None:
            raise _Unsure("BUILD on a dict: the Python machine's resolver looks at it")
        keys = items[0:-1:2]
        if tuple in map(type, keys):  # (told in C: most dicts have no tuple key)
            for key in keys:
                if type(key) is tuple:
                    bounded_key(key)
        self.update(zip(keys, items[1:-1:2], strict=True))


class _Live:
    """What C does to a record besides calling it. SETITEM onto a record is judged as the
    resolver judges it (``hooks.item_hook``); APPENDS (C calls ``extend`` on what is no
    list) ends the run: the Python machine judges it."""

    __slots__ = ()
    step: Step

    def __setitem__(self, key: Any, value: Any) -> None:
        if hooks.item_hook(self, True) is not None:
            raise _Unsure("SETITEM through a method a state may have planted")

    def extend(self, items: Any) -> None:
        raise _Unsure("APPENDS onto a record: the resolver judges the method it reaches")

    def _instantiated(self: Any, args: Any) -> Made:
        """NEWOBJ of this record (C ran it as a call with the marker last)."""
        if type(args) is not tuple:
            raise _Unsure("NEWOBJ of arguments that are not a tuple")
        step = self.step
        resolver = step.cursor.resolver
        made = resolver.new(self, args, None, step)
        if resolver.findings:
            raise _Unsure("not clean: the resolver noted something")
        return made  # type: ignore[no-any-return]


class LiveSymbol(_Live, Symbol):
    """A ``Symbol`` C can call (REDUCE, OBJ) and fill: what the resolver of a C run makes.
    Its calls go through the resolver, which looks at their arguments."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Made:
        """What REDUCE, OBJ or NEWOBJ made of this record: the resolver's ``Made``, which C
        can use in turn. Every record of a run carries the run's step, and so its resolver."""
        if len(args) == 2 and args[1] is _NEW:
            return self._instantiated(args[0])
        step = self.step
        resolver = step.cursor.resolver  # type: ignore[attr-defined]
        made = resolver.call(self, args, step)
        if resolver.findings or resolver.nested:
            raise _Unsure("not clean: the resolver noted something")
        if type(made) is not LiveMade:
            raise _Unsure("the resolver made a record C cannot call")
        return made  # type: ignore[no-any-return]

    def __setstate__(self, state: Any) -> None:
        if _items(state) is None:
            raise _Unsure("BUILD on a global itself: the rules report it")
        raise _Unsure("SETITEMS onto a global itself: the resolver reports it")


class _PlainLiveSymbol(LiveSymbol):
    """A global the rules judge fine however it is called (``rules.PLAIN_SAFE_CALLS``) and
    whose calls the resolver only records: each call is recorded here as the resolver
    records it, and gives the one result the symbol holds (``made[0]``). Nothing judges
    these results apart: the rules look at no call of such a global, and a result is
    reported only when it is called or handed to a reconstructor, which ends the run."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Made:
        if len(args) == 2 and args[1] is _NEW:
            return self._instantiated(args[0])
        self.calls.append((self.step, args))
        return self.made[0]


class _PassingLiveSymbol(_PlainLiveSymbol):
    """An allowlisted reconstructor the rules judge fine however it is called, which calls or
    instantiates some of its arguments (numpy's ``_reconstruct``, copyreg's): called as
    ``_PlainLiveSymbol`` is; once the run is over its arguments are noted as the resolver
    notes them (``judge_records``: ``rules.pass_on``), and a computed value handed on is
    reported. Told apart by its exact type."""

    __slots__ = ()


class _UncalledLiveSymbol(LiveSymbol):
    """A global on the allowlist that the rules report when called (a value, a class the
    pickle should instantiate, a named gadget): a call ends the run; NEWOBJ is recorded."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Made:
        if len(args) == 2 and args[1] is _NEW:
            return self._instantiated(args[0])
        raise _Unsure("a call the rules report")


class LiveMade(_Live, Made):
    """A ``Made`` C can fill: what the resolver of a C run makes. Calling one is a call of a
    computed value, which the resolver reports. BUILD reaches the record's own list's
    ``append`` (its ``__setstate__`` slot), which C calls with no Python frame between: the
    states are judged in order once the run is over (``judge_records``), as the resolver
    judges each. joblib's array wrappers never reach here: their names end the run when
    they are named (``_kinds``)."""

    __slots__ = ("__setstate__",)

    def __init__(self, origin: Any, step: Step, args: tuple[Any, ...] = ()) -> None:
        self.origin = origin
        self.step = step
        self.args = args
        states: list[Any] = []
        self.states = states
        self.__setstate__ = states.append

    def __call__(self, *args: Any) -> Made:
        raise _Unsure("a call of a computed value: the resolver reports it")


def judge_records(resolver: RecordingResolver) -> None:
    """What the resolver would have judged as C went, judged once the run is over: the
    arguments each reconstructor handed on (``rules.pass_on``), and what C's BUILDs handed
    each record, in the order C handed it (a state the resolver reports, a second BUILD,
    SETITEMS after a state: ``hooks``; a SETITEMS C ran as a BUILD leaves the record's
    states). Raises ``_Unsure`` where the resolver would have noted something."""
    for symbol in resolver.symbols:
        passing = type(symbol) is _PassingLiveSymbol and symbol.calls
        if passing and passes_computed(symbol.key, symbol.calls):  # type: ignore[arg-type]
            raise _Unsure("a reconstructor handed a computed value: the resolver reports it")
        for made in symbol.made:
            if made.states:
                _judge_states(made)


def _judge_states(made: Made) -> None:
    handed = made.states
    if len(handed) == 1 and not _is_set_items(handed[0]):
        if _reported_state(handed[0]):
            raise _Unsure("BUILD of a state the resolver reports")
        return
    if _plain_tuples(handed):
        if hooks.repeated_build(made):
            raise _Unsure("a second BUILD on an object: the resolver reports it")
        return
    # the states so far, as the resolver holds them at each BUILD; the list C appended to
    # stays the record's (the scan's release empties it: a state may hold its own record)
    made.states = []
    try:
        for state in handed:
            if _is_set_items(state):
                _items(state)  # (an odd count ends the run)
                if hooks.item_hook(made, True) is not None:
                    raise _Unsure("SETITEMS through a method a state may have planted")
                continue
            made.states.append(state)
            if _reported_state(state):
                raise _Unsure("BUILD of a state the resolver reports")
        if hooks.repeated_build(made):
            raise _Unsure("a second BUILD on an object: the resolver reports it")
    finally:
        handed[:] = made.states
        made.states = handed


def _plain_tuples(states: list[Any]) -> bool:
    """Whether every state is a tuple but a pair, and none of their parts a dict or a marker
    (``object``): states the resolver reports nothing of (``_reported_state``) and no
    SETITEMS, told in C for all the arrays of a numpy pickle at once."""
    if set(map(type, states)) != _TUPLE:
        return False
    if 2 in set(map(len, states)):
        return False
    return set(map(type, chain.from_iterable(states))) <= _PLAIN_PARTS


def _is_set_items(state: Any) -> bool:
    return type(state) is tuple and bool(state) and state[-1] is _SET_ITEMS


def _reported_state(state: Any) -> bool:
    """``special_names(state) or hooks.opaque_state(state)``, quicker for the states model
    files hold: a tuple that is no pair (numpy's) is never opaque and has special names only
    in its dict parts; a dict is never opaque."""
    if type(state) is tuple and len(state) != 2:
        return any(isinstance(part, dict) and _special_keys(part) for part in state)
    if isinstance(state, dict):
        return _special_keys(state)
    return bool(special_names(state)) or hooks.opaque_state(state)


def _special_keys(state: dict[Any, Any]) -> bool:
    """Whether ``special_names`` finds a name among the keys of ``state``; a key can be one
    only if it opens with two underscores, which one search of the joined keys rules out
    for most attribute dicts (keys that are not all text are looked at one by one)."""
    try:
        joined = "\n".join(state)
    except TypeError:
        return bool(special_names(state))
    if not joined.startswith("__") and "\n__" not in joined:
        return False
    return bool(special_names(state))


_TUPLE: Final = {tuple}
# The parts of a state no rule looks into (no dict, no marker): what C builds of data.
_PLAIN_PARTS: Final = frozenset(
    {int, float, bool, str, bytes, tuple, list, type(None), LiveMade, LiveSymbol}
    | {_PlainLiveSymbol, _PassingLiveSymbol, _UncalledLiveSymbol}
)

_Kinds = dict[tuple[str, str] | None, type[LiveSymbol]]


def _kinds(recorded: frozenset[tuple[str, str]]) -> _Kinds:
    """Which record each global of the allowlist becomes in a C run, for a resolver that only
    records the calls of ``recorded``; a global not here ends the run."""
    found = _KINDS.get(recorded)
    if found is None:
        found = _KINDS[recorded] = {}
        for key in _MAY_BE_CLEAN:
            if key[1] in joblib_arrays.BUILT_NAMES:
                continue  # its BUILD reads the array bytes after it: the Python machine's
            if key not in recorded:
                passing = key in policy.PASSED_ON and key in PLAIN_SAFE_CALLS
                found[key] = _PassingLiveSymbol if passing else LiveSymbol
            elif key in PLAIN_SAFE_CALLS:
                found[key] = _PlainLiveSymbol
            else:
                found[key] = _UncalledLiveSymbol
    return found


_KINDS: dict[frozenset[tuple[str, str]], _Kinds] = {}
