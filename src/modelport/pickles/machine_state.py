"""The pickle machine's state and its primitives: the bytes and a position in them, the
stack, the mark stack and the memo, each bounded by the pickle's ``Limits``. The opcodes
(``opcodes``) and the loop (``machine``) are built on these."""

from __future__ import annotations

import pickletools
import struct
from collections.abc import Callable
from typing import Any

from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError
from modelport.limits import MAX_PICKLE_SHORT_LINE, MAX_PICKLE_TEXT_LINE
from modelport.pickles.interface import Limits, Resolver, Step
from modelport.pickles.records import ByteSpan, FileBytes
from modelport.tensors import Storage

# Opcode names by byte, from pickletools (the stdlib's own table of protocols 0-5).
NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
CODES = {name: code for code, name in NAMES.items()}
_STRING, _UNICODE = CODES["STRING"], CODES["UNICODE"]
_QUOTES = (b"'", b'"')


class MachineState:
    def __init__(self, data: memoryview, resolver: Resolver, start: int, limits: Limits) -> None:
        self.data = data
        self.pos = start
        self.resolver = resolver
        self.limits = limits
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.protocol = 0
        self.op_offset = start
        self.frame_end = start  # where the last FRAME's bytes end
        self.op_code = -1
        # A reading resolver knows where the pickle's bytes lie (``storage_of``); a scan's does not.
        self.storage_of: Callable[[ByteSpan], Storage] | None = getattr(
            resolver, "storage_of", None
        )

    @property
    def step(self) -> Step:
        """Where the machine is, built only when a resolver or an error needs it."""
        return Step(self.op_offset, NAMES.get(self.op_code, ""), self)

    # -- reading primitives -------------------------------------------------------------
    @property
    def position(self) -> int:
        return self.pos

    def read(self, n: int) -> memoryview:
        return self._take(n)

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0:
            raise CorruptFileError(f"pickle: negative length at byte {self.step.offset}")
        if end > len(self.data):
            raise TruncatedFileError(
                f"pickle truncated: opcode {self.step.opcode} at byte {self.step.offset} "
                f"needs {n} bytes, {len(self.data) - self.pos} remain",
                expected=end,
                actual=len(self.data),
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def _line(self) -> bytes:
        limit = min(len(self.data), self.pos + self._line_bound())
        window = 64
        while True:
            stop = min(limit, self.pos + window)
            end = bytes(self.data[self.pos : stop]).find(b"\n")
            if end >= 0:
                line = bytes(self.data[self.pos : self.pos + end])
                self.pos += end + 1
                return line
            if stop >= limit and limit == len(self.data):
                raise TruncatedFileError(
                    f"pickle truncated: unterminated text argument at byte {self.pos}",
                    expected=limit + 1,
                    actual=limit,
                )
            if stop >= limit:
                raise CorruptFileError(f"pickle: text argument too long at byte {self.pos}")
            window *= 16

    def _line_bound(self) -> int:
        if self.op_code == _UNICODE:
            return MAX_PICKLE_TEXT_LINE
        if self.op_code == _STRING and bytes(self.data[self.pos : self.pos + 1]) in _QUOTES:
            return MAX_PICKLE_TEXT_LINE
        return MAX_PICKLE_SHORT_LINE

    def _u(self, fmt: str, n: int) -> int:
        value: int = struct.unpack(fmt, self._take(n))[0]
        return value

    def _payload(self, n: int) -> bytes | ByteSpan:
        """Bytes above ``inline_bytes`` stay in place; a reading resolver's are located
        (``FileBytes``), so that a value held in any container can be read later."""
        if n > self.limits.inline_bytes:
            start = self.pos
            self._take(n)
            span = ByteSpan(start, n)
            if self.storage_of is None:
                return span
            return FileBytes(start, n, self.storage_of(span))
        return bytes(self._take(n))

    # -- stack helpers ------------------------------------------------------------------
    def push(self, value: Any) -> None:
        self.stack.append(value)
        if len(self.stack) > self.limits.max_stack:
            raise LimitExceededError("pickle stack depth", self.limits.max_stack, len(self.stack))

    def pop(self) -> Any:
        if not self.stack:
            raise CorruptFileError(
                f"pickle: stack underflow at byte {self.step.offset} ({self.step.opcode})"
            )
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise CorruptFileError(
                f"pickle: no MARK for {self.step.opcode} at byte {self.step.offset}"
            )
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def top(self) -> Any:
        if not self.stack:
            raise CorruptFileError(
                f"pickle: empty stack at byte {self.step.offset} ({self.step.opcode})"
            )
        return self.stack[-1]

    def memo_get(self, index: int) -> Any:
        try:
            return self.memo[index]
        except KeyError:
            raise CorruptFileError(
                f"pickle: memo key {index} not found at byte {self.step.offset}"
            ) from None

    def memo_put(self, index: int, value: Any) -> None:
        if index < 0:
            raise CorruptFileError(f"pickle: negative memo key at byte {self.step.offset}")
        if len(self.memo) >= self.limits.max_memo and index not in self.memo:
            raise LimitExceededError("pickle memo size", self.limits.max_memo, len(self.memo) + 1)
        self.memo[index] = value
