"""What the scanner's symbolic run of a pickle leaves behind: every global as the pickle
named it and every way the pickle used it, the results of calls (where BUILD states land),
and the findings made of them. Plain records; the rules that judge them live in ``rules``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from modelport.pickles.interface import Step
from modelport.pickles.records import ByteSpan
from modelport.severity import Severity as Severity


class Usage(str, Enum):
    CALLED = "called"
    INSTANTIATED = "instantiated"
    REFERENCED = "referenced"


@dataclass(frozen=True)
class PickleFinding:
    """One thing the pickle does that a reader should know, located by offset and opcode."""

    severity: Severity
    rule: str
    offset: int
    opcode: str
    global_name: str
    usage: str
    message: str


@dataclass(eq=False, slots=True)
class Symbol:
    """A global as the pickle named it, and every way the pickle then used it. ``passed_on``
    holds the calls an allowlisted reconstructor makes with it (the global was an argument
    that the reconstructor calls or instantiates), which the pickle's own opcodes hide.
    ``key`` is (module, name) when both are text; a hostile STACK_GLOBAL may give any value."""

    module: Any
    name: Any
    step: Step
    calls: list[tuple[Step, tuple[Any, ...]]] = field(default_factory=list)
    news: list[tuple[Step, tuple[Any, ...]]] = field(default_factory=list)
    passed_on: list[tuple[Step, Usage, str]] = field(default_factory=list)
    made: list[Made] = field(default_factory=list)
    patched: list[Step] = field(default_factory=list)
    key: tuple[str, str] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        text = isinstance(self.module, str) and isinstance(self.name, str)
        self.key = (self.module, self.name) if text else None

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False, slots=True)
class Made:
    """What calling or instantiating a symbol would have produced; BUILD states land here."""

    origin: Any
    step: Step
    args: tuple[Any, ...] = ()
    states: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class NestedPayload:
    """Bytes handed to a nested loader (``torch.storage._load_from_bytes``): scanned too."""

    offset: int
    payload: bytes | ByteSpan


def describe(value: Any) -> str:
    if isinstance(value, Symbol):
        return value.path
    if isinstance(value, Made):
        return f"result of {describe(value.origin)}"
    return type(value).__name__
