"""What the scanner's symbolic run of a pickle leaves behind: every global as the pickle
named it and every way the pickle used it, the results of calls (where BUILD states land),
and the findings made of them. Plain records; the rules that judge them live in ``rules``."""

from __future__ import annotations

from enum import Enum
from typing import Any

from modelport.pickles.interface import Step, Value, fill
from modelport.pickles.records import ByteSpan
from modelport.severity import Severity as Severity


class Usage(str, Enum):
    CALLED = "called"
    INSTANTIATED = "instantiated"
    REFERENCED = "referenced"


class PickleFinding(Value):
    """One thing the pickle does that a reader should know, located by offset and opcode."""

    FIELDS = ("severity", "rule", "offset", "opcode", "global_name", "usage", "message")
    __slots__ = FIELDS
    severity: Severity
    rule: str
    offset: int
    opcode: str
    global_name: str
    usage: str
    message: str

    def __init__(
        self,
        severity: Severity,
        rule: str,
        offset: int,
        opcode: str,
        global_name: str,
        usage: str,
        message: str,
    ) -> None:
        fill(
            self,
            severity=severity,
            rule=rule,
            offset=offset,
            opcode=opcode,
            global_name=global_name,
            usage=usage,
            message=message,
        )


class Symbol:
    """A global as the pickle named it, and every way the pickle then used it. ``passed_on``
    holds the calls an allowlisted reconstructor makes with it (the global was an argument
    that the reconstructor calls or instantiates), which the pickle's own opcodes hide.
    ``key`` is (module, name) when both are text; a hostile STACK_GLOBAL may give any value."""

    __slots__ = ("calls", "key", "made", "module", "name", "news", "passed_on", "patched", "step")

    def __init__(self, module: Any, name: Any, step: Step) -> None:
        self.module = module
        self.name = name
        self.step = step
        self.calls: list[tuple[Step, tuple[Any, ...]]] = []
        self.news: list[tuple[Step, tuple[Any, ...]]] = []
        self.passed_on: list[tuple[Step, Usage, str]] = []
        self.made: list[Made] = []
        self.patched: list[Step] = []
        text = isinstance(module, str) and isinstance(name, str)
        self.key: tuple[str, str] | None = (module, name) if text else None

    def __repr__(self) -> str:
        return f"Symbol(module={self.module!r}, name={self.name!r}, step={self.step!r})"

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


class Made:
    """What calling or instantiating a symbol would have produced; BUILD states land here."""

    __slots__ = ("args", "origin", "states", "step")

    def __init__(self, origin: Any, step: Step, args: tuple[Any, ...] = ()) -> None:
        self.origin = origin
        self.step = step
        self.args = args
        self.states: list[Any] = []

    def __repr__(self) -> str:
        return f"Made(origin={self.origin!r}, step={self.step!r}, args={self.args!r})"


class NestedPayload(Value):
    """Bytes handed to a nested loader (``torch.storage._load_from_bytes``), or bytes that
    open like a pickle, a zip or an ``.npy`` (``loader``: ``BYTES_CONSTANT``): scanned too."""

    FIELDS = ("offset", "payload", "loader")
    __slots__ = FIELDS
    offset: int
    payload: bytes | ByteSpan
    loader: str

    def __init__(
        self, offset: int, payload: bytes | ByteSpan, loader: str = "torch.storage._load_from_bytes"
    ) -> None:
        fill(self, offset=offset, payload=payload, loader=loader)


# ``NestedPayload.loader`` of bytes no named loader takes, scanned for what they open like.
BYTES_CONSTANT = "bytes constant"


def describe(value: Any) -> str:
    if isinstance(value, Symbol):
        return value.path
    if isinstance(value, Made):
        return f"result of {describe(value.origin)}"
    return type(value).__name__
