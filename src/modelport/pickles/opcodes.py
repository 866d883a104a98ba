"""What each pickle opcode does to the machine's state, one method per opcode named as
pickletools names it (``op_`` + the name in lower case). Operations with a meaning beyond
data (naming a global, calling, instantiating, BUILD, persistent ids, extensions, buffers)
are handed to the resolver; nothing here imports or calls anything from the pickle."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError
from modelport.pickles import text_args
from modelport.pickles.keys import bounded_key
from modelport.pickles.machine_state import NAMES, MachineState


class Opcodes(MachineState):
    def op_proto(self) -> None:
        self.protocol = self._u("<B", 1)
        if self.protocol > 5:
            raise CorruptFileError(f"pickle protocol {self.protocol} is not supported (max 5)")

    def op_frame(self) -> None:
        """Frames only group opcodes for buffered reading, but CPython reads each whole: one
        that claims more bytes than follow is a truncated pickle there, and here."""
        length = self._u("<Q", 8)
        self.frame_end = self.pos + length
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
                try:
                    target[bounded_key(key)] = value
                except TypeError:  # an unhashable key is a corrupt pickle; anything else is not
                    self._hashable(key)
                    raise
        else:
            self.resolver.set_items(target, pairs, self.step)

    def _hashable(self, key: Any) -> Any:
        try:
            hash(bounded_key(key))
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
