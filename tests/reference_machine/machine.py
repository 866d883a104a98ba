"""The old machine's loop (reference only)."""

from __future__ import annotations

import time

from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError
from modelport.pickles.interface import DEFAULT_LIMITS, Limits, PickleResult, Resolver
from tests.reference_machine.opcodes import CODES, HANDLERS, Opcodes


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
    # -- the loop -------------------------------------------------------------------------
    def execute(self) -> PickleResult:
        """The loop. The opcodes that make up most of every real pickle (memo traffic, marks,
        short strings and ints, small tuples) run inline with exactly their handlers'
        semantics; the rest go through the handler table."""
        data = self.data
        size = len(data)
        memo = self.memo
        max_stack = self.limits.max_stack
        count = 0
        max_ops = self.limits.max_opcodes
        seconds = self.limits.max_seconds
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            pos = self.pos
            if pos >= size:
                raise TruncatedFileError(
                    f"pickle truncated: no STOP opcode before byte {pos}",
                    expected=pos + 1,
                    actual=size,
                )
            code = data[pos]
            self.op_offset = pos
            self.op_code = code
            pos += 1
            self.pos = pos
            count += 1
            if count > max_ops:
                raise LimitExceededError("pickle opcode count", max_ops, count)
            if deadline is not None and not count & 0xFFFF and time.monotonic() > deadline:
                spent = int(time.monotonic() - deadline + (seconds or 0))
                raise LimitExceededError("seconds spent on one pickle", int(seconds or 0), spent)
            stack = self.stack
            if code == _BININT1 and pos < size:
                self.pos = pos + 1
                stack.append(data[pos])
            elif code == _BINGET and pos < size and data[pos] in memo:
                self.pos = pos + 1
                stack.append(memo[data[pos]])
            elif code in _PUTS and stack and pos + _PUTS[code] <= size:
                end = pos + _PUTS[code]
                self.pos = end
                index = int.from_bytes(data[pos:end], "little")
                if index not in memo and len(memo) >= self.limits.max_memo:
                    limit = self.limits.max_memo
                    raise LimitExceededError("pickle memo size", limit, len(memo) + 1)
                memo[index] = stack[-1]
                continue
            elif code == _MARK and len(self.marks) < self.limits.max_marks:
                self.marks.append(stack)
                self.stack = []
                continue
            elif code == _TUPLE and self.marks:
                items = tuple(stack)
                stack = self.stack = self.marks.pop()
                stack.append(items)
            elif code in _TEXTS and pos + _TEXTS[code] <= size:
                width = _TEXTS[code]
                end = pos + width + int.from_bytes(data[pos : pos + width], "little")
                if end > size:
                    self.run_handler(code)
                    continue
                self.pos = end
                try:
                    stack.append(str(data[pos + width : end], "utf-8", "surrogatepass"))
                except UnicodeDecodeError:
                    raise CorruptFileError(f"pickle: invalid UTF-8 at byte {pos - 1}") from None
            elif code in _CONSTANTS:
                stack.append(_CONSTANTS[code])
            elif code == _TUPLE1 and stack:
                stack[-1] = (stack[-1],)
                continue
            elif code == _STOP:
                value = self.pop()
                return PickleResult(value, self.pos, self.protocol, count)
            else:
                self.run_handler(code)
                continue
            if len(stack) > max_stack:  # the inline branches that pushed
                raise LimitExceededError("pickle stack depth", max_stack, len(stack))

    def run_handler(self, code: int) -> None:
        """Every opcode through its handler (the inline fast path's fallback)."""
        handler = HANDLERS[code]
        if handler is None:
            raise CorruptFileError(f"pickle: unknown opcode 0x{code:02x} at byte {self.op_offset}")
        handler(self)


_BINGET, _BININT1, _STOP = CODES["BINGET"], CODES["BININT1"], CODES["STOP"]
_MARK, _TUPLE, _TUPLE1 = CODES["MARK"], CODES["TUPLE"], CODES["TUPLE1"]
# Inline opcodes by the width of their little-endian argument.
_PUTS = {CODES["BINPUT"]: 1, CODES["LONG_BINPUT"]: 4}
_TEXTS = {CODES["SHORT_BINUNICODE"]: 1, CODES["BINUNICODE"]: 4}
_CONSTANTS = {
    CODES["EMPTY_TUPLE"]: (),
    CODES["NEWFALSE"]: False,
    CODES["NEWTRUE"]: True,
    CODES["NONE"]: None,
}
