"""What the pickle machine shows a resolver, and what it promises: the position of each
opcode, a cursor over the bytes that follow it, the resolver's protocol, the result of one
pickle, and the hard limits one pickle runs under; and ``Value``, the base of the small
immutable values the pickle layer and the scan's findings are made of."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol


class Value:
    """An immutable value compared, hashed and shown by its fields (``FIELDS``, which a
    subclass also gives as its ``__slots__``), as a frozen dataclass would be. The values a
    scan makes (the pickle layer's, its findings) are plain classes on this base because a
    dataclass generates and compiles its methods when it is defined: some 4 million
    instructions each, paid by every scan before it reads a byte."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Value)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__qualname__}({shown})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of an immutable value")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of an immutable value")

    def __getstate__(self) -> dict[str, Any]:
        """Every slot, a subclass's too (``copy`` and ``pickle`` read it; the fleet's workers
        send results so)."""
        names = (name for cls in type(self).__mro__ for name in getattr(cls, "__slots__", ()))
        return {name: getattr(self, name) for name in names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        fill(self, **state)


def fill(value: Value, /, **fields: Any) -> None:
    """Set the fields of a new ``Value`` (its ``__init__`` calls this; nothing else may)."""
    for name, given in fields.items():
        object.__setattr__(value, name, given)


class Limits(Value):
    """Hard ceilings for one pickle; defaults fit any real checkpoint with room to spare."""

    FIELDS = (
        "max_opcodes",
        "max_memo",
        "max_stack",
        "max_marks",
        "inline_bytes",
        "max_seconds",
    )
    __slots__ = FIELDS
    max_opcodes: int
    max_memo: int
    max_stack: int
    max_marks: int
    inline_bytes: int  # payloads above this become ByteSpans, not copies
    max_seconds: float | None  # wall-clock budget, checked every 65,536 opcodes

    def __init__(
        self,
        max_opcodes: int = 50_000_000,
        max_memo: int = 10_000_000,
        max_stack: int = 1_000_000,
        max_marks: int = 100_000,
        inline_bytes: int = 64 * 1024,
        max_seconds: float | None = None,
    ) -> None:
        fill(
            self,
            max_opcodes=max_opcodes,
            max_memo=max_memo,
            max_stack=max_stack,
            max_marks=max_marks,
            inline_bytes=inline_bytes,
            max_seconds=max_seconds,
        )


DEFAULT_LIMITS = Limits()


class Cursor(Protocol):
    """Lets a resolver consume raw bytes that follow an opcode (joblib writes arrays so)."""

    @property
    def position(self) -> int: ...
    @property
    def frame_end(self) -> int:
        """Where the last FRAME's bytes end: a reader that buffers frames
        (``pickle._Unpickler``, joblib's) reads raw bytes from there, not from ``position``."""

    def read(self, n: int) -> memoryview: ...


class Step:
    """Where the machine is: byte offset and name of the opcode being executed. One is made
    for every opcode a resolver sees, so it is slotted and not frozen (a frozen value takes
    three times as long to build); nothing ever changes one. Equal by its fields."""

    __slots__ = ("cursor", "offset", "opcode")
    offset: int
    opcode: str
    cursor: Cursor

    def __init__(self, offset: int, opcode: str, cursor: Cursor) -> None:
        self.offset = offset
        self.opcode = opcode
        self.cursor = cursor

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Step:
            return NotImplemented
        assert isinstance(other, Step)
        return (self.offset, self.opcode, self.cursor) == (other.offset, other.opcode, other.cursor)

    __hash__ = None  # type: ignore[assignment]  # mutable and equal by value, as a dataclass

    def __repr__(self) -> str:
        return f"Step(offset={self.offset!r}, opcode={self.opcode!r}, cursor={self.cursor!r})"


class Resolver(Protocol):
    """What gives opcodes their meaning. Every method may return any inert value."""

    def find_global(self, module: str, name: str, at: Step) -> Any: ...
    def call(self, func: Any, args: tuple[Any, ...], at: Step) -> Any: ...
    def new(
        self, cls: Any, args: tuple[Any, ...], kwargs: dict[Any, Any] | None, at: Step
    ) -> Any: ...
    def build(self, obj: Any, state: Any, at: Step) -> Any: ...
    def append(self, target: Any, items: list[Any], at: Step) -> None: ...
    def set_items(self, target: Any, pairs: list[tuple[Any, Any]], at: Step) -> None: ...
    def persistent_load(self, pid: Any, at: Step) -> Any: ...
    def extension(self, code: int, at: Step) -> Any: ...
    def next_buffer(self, at: Step) -> Any: ...


class PickleResult(Value):
    FIELDS = ("value", "end", "protocol", "opcodes")
    __slots__ = FIELDS
    value: Any
    end: int  # offset just past STOP
    protocol: int
    opcodes: int

    def __init__(self, value: Any, end: int, protocol: int, opcodes: int) -> None:
        fill(self, value=value, end=end, protocol=protocol, opcodes=opcodes)
