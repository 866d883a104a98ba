"""Which pickles the scan's fast path (``fast_scan``) may hand to CPython's C unpickler: a
walk over the opcodes admits only those whose effect C and the Python machine give
identically, with every argument inside the machine's bounds.

Admitted: data, the memo, containers, GLOBAL and STACK_GLOBAL, REDUCE, OBJ, NEWOBJ, BUILD,
BINPERSID. Refused, because C does them differently or cannot do them without the file's
code: NEWOBJ_EX (C wants a real class), EXT1/2/4 (C reads copyreg's registry),
NEXT_BUFFER/READONLY_BUFFER, the 8-byte lengths, POP and POP_MARK, the protocol 0 text
opcodes other than GLOBAL (their number syntax is C's ``strtol``), and DICT, EMPTY_SET,
ADDITEMS and FROZENSET, whose keys and items C hashes before any check (a key of tuples
shared through the memo unfolds to 2**60 tuples in 300 bytes, and hashing it never ends;
``keys``). Real files make sets through REDUCE and dicts with EMPTY_DICT, which C runs as
the GLOBAL of a dict that measures each key first (``_admitted``). The walk also holds C to
what the Python machine enforces: no length past the end, no memo index C would allocate an
array for (C's memo is indexed, the machine's a dict), LONG4 and text-line bounds, and fewer
opcodes than any ``Limits`` count, so no limit is reached.

C's NEWOBJ would want a real class, so C runs a copy in which each NEWOBJ pairs its argument
tuple with a marker global and REDUCEs (the record C calls sees the marker and knows it was
instantiated), each EMPTY_DICT is the checked dict's GLOBAL (both push an empty dict), and
each SETITEMS closes its items and a second marker into a tuple that BUILD hands to the
target (a checked dict measures the keys and stores them at once: one call from C for the
items of a dict instead of one for each).

There are two walks with one verdict. ``_by_opcode`` looks at every opcode in Python and
counts them. ``_by_runs`` hands runs of opcodes to one regular expression, which checks in C
what it can (fixed widths, strings under ``_SHORT`` bytes, memo indexes, GLOBAL's lines),
and looks in Python only at the opcodes it stops at (STOP, NEWOBJ, EMPTY_DICT, SETITEMS, a
FRAME, a longer string). It is about three times as fast but counts nothing, so it takes only
pickles of fewer bytes than the opcodes they may hold; and compiling it costs about as much
as walking 50 KiB by opcode, so a process compiles it once it has walked 64 KiB.
"""

from __future__ import annotations

import pickletools
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from modelport.limits import MAX_PICKLE_SHORT_LINE

__all__ = ["Admitted", "admit"]

# ``match`` of an expression of the form ``(...)*+``, which matches at every position.
_Match = Callable[[bytes, int], re.Match[bytes]]

