"""A pickle machine that interprets opcodes without importing or calling anything.

The stdlib unpickler resolves GLOBAL by importing and REDUCE by calling; that is how a
pickle runs code. This machine keeps the stack, the mark stack and the memo exactly as
the stdlib does for protocols 0-5, but hands every operation with a meaning (naming a
global, calling, instantiating, BUILD, persistent ids, extension codes, out-of-band
buffers) to a ``Resolver``. The reading resolver maps an explicit allowlist to modelport's
own pure reconstructors and turns the rest into inert records; the scanner's resolver
records how each global is used. The loop is iterative, every resource is bounded, and
large byte payloads stay in place as ``ByteSpan``s.

Speed: a scan is mostly this loop, so the opcodes that make up nearly every real pickle run
inline on local variables, in the order of how often torch and numpy pickles use them. An
inline branch runs only when its opcode cannot fail (its argument is all there, the stack
holds what it pops, the memo has room); every other case, and every other opcode, goes to
the opcode's handler in ``opcodes``, which gives the one exact error or result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from struct import Struct
from typing import Any

from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError
from modelport.pickles.interface import DEFAULT_LIMITS, Limits, PickleResult, Resolver, Step
from modelport.pickles.keys import bounded_key
from modelport.pickles.machine_state import CODES
from modelport.pickles.opcodes import HANDLERS, Opcodes


def run(
    data: bytes | memoryview,
    resolver: Resolver,
    *,
    start: int = 0,
    limits: Limits = DEFAULT_LIMITS,
) -> PickleResult:
    """Interpret one pickle beginning at ``start`` of ``data`` up to its STOP opcode."""
    return _Machine(memoryview(data).cast("B"), resolver, start, limits).execute()


class _Machine(Opcodes):
    tight_until = 0  # the stack limit is checked before every opcode until this count

    def execute(self) -> PickleResult:
        try:
            return self._loop()
        except UnicodeDecodeError:  # raised inline only by the text opcodes, at op_offset
            if self.data[self.op_offset] in (_BINUNICODE, _SHORT_BINUNICODE):
                raise CorruptFileError(f"pickle: invalid UTF-8 at byte {self.op_offset}") from None
            raise

    def _loop(self) -> PickleResult:
        data, decode = self._fast_bytes()
        memo, marks, stack, pos = self.memo, self.marks, self.stack, self.pos
        size, resolver, deadline = len(data), self.resolver, self._deadline()
        safe_end = size - 9  # before it, every fixed-width argument is whole
        max_memo, max_marks, count = self.limits.max_memo, self.limits.max_marks, 0
        check_at, memo_room, marks_room = self._check_limits(count, pos, stack, deadline)
        while pos < safe_end:
            if count >= check_at:
                check_at, memo_room, marks_room = self._check_limits(count, pos, stack, deadline)
            code = data[pos]
            count += 1
            if code == _BINGET and (key := data[pos + 1]) in memo:
                stack.append(memo[key])
                pos += 2
            elif code == _BINPUT and stack and (memo_room or len(memo) < max_memo):
                memo[data[pos + 1]] = stack[-1]
                pos += 2
            elif code == _BININT1:
                stack.append(data[pos + 1])
                pos += 2
            elif code == _LONG_BINPUT and stack and (memo_room or len(memo) < max_memo):
                memo[_U32(data, pos + 1)[0]] = stack[-1]
                pos += 5
            elif code == _MARK and (marks_room or len(marks) < max_marks):
                marks.append(stack)
                stack = []
                pos += 1
            elif code == _TUPLE and marks:
                item = tuple(stack)
                stack = marks.pop()
                stack.append(item)
                pos += 1
            elif code == _REDUCE and len(stack) > 1 and isinstance(stack[-1], tuple):
                args = stack.pop()
                self.pos, self.op_offset, self.op_code = pos + 1, pos, code
                stack[-1] = resolver.call(stack[-1], args, Step(pos, "REDUCE", self))
                pos = self.pos
            elif code == _BINUNICODE and (end := pos + 5 + _U32(data, pos + 1)[0]) <= size:
                self.op_offset = pos
                stack.append(decode(data[pos + 5 : end], "utf-8", "surrogatepass"))
                pos = end
            elif code == _EMPTY_TUPLE:
                stack.append(())
                pos += 1
            elif code == _SHORT_BINUNICODE and (end := pos + 2 + data[pos + 1]) <= size:
                self.op_offset = pos
                stack.append(decode(data[pos + 2 : end], "utf-8", "surrogatepass"))
                pos = end
            elif code == _MEMOIZE and stack and (memo_room or len(memo) < max_memo):
                memo[len(memo)] = stack[-1]
                pos += 1
            elif code in _SMALL_TUPLES and len(stack) >= (width := _SMALL_TUPLES[code]):
                stack[-width:] = [tuple(stack[-width:])]
                pos += 1
            elif code in _CONSTANTS:
                stack.append(_CONSTANTS[code]())
                pos += 1
            elif code == _BINPERSID and stack:
                stack[-1] = resolver.persistent_load(stack[-1], self._at(pos, code, "BINPERSID"))
                pos = self.pos
            elif code == _BUILD and len(stack) > 1:
                state = stack.pop()
                stack[-1] = resolver.build(stack[-1], state, self._at(pos, code, "BUILD"))
                pos = self.pos
            elif code == _SETITEMS and marks and not len(stack) % 2 and _dict_on_top(marks[-1]):
                items, stack = stack, marks.pop()
                self._set_items(stack, items, pos, code)
                pos += 1
            elif code in _FIXED_WIDTH:
                unpack, width = _FIXED_WIDTH[code]
                stack.append(unpack(data, pos + 1)[0])
                pos += width
            elif code == _STOP:
                return self._stop(pos, stack, count)
            else:
                pos, stack = self._handle(code, pos, stack)
        return self._finish(pos, stack, count, check_at, deadline)

    def _finish(
        self, pos: int, stack: list[Any], count: int, check_at: int, deadline: float | None
    ) -> PickleResult:
        """The last bytes, where an argument may be cut short: every opcode by its handler."""
        while True:
            if count >= check_at:
                check_at = self._check_limits(count, pos, stack, deadline)[0]
            try:
                code = self.data[pos]
            except IndexError:
                raise self._no_stop(pos) from None
            count += 1
            if code == _STOP:
                return self._stop(pos, stack, count)
            pos, stack = self._handle(code, pos, stack)

    def _stop(self, pos: int, stack: list[Any], count: int) -> PickleResult:
        self.pos, self.stack, self.op_offset, self.op_code = pos + 1, stack, pos, _STOP
        return PickleResult(self.pop(), pos + 1, self.protocol, count)

    def _fast_bytes(self) -> tuple[bytes | memoryview, Callable[..., str]]:
        """The bytes to interpret and how to decode UTF-8 from them: a copy when it is small
        (indexing, slicing and decoding bytes is about twice as fast as a memoryview), the
        view itself when copying would cost more than interpreting a pickle in it."""
        if len(self.data) <= _COPY_AT_MOST:
            return self.data.tobytes(), bytes.decode
        return self.data, str

    def _handle(self, code: int, pos: int, stack: list[Any]) -> tuple[int, list[Any]]:
        """One opcode through its handler, on the machine's own state."""
        handler = HANDLERS[code]
        if handler is None:
            raise CorruptFileError(f"pickle: unknown opcode 0x{code:02x} at byte {pos}")
        self.pos, self.stack, self.op_offset, self.op_code = pos + 1, stack, pos, code
        handler(self)
        return self.pos, self.stack

    def _at(self, pos: int, code: int, name: str) -> Step:
        """Where a resolver is called from; its cursor reads on from just past the opcode."""
        self.pos, self.op_offset, self.op_code = pos + 1, pos, code
        return Step(pos, name, self)

    def _set_items(self, stack: list[Any], items: list[Any], pos: int, code: int) -> None:
        """SETITEMS of key-value ``items`` on the dict on top of ``stack``, in order; a key
        the dict refuses raises what the handler raises, after the pairs before it were set
        (as the handler sets them)."""
        if tuple in map(type, items[::2]):  # keys of tuples: each hashed only if bounded
            self.stack, self.op_offset, self.op_code = stack, pos, code
            for key in items[::2]:
                bounded_key(key)
        try:
            stack[-1].update(zip(items[::2], items[1::2], strict=True))
        except TypeError as exc:
            self.stack, self.op_offset, self.op_code = stack, pos, code
            for key in items[::2]:
                self._hashable(key)
            raise exc from None

    def _deadline(self) -> float | None:
        seconds = self.limits.max_seconds
        return None if seconds is None else time.monotonic() + seconds

    def _check_limits(
        self, count: int, pos: int, stack: list[Any], deadline: float | None
    ) -> tuple[int, bool, bool]:
        """The limits the loop does not test at every opcode, tested when one of them can be
        reached: ``count`` opcodes have run and the next is at ``pos``. Returns the count at
        which to look again, and whether the memo and the mark stack have room for every
        opcode until then (each opcode adds at most one entry to either).

        Each opcode makes the tallest stack (the current one or one under a mark) at most one
        item taller, so none can pass ``max_stack`` sooner than that allows; the check runs
        before the opcode after the one that could have, the one stack it can be is the
        current one, and the error is the one the machine raised at that opcode. Measuring
        the stacks under the marks costs one step per mark: when the tallest is too close to
        the limit for that to be repaid, the current stack alone is checked before every
        opcode for as many opcodes as there are marks."""
        limits = self.limits
        if len(stack) > limits.max_stack:
            raise LimitExceededError("pickle stack depth", limits.max_stack, len(stack))
        number = count + 1  # of the opcode at pos
        if number > limits.max_opcodes or (
            deadline is not None and not number & 0xFFFF and time.monotonic() > deadline
        ):
            if pos >= len(self.data):
                raise self._no_stop(pos)
            self.op_offset, self.op_code = pos, self.data[pos]
            if number > limits.max_opcodes:
                raise LimitExceededError("pickle opcode count", limits.max_opcodes, number)
            seconds = limits.max_seconds or 0
            spent = int(time.monotonic() - deadline + seconds) if deadline is not None else 0
            raise LimitExceededError("seconds spent on one pickle", int(seconds), spent)
        check_at = min(limits.max_opcodes, self._stack_check_at(count, stack))
        if deadline is not None:
            check_at = min(check_at, number | 0xFFFF)
        for room in (limits.max_memo, limits.max_marks):
            if count < room:
                check_at = min(check_at, room)
        return check_at, count < limits.max_memo, count < limits.max_marks

    def _stack_check_at(self, count: int, stack: list[Any]) -> int:
        if count < self.tight_until:
            return count + 1
        tallest = max(len(stack), max((len(marked) for marked in self.marks), default=0))
        gap = self.limits.max_stack - tallest + 1
        if gap <= len(self.marks):
            self.tight_until = count + len(self.marks)
            return count + 1
        return count + gap

    def _no_stop(self, pos: int) -> TruncatedFileError:
        return TruncatedFileError(
            f"pickle truncated: no STOP opcode before byte {pos}",
            expected=pos + 1,
            actual=len(self.data),
        )


