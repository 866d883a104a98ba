"""What the pickle machine shows a resolver, and what it promises: the position of each
opcode, a cursor over the bytes that follow it, the resolver's protocol, the result of one
pickle, and the hard limits one pickle runs under."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Limits:
    """Hard ceilings for one pickle; defaults fit any real checkpoint with room to spare."""

    max_opcodes: int = 50_000_000
    max_memo: int = 10_000_000
    max_stack: int = 1_000_000
    max_marks: int = 100_000
    inline_bytes: int = 64 * 1024  # payloads above this become ByteSpans, not copies
    max_seconds: float | None = None  # wall-clock budget, checked every 65,536 opcodes


DEFAULT_LIMITS = Limits()


class Cursor(Protocol):
    """Lets a resolver consume raw bytes that follow an opcode (joblib writes arrays so)."""

    @property
    def position(self) -> int: ...
    def read(self, n: int) -> memoryview: ...


@dataclass(slots=True)
class Step:
    """Where the machine is: byte offset and name of the opcode being executed. One is made
    for every opcode a resolver sees, so it is slotted and not frozen (a frozen dataclass
    takes three times as long to build); nothing ever changes one."""

    offset: int
    opcode: str
    cursor: Cursor


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


@dataclass(frozen=True)
class PickleResult:
    value: Any
    end: int  # offset just past STOP
    protocol: int
    opcodes: int