_CODES: Final = {op.name: op.code.encode("latin-1")[0] for op in pickletools.opcodes}
# Opcodes whose whole argument has a fixed width, and the width with the opcode byte.
_FIXED: Final = {
    **dict.fromkeys(
        [
            *("DUP", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2"),
            *("TUPLE3", "EMPTY_LIST", "LIST", "APPEND", "SETITEM", "MEMOIZE"),
            *("REDUCE", "BUILD", "BINPERSID", "STACK_GLOBAL", "OBJ"),
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
_NEWOBJ, _REDUCE = _CODES["NEWOBJ"], _CODES["REDUCE"]
_EMPTY_DICT, _TUPLE2 = _CODES["EMPTY_DICT"], _CODES["TUPLE2"]
# What C runs for each EMPTY_DICT: a GLOBAL that ``fast_scan``'s ``find_class`` answers with
# a dict that measures each key before hashing it; for each NEWOBJ, a GLOBAL it answers
# with a marker, paired with the argument tuple and REDUCEd; for each SETITEMS, a GLOBAL it
# answers with another marker, closing the items into a tuple that BUILD hands to the
# target's ``__setstate__`` (one call for the items of a dict, not one for each). No pickle
# C runs names these: their common prefix (ASCII, so the same bytes in every string
# opcode) appears nowhere in one.
CHECKED_DICT: Final = ("modelport", "modelport: checked dict")
NEW_MARKER: Final = ("modelport", "modelport: instantiated")
SET_ITEMS_MARKER: Final = ("modelport", "modelport: set items")
_OURS: Final = b"modelport: "
_SET_ITEMS = _CODES["SETITEMS"]


def _global(name: tuple[str, str]) -> bytes:
    return b"c%s\n%s\n" % (name[0].encode(), name[1].encode())


# The opcodes C runs otherwise, and what it runs instead.
_CHANGED: Final = {
    _EMPTY_DICT: _global(CHECKED_DICT),
    _NEWOBJ: _global(NEW_MARKER) + bytes([_TUPLE2, _REDUCE]),
    _SET_ITEMS: _global(SET_ITEMS_MARKER) + bytes([_CODES["TUPLE"], _CODES["BUILD"]]),
}
_U32, _U64 = struct.Struct("<I").unpack_from, struct.Struct("<Q").unpack_from
_MAX_LONG4 = 1 << 16  # the Python machine's own bound (opcodes.op_long4)
# C grows its memo array to twice a new index and clears every slot: an index costs
# 16 bytes of memory per unit, so a crafted one could ask for gigabytes.
_MAX_MEMO_INDEX = 1 << 16
_HIGHEST_PROTOCOL = 5  # the Python machine's (opcodes.op_proto), and C's in Python 3.11
# The walk copies this much first; a pickle that runs on is walked whole up to the last
# (past it the Python machine, which never copies, takes the pickle). The windows also
# bound the walk's work when a pickle holds more opcodes than it may.
_FIRST_WINDOW, _LAST_WINDOW = 1 << 17, 1 << 22
_SHORT = 64  # strings the expression checks: it spells out one branch per length (names fit)
# The first two bytes of a string constant that may hold a nested payload
# (``hooks.payloads``): a pickle's PROTO 2-5, a zip's "PK", numpy's magic, as bytes or
# latin-1 text, or as UTF-8 text (``hooks.encoded_payload``: U+0080 and U+0093 are led by
# 0xc2). A pickle with none is not searched for payloads (``hooks.may_hold_payload``):
# nothing in it can open like one. The expression leaves each string whose first byte
# is one of theirs (``_PAYLOAD_FIRST``) for the walk to look at.
_PAYLOAD_PAIRS: Final = frozenset(
    {*(bytes([0x80, protocol]) for protocol in range(2, 6)), b"PK", b"\x93N", b"\xc2\x80"}
    | {b"\xc2\x93"}
)
_PAYLOAD_FIRST: Final = frozenset(pair[0] for pair in _PAYLOAD_PAIRS)
_COMPILE_AFTER = 1 << 16  # bytes walked by opcode before the expression is compiled
# What a walk may say besides the end: refused is None.
_RAN_OUT, _TOO_LONG, _UNCOUNTED = -1, -2, -3


@dataclass(frozen=True, slots=True)
class Admitted:
    """A pickle C may run: the bytes it runs, from the pickle's first (each NEWOBJ a REDUCE
    of its arguments and the marker, each EMPTY_DICT the GLOBAL of a checked dict, each
    SETITEMS a BUILD of its items and another marker), and
    where the pickle ends (just past STOP) in its own bytes and in those C runs; whether a
    string constant opens with bytes a nested payload opens with (``_PAYLOAD_PAIRS``)."""

    program: bytes
    end: int
    program_end: int
    opens_like_payload: bool


def admit(data: memoryview, start: int, most: int) -> Admitted | None:
    """The pickle at ``start`` if C may run it holding no more than ``most`` opcodes;
    None when it may not. The walk copies the bytes (indexing bytes is twice as fast as a
    view): the first ``_FIRST_WINDOW``, then all up to the last when the pickle runs on."""
    for window in (_FIRST_WINDOW, _LAST_WINDOW):
        chunk = bytes(data[start : start + window])
        changed: list[int] = []
        heads: list[int] = []
        end = _walk(chunk, most, changed, heads)
        if end is None:
            return None
        if end >= 0:
            if chunk.find(_OURS, 0, end) >= 0:
                return None  # the pickle may name the checked dict or the marker itself
            return _admitted(chunk, end, changed, bool(heads))
        if len(chunk) < window:
            return None  # the bytes end before STOP
    return None


def _admitted(chunk: bytes, end: int, changed: list[int], heads: bool) -> Admitted:
    """C hashes the keys of the dicts it makes before anything can look at them: a key of
    tuples shared through the memo can unfold to 2**60 tuples and hang there. So C makes
    no dict of its own: each EMPTY_DICT becomes a GLOBAL of the checked dict (``fast_scan``),
    which measures each key as the Python machine does (``keys.bounded_key``). The walk
    refuses the other opcodes that hash in C (DICT, EMPTY_SET, ADDITEMS, FROZENSET). Each
    NEWOBJ becomes the marker's GLOBAL, TUPLE2 and REDUCE: C calls the class with the
    argument tuple and the marker. Each SETITEMS becomes its marker's GLOBAL, TUPLE and
    BUILD: the target's ``__setstate__`` gets the items and the marker in one tuple."""
    if not changed:
        return Admitted(chunk, end, end, heads)
    parts: list[bytes] = []
    last = 0
    for at in changed:
        parts += [chunk[last:at], _CHANGED[chunk[at]]]
        last = at + 1
    parts.append(chunk[last:end])
    program = b"".join(parts)
    return Admitted(program, end, len(program), heads)


def _walk(chunk: bytes, most: int, changed: list[int], heads: list[int]) -> int | None:
    """Where the pickle ends in ``chunk``, with ``changed`` holding where each opcode C runs
    otherwise is and ``heads`` where each string constant opening like a payload is; None
    when refused, ``_RAN_OUT`` when the bytes end first."""
    expressions = _EXPRESSIONS
    if expressions.ready():
        end = _by_runs(chunk, most, expressions.match(), changed, heads)
        if end != _UNCOUNTED:
            return end
        changed.clear()
        heads.clear()
    end = _by_opcode(chunk, most, changed, heads)
    if end is not None and end > 0:
        expressions.bytes_walked += end
    return end


def _by_opcode(data: bytes, most: int, changed: list[int], heads: list[int]) -> int | None:
    """The opcodes of ``data`` up to STOP, one by one and counted: the end, None when one is
    refused or there are more than ``most``, ``_RAN_OUT`` when the bytes end first. (Past
    the end, indexing raises: that is how the end is found.) Each opcode C runs otherwise
    (``_CHANGED``) is noted in ``changed``, each string constant whose first byte a payload
    may open with in ``heads``."""
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
            elif code in _CHANGED:
                changed.append(pos)
                pos += 1
            elif code in counted:
                past = _past_counted(data, pos, code, heads)
                if past is None:
                    return None
                pos = past
            elif code == _LONG_BINPUT:
                if _U32(data, pos + 1)[0] >= _MAX_MEMO_INDEX:
                    return None
                pos += 5
            elif code == _STOP:
                return pos + 1
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


def _by_runs(
    data: bytes, most: int, match: _Match, changed: list[int], heads: list[int]
) -> int | None:
    """The walk of ``_by_opcode``, the expression taking each run of opcodes it can check;
    ``_UNCOUNTED`` once the bytes walked are as many as the opcodes allowed (opcodes are at
    least a byte each, so below that no count is needed). The opcodes C runs otherwise it leaves
    are noted in ``changed``. A MARK the expression leaves is one the next opcode (PROTO,
    FRAME, APPENDS) makes odd: refused."""
    counted, pos = _COUNTED, 0
    try:
        while True:
            pos = match(data, pos).end()
            if pos >= most:
                return _UNCOUNTED
            code = data[pos]
            if code in _CHANGED:
                changed.append(pos)
                pos += 1
            elif code == _STOP:
                return pos + 1
            elif code in counted:  # ``_SHORT`` bytes or more, opening like a payload, bad length
                past = _past_counted(data, pos, code, heads)
                if past is None:
                    return None
                pos = past
            elif code == _GLOBAL:
                pos = _past_lines(data, pos + 1)
                if pos < 0:
                    return None if pos == _TOO_LONG else _RAN_OUT
            elif code == _FRAME:
                if _U64(data, pos + 1)[0] > len(data) - pos - 9:
                    return _RAN_OUT
                pos += 9
            else:
                return None
    except (IndexError, struct.error):
        return _RAN_OUT


def _past_counted(data: bytes, pos: int, code: int, heads: list[int]) -> int | None:
    """Past the string (or LONG1/LONG4) at ``pos``: its length and that many bytes; None
    for a length the Python machine refuses (negative, a LONG4 past its bound). A constant
    whose first bytes a payload may open with is noted in ``heads``."""
    length, head = _COUNTED[code]
    n = length.unpack_from(data, pos + 1)[0]
    if n < 0 or (code == _LONG4 and n > _MAX_LONG4):
        return None
    if n > 1 and data[pos + head : pos + head + 2] in _PAYLOAD_PAIRS:
        heads.append(pos)
    return int(pos + head + n)


def _past_lines(data: bytes, pos: int) -> int:
    """Past GLOBAL's two lines, each of at least one character (C refuses an empty one) and
    short enough for the Python machine; ``_TOO_LONG`` when one is not, ``_RAN_OUT`` when
    the bytes end first."""
    for _ in range(2):
        end = data.find(b"\n", pos, pos + MAX_PICKLE_SHORT_LINE)
        if end < 0:
            return _RAN_OUT if pos + MAX_PICKLE_SHORT_LINE > len(data) else _TOO_LONG
        if end == pos:
            return _TOO_LONG
        pos = end + 1
    return pos


def _opening(n: int) -> bytes:
    """``n`` bytes of a string constant, the first not one a payload may open with."""
    first = b"".join(re.escape(bytes([byte])) for byte in sorted(_PAYLOAD_FIRST))
    return b"[^%s].{%d}" % (first, n - 1) if n else b""


def _expression() -> re.Pattern[bytes]:
    """Any run of the opcodes ``_by_runs`` need not look at: those of fixed width, strings
    under ``_SHORT`` bytes not opening like a payload (``_PAYLOAD_FIRST``), LONG_BINPUT
    under the memo bound, a MARK not followed by PROTO, FRAME or APPENDS, PROTO up to the
    highest, GLOBAL with lines the machine reads."""

    def one_of(*names: str) -> bytes:
        return b"[" + b"".join(re.escape(bytes([_CODES[name]])) for name in names) + b"]"

    def strings(names: tuple[str, ...], zeros: int) -> bytes:
        lengths = (re.escape(bytes([n]) + bytes(zeros)) + _opening(n) for n in range(_SHORT))
        return one_of(*names) + b"(?:" + b"|".join(lengths) + b")"

    single = one_of(*(name for name, width in _FIXED.items() if width == 1))
    line = b"[^\n]{1,%d}\n" % (MAX_PICKLE_SHORT_LINE - 1)
    # Each token opens with opcodes no other token opens with, so their order changes
    # nothing the expression matches; the engine tries them in turn, so the commonest come
    # first (in torch's protocol 2 pickles: BINGET, BINPUT, LONG_BINPUT, text).
    tokens = [
        one_of("BININT1", "BINGET", "BINPUT") + b".",
        one_of("LONG_BINPUT") + b"..\x00\x00",  # an index under _MAX_MEMO_INDEX
        strings(("BINUNICODE", "BINBYTES", "BINSTRING", "LONG4"), 3),
        single,
        one_of("MARK") + b"(?!" + one_of("PROTO", "FRAME", "APPENDS") + b")",
        strings(("SHORT_BINUNICODE", "SHORT_BINBYTES", "SHORT_BINSTRING", "LONG1"), 0),
        one_of("BININT", "LONG_BINGET") + b"....",
        one_of("BININT2") + b"..",
        one_of("BINFLOAT") + b".{8}",
        one_of("GLOBAL") + line + line,
        one_of("PROTO") + b"[\x00-%c]" % _HIGHEST_PROTOCOL,
        one_of("APPENDS"),
    ]
    # each token takes the one-byte opcodes after it too: a run of them costs the engine
    # one repetition of the whole alternation, not one each
    return re.compile(b"(?:(?:" + b"|".join(tokens) + b")" + single + b"*+)*+", re.DOTALL)


class _Expressions:
    """``_by_runs``'s expression, compiled when first needed once the process has walked
    ``after`` bytes by opcode: a process that scans one small file never pays for it."""

    __slots__ = ("after", "bytes_walked", "compiled")

    def __init__(self, after: int) -> None:
        self.after = after
        self.bytes_walked = 0
        self.compiled: _Match | None = None

    def ready(self) -> bool:
        return self.bytes_walked >= self.after

    def match(self) -> _Match:
        if self.compiled is None:
            self.compiled = _expression().match  # type: ignore[assignment]  # see _Match
        return self.compiled  # type: ignore[return-value]  # see _Match


_EXPRESSIONS = _Expressions(_COMPILE_AFTER)