_U32 = Struct("<I").unpack_from
_COPY_AT_MOST = 1 << 20
_BINGET, _BININT1, _STOP = CODES["BINGET"], CODES["BININT1"], CODES["STOP"]
_BINPUT, _LONG_BINPUT, _MEMOIZE = CODES["BINPUT"], CODES["LONG_BINPUT"], CODES["MEMOIZE"]
_MARK, _TUPLE = CODES["MARK"], CODES["TUPLE"]
_REDUCE, _BINPERSID, _BUILD = CODES["REDUCE"], CODES["BINPERSID"], CODES["BUILD"]
_SHORT_BINUNICODE, _BINUNICODE = CODES["SHORT_BINUNICODE"], CODES["BINUNICODE"]
_SETITEMS, _EMPTY_TUPLE = CODES["SETITEMS"], CODES["EMPTY_TUPLE"]
# Opcodes that push the number in their fixed-width argument: how to read it, and the
# opcode's width with it.
_FIXED_WIDTH: dict[int, tuple[Callable[[Any, int], tuple[Any, ...]], int]] = {
    CODES["BININT2"]: (Struct("<H").unpack_from, 3),
    CODES["BININT"]: (Struct("<i").unpack_from, 5),
    CODES["BINFLOAT"]: (Struct(">d").unpack_from, 9),
}
# TUPLE1-3 by how many items they take.
_SMALL_TUPLES = {CODES["TUPLE1"]: 1, CODES["TUPLE2"]: 2, CODES["TUPLE3"]: 3}
# Opcodes that push a constant or a new empty container, and what makes it.
_CONSTANTS: dict[int, Callable[[], Any]] = {
    CODES["NEWFALSE"]: bool,
    CODES["NEWTRUE"]: lambda: True,
    CODES["NONE"]: lambda: None,
    CODES["EMPTY_DICT"]: dict,
    CODES["EMPTY_LIST"]: list,
}


def _dict_on_top(stack: list[Any]) -> bool:
    return bool(stack) and type(stack[-1]) is dict
