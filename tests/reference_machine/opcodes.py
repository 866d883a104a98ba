"""The old machine's state, primitives and one method per opcode (reference only)."""

from __future__ import annotations

import pickletools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError
from modelport.pickles import text_args
from modelport.pickles.interface import Limits, Resolver
from modelport.pickles.records import ByteSpan


@dataclass(frozen=True)
class Step:
    """Where the machine is, as the old machine built it (a frozen dataclass)."""

    offset: int
    opcode: str
    cursor: Any


# Opcode names by byte, from pickletools (the stdlib's own table of protocols 0-5).
NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
CODES = {name: code for code, name in NAMES.items()}


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
        self.op_code = -1

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
        limit = min(len(self.data), self.pos + (1 << 20))
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

    def _u(self, fmt: str, n: int) -> int:
        value: int = struct.unpack(fmt, self._take(n))[0]
        return value

    def _payload(self, n: int) -> bytes | ByteSpan:
        if n > self.limits.inline_bytes:
            start = self.pos
            self._take(n)
            return ByteSpan(start, n)
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


class Opcodes(MachineState):
    def op_proto(self) -> None:
        self.protocol = self._u("<B", 1)
        if self.protocol > 5:
            raise CorruptFileError(f"pickle protocol {self.protocol} is not supported (max 5)")

    def op_frame(self) -> None:
        """Frames only group opcodes for buffered reading, but CPython reads each whole: one
        that claims more bytes than follow is a truncated pickle there, and here."""
        length = self._u("<Q", 8)
        if length > len(self.data) - self.pos:
            raise TruncatedFileError(
                f"pickle truncated: FRAME at byte {self.step.offset} claims {length} bytes, "
                f"{len(self.data) - self.pos} follow",
                expected=self.pos + length,
                actual=len(self.data),
            )

    def op_stop(self) -> None:  # handled in execute()
        pass

    def op_mark(self) -> None:
        self.marks.append(self.stack)
        if len(self.marks) > self.limits.max_marks:
            raise LimitExceededError("pickle MARK nesting", self.limits.max_marks, len(self.marks))
        self.stack = []

    def op_pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_pop_mark(self) -> None:
        self.pop_mark()

    def op_dup(self) -> None:
        self.push(self.top())

    # numbers
    def op_none(self) -> None:
        self.push(None)

    def op_newtrue(self) -> None:
        self.push(True)

    def op_newfalse(self) -> None:
        self.push(False)

    def op_int(self) -> None:
        self.push(text_args.int_or_bool(self._line(), self.step.offset))

    def op_long(self) -> None:
        self.push(text_args.long(self._line(), self.step.offset))

    def op_binint(self) -> None:
        self.push(self._u("<i", 4))

    def op_binint1(self) -> None:
        self.push(self._u("<B", 1))

    def op_binint2(self) -> None:
        self.push(self._u("<H", 2))

    def op_long1(self) -> None:
        n = self._u("<B", 1)
        self.push(int.from_bytes(self._take(n), "little", signed=True))

    def op_long4(self) -> None:
        n = self._u("<i", 4)
        if n > 1 << 16:
            raise LimitExceededError("pickle LONG4 size", 1 << 16, n)
        self.push(int.from_bytes(self._take(n), "little", signed=True))

    def op_float(self) -> None:
        self.push(text_args.float_(self._line(), self.step.offset))

    def op_binfloat(self) -> None:
        self.push(struct.unpack(">d", self._take(8))[0])

    # strings and bytes
    def op_string(self) -> None:
        self.push(text_args.quoted_string(self._line(), self.step.offset))

    def op_binstring(self) -> None:
        n = self._u("<i", 4)
        self.push(bytes(self._take(n)).decode("latin-1"))

    def op_short_binstring(self) -> None:
        self.push(bytes(self._take(self._u("<B", 1))).decode("latin-1"))

    def op_unicode(self) -> None:
        try:
            self.push(self._line().decode("raw-unicode-escape"))
        except UnicodeDecodeError:
            raise CorruptFileError(f"pickle: bad \\u escape at byte {self.op_offset}") from None

    def _text(self, n: int) -> str:
        try:
            return str(self._take(n), "utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise CorruptFileError(f"pickle: invalid UTF-8 at byte {self.step.offset}") from None

    def op_short_binunicode(self) -> None:
        self.push(self._text(self._u("<B", 1)))

    def op_binunicode(self) -> None:
        self.push(self._text(self._u("<I", 4)))

    def op_binunicode8(self) -> None:
        self.push(self._text(self._u("<Q", 8)))

    def op_short_binbytes(self) -> None:
        self.push(bytes(self._take(self._u("<B", 1))))

    def op_binbytes(self) -> None:
        self.push(self._payload(self._u("<I", 4)))

    def op_binbytes8(self) -> None:
        self.push(self._payload(self._u("<Q", 8)))

    def op_bytearray8(self) -> None:
        payload = self._payload(self._u("<Q", 8))
        self.push(bytearray(payload) if isinstance(payload, bytes) else payload)

    def op_next_buffer(self) -> None:
        self.push(self.resolver.next_buffer(self.step))

    def op_readonly_buffer(self) -> None:
        self.top()

    # containers
    def op_empty_tuple(self) -> None:
        self.push(())

    def op_tuple(self) -> None:
        self.push(tuple(self.pop_mark()))

    def op_tuple1(self) -> None:
        self.push((self.pop(),))

    def op_tuple2(self) -> None:
        b = self.pop()
        self.push((self.pop(), b))

    def op_tuple3(self) -> None:
        c = self.pop()
        b = self.pop()
        self.push((self.pop(), b, c))

    def op_empty_list(self) -> None:
        self.push([])

    def op_list(self) -> None:
        self.push(self.pop_mark())

    def op_empty_dict(self) -> None:
        self.push({})

    def op_dict(self) -> None:
        items = self.pop_mark()
        result: dict[Any, Any] = {}
        self._set_pairs(result, list(zip(items[::2], items[1::2], strict=False)))
        self.push(result)

    def op_empty_set(self) -> None:
        self.push(set())

    def op_frozenset(self) -> None:
        self.push(frozenset(self._hashable(v) for v in self.pop_mark()))

    def op_append(self) -> None:
        value = self.pop()
        self._append(self.top(), [value])

    def op_appends(self) -> None:
        items = self.pop_mark()
        self._append(self.top(), items)

    def _append(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, list):
            target.extend(items)
        elif isinstance(target, (set, frozenset, dict, tuple, str, bytes, int, float)):
            raise CorruptFileError(  # CPython's unpickler finds no append method on them
                f"pickle: APPEND onto a {type(target).__name__} at byte {self.step.offset}"
            )
        else:
            self.resolver.append(target, items, self.step)

    def op_additems(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if isinstance(target, set):
            target.update(self._hashable(v) for v in items)
        else:
            self.resolver.append(target, items, self.step)

    def op_setitem(self) -> None:
        value = self.pop()
        key = self.pop()
        self._set_pairs(self.top(), [(key, value)])

    def op_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise CorruptFileError(f"pickle: odd SETITEMS count at byte {self.step.offset}")
        self._set_pairs(self.top(), list(zip(items[::2], items[1::2], strict=True)))

    def _set_pairs(self, target: Any, pairs: list[tuple[Any, Any]]) -> None:
        if type(target) is dict:
            for key, value in pairs:
                target[self._hashable(key)] = value
        else:
            self.resolver.set_items(target, pairs, self.step)

    def _hashable(self, key: Any) -> Any:
        try:
            hash(key)
        except TypeError:
            raise CorruptFileError(
                f"pickle: unhashable {type(key).__name__} used as a key at byte {self.step.offset}"
            ) from None
        return key

    # memo
    def op_put(self) -> None:
        self.memo_put(text_args.integer(self._line(), self.step.offset), self.top())

    def op_binput(self) -> None:
        self.memo_put(self._u("<B", 1), self.top())

    def op_long_binput(self) -> None:
        self.memo_put(self._u("<I", 4), self.top())

    def op_memoize(self) -> None:
        self.memo_put(len(self.memo), self.top())

    def op_get(self) -> None:
        self.push(self.memo_get(text_args.integer(self._line(), self.step.offset)))

    def op_binget(self) -> None:
        self.push(self.memo_get(self._u("<B", 1)))

    def op_long_binget(self) -> None:
        self.push(self.memo_get(self._u("<I", 4)))

    # the operations that carry meaning: all delegated
    def op_global(self) -> None:
        module = self._line().decode("utf-8", "replace")
        name = self._line().decode("utf-8", "replace")
        self.push(self.resolver.find_global(module, name, self.step))

    def op_stack_global(self) -> None:
        name = self.pop()
        module = self.pop()
        self.push(self.resolver.find_global(module, name, self.step))

    def op_reduce(self) -> None:
        args = self.pop()
        func = self.pop()
        if not isinstance(args, tuple):
            raise CorruptFileError(
                f"pickle: REDUCE arguments are not a tuple at byte {self.step.offset}"
            )
        self.push(self.resolver.call(func, args, self.step))

    def op_inst(self) -> None:
        module = self._line().decode("utf-8", "replace")
        name = self._line().decode("utf-8", "replace")
        args = tuple(self.pop_mark())
        cls = self.resolver.find_global(module, name, self.step)
        self.push(self.resolver.call(cls, args, self.step))

    def op_obj(self) -> None:
        items = self.pop_mark()
        if not items:
            raise CorruptFileError(f"pickle: OBJ without a class at byte {self.step.offset}")
        self.push(self.resolver.call(items[0], tuple(items[1:]), self.step))

    def op_newobj(self) -> None:
        args = self.pop()
        cls = self.pop()
        if not isinstance(args, tuple):
            raise CorruptFileError(
                f"pickle: NEWOBJ arguments are not a tuple at byte {self.step.offset}"
            )
        self.push(self.resolver.new(cls, args, None, self.step))

    def op_newobj_ex(self) -> None:
        kwargs = self.pop()
        args = self.pop()
        cls = self.pop()
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise CorruptFileError(f"pickle: bad NEWOBJ_EX arguments at byte {self.step.offset}")
        self.push(self.resolver.new(cls, args, kwargs, self.step))

    def op_build(self) -> None:
        state = self.pop()
        obj = self.pop()
        self.push(self.resolver.build(obj, state, self.step))

    def op_persid(self) -> None:
        pid = text_args.ascii_line(self._line(), "PERSID", self.step.offset)
        self.push(self.resolver.persistent_load(pid, self.step))

    def op_binpersid(self) -> None:
        self.push(self.resolver.persistent_load(self.pop(), self.step))

    def op_ext1(self) -> None:
        self.push(self.resolver.extension(self._u("<B", 1), self.step))

    def op_ext2(self) -> None:
        self.push(self.resolver.extension(self._u("<H", 2), self.step))

    def op_ext4(self) -> None:
        self.push(self.resolver.extension(self._u("<i", 4), self.step))


# Handlers by opcode byte; None for bytes that are no opcode.
HANDLERS: list[Callable[[Opcodes], None] | None] = [
    getattr(Opcodes, "op_" + NAMES[code].lower()) if code in NAMES else None for code in range(256)
]
