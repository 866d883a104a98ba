"""Static analysis of one pickle: every global, tied to how the pickle uses it.

The scanner runs the same machine as the reader with a symbolic resolver: GLOBAL pushes a
``Symbol`` that remembers where it was named; REDUCE/INST/OBJ mark it *called*,
NEWOBJ/NEWOBJ_EX *instantiated*, BUILD records the state it was given. After STOP, each
symbol is judged by the policy tables from how it was used. Nothing is imported, called or
reconstructed, so the scan does not depend on the file being well-formed torch data.
"""

from __future__ import annotations

import _compat_pickle
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from modelport.errors import CorruptFileError, TruncatedFileError, UnparsedPickleError
from modelport.pickles import policy
from modelport.pickles.interface import Limits, Step
from modelport.pickles.machine import run
from modelport.pickles.records import ByteSpan

_NESTED_TORCH = ("torch.storage", "_load_from_bytes")
_JOBLIB_WRAPPERS = frozenset(
    (module, "NumpyArrayWrapper")
    for module in ("joblib.numpy_pickle", "sklearn.externals.joblib.numpy_pickle")
)
_DTYPE_SPEC = re.compile(r"^[<>|=]?([biufcMmSUV?])(\d*)$")


def _itemsize(spec: str) -> int:
    """Bytes per element of a plain numpy dtype spec (``<f8``, ``|b1``, ``<U5``); 0 if unknown."""
    match = _DTYPE_SPEC.match(spec)
    if match is None:
        return 0
    kind, digits = match.groups()
    if kind == "?":
        return 1
    width = int(digits) if digits else 0
    return width * 4 if kind == "U" else width


class Severity(str, Enum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    INFO = "info"

    @property
    def rank(self) -> int:
        return ("info", "medium", "high", "critical").index(self.value)


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


@dataclass(eq=False)
class Symbol:
    """A global as the pickle named it, and every way the pickle then used it."""

    module: Any
    name: Any
    step: Step
    calls: list[tuple[Step, tuple[Any, ...]]] = field(default_factory=list)
    news: list[tuple[Step, tuple[Any, ...]]] = field(default_factory=list)
    made: list[Made] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
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


class ScanResolver:
    """Gives opcodes symbolic meaning and collects findings that need no policy context."""

    def __init__(
        self,
        *,
        torchscript: bool = False,
        expect_persistent_ids: bool = False,
        data: memoryview | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.data = data
        self.limits = limits or Limits()
        self.depth = 0
        self.symbols: list[Symbol] = []
        self.findings: list[PickleFinding] = []
        self.nested: list[NestedPayload] = []
        self.torchscript = torchscript
        self.expect_persistent_ids = expect_persistent_ids

    def _note(
        self, severity: Severity, rule: str, at: Step, name: str, usage: str, message: str
    ) -> None:
        self.findings.append(
            PickleFinding(severity, rule, at.offset, at.opcode, name, usage, message)
        )

    def find_global(self, module: Any, name: Any, at: Step) -> Symbol:
        if not isinstance(module, str) or not isinstance(name, str):
            self._note(
                Severity.HIGH,
                "dynamic-global",
                at,
                "?",
                "referenced",
                "STACK_GLOBAL with computed operands: the name of what runs is hidden",
            )
        else:
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        symbol = Symbol(module, name, at)
        self.symbols.append(symbol)
        return symbol

    def call(self, func: Any, args: tuple[Any, ...], at: Step) -> Made:
        made = Made(func, at, args)
        if isinstance(func, Symbol):
            func.made.append(made)
            func.calls.append((at, args))
            nested_loader = (func.module, func.name) == _NESTED_TORCH
            if nested_loader and args and isinstance(args[0], (bytes, ByteSpan)):
                self.nested.append(NestedPayload(at.offset, args[0]))
        else:
            self._note(
                Severity.HIGH,
                "computed-call",
                at,
                _describe(func),
                "called",
                "calls a value computed by the pickle itself, not a named global",
            )
        return made

    def new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[Any, Any] | None, at: Step) -> Made:
        made = Made(cls, at, args)
        if isinstance(cls, Symbol):
            cls.made.append(made)
            cls.news.append((at, args if kwargs is None else (*args, kwargs)))
        else:
            self._note(
                Severity.HIGH,
                "computed-call",
                at,
                _describe(cls),
                "instantiated",
                "instantiates a value computed by the pickle itself, not a named class",
            )
        return made

    def build(self, obj: Any, state: Any, at: Step) -> Any:
        if isinstance(obj, Made):
            obj.states.append(state)
            origin = obj.origin
            if isinstance(origin, Symbol) and _names_joblib_wrapper(origin):
                self._skip_joblib_array(state, at)
        for key in _state_keys(state):
            if key.startswith("__") and key.endswith("__"):
                self._note(
                    Severity.HIGH,
                    "attribute-smuggling",
                    at,
                    _describe(obj),
                    "build-target",
                    f"BUILD sets the special attribute {key!r}, which changes how the object "
                    "behaves when it is used",
                )
        return obj

    def _skip_joblib_array(self, state: Any, at: Step) -> None:
        """joblib writes each array's bytes right after its wrapper's BUILD: step over them
        (an object array is a nested pickle there, which is scanned like the rest)."""
        if not isinstance(state, dict):
            return
        shape, dtype = state.get("shape"), state.get("dtype")
        spec = dtype.args[0] if isinstance(dtype, Made) and dtype.args else None
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            return
        if not isinstance(spec, str):
            return
        if spec.lstrip("<>|=").startswith("O"):
            if self.data is not None and self.depth < 8:
                self.depth += 1
                try:
                    start = at.cursor.position
                    inner = run(self.data, self, start=start, limits=self.limits)
                    at.cursor.read(inner.end - start)
                finally:
                    self.depth -= 1
            return
        if state.get("numpy_array_alignment_bytes") is not None:
            at.cursor.read(at.cursor.read(1)[0])
        itemsize = _itemsize(spec)
        if itemsize:
            at.cursor.read(math.prod(shape) * itemsize)

    def append(self, target: Any, items: list[Any], at: Step) -> None:
        pass

    def set_items(self, target: Any, pairs: list[tuple[Any, Any]], at: Step) -> None:
        pass

    def persistent_load(self, pid: Any, at: Step) -> Any:
        if not self.expect_persistent_ids:
            self._note(
                Severity.MEDIUM,
                "persistent-id",
                at,
                "",
                "referenced",
                "a persistent id: the loading program decides what it means",
            )
        elif isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # torch's legacy format names a pickled module's class by a persistent id
            # ("module", <class>, source_file, source) and its loader returns the class
            return pid[1]
        return pid

    def extension(self, code: int, at: Step) -> Symbol:
        self._note(
            Severity.HIGH,
            "extension-code",
            at,
            f"<extension {code}>",
            "referenced",
            "EXT opcode: names a global through the loader's copyreg registry, hiding what runs",
        )
        symbol = Symbol("copyreg", f"<extension {code}>", at)
        return symbol

    def next_buffer(self, at: Step) -> Any:
        self._note(
            Severity.MEDIUM,
            "out-of-band-buffer",
            at,
            "",
            "referenced",
            "NEXT_BUFFER refers to data outside the file",
        )
        return None


def _state_keys(state: Any) -> list[str]:
    parts = state if isinstance(state, tuple) else (state,)
    return [k for part in parts if isinstance(part, dict) for k in part if isinstance(k, str)]


def _describe(value: Any) -> str:
    if isinstance(value, Symbol):
        return value.path
    if isinstance(value, Made):
        return f"result of {_describe(value.origin)}"
    return type(value).__name__


def judge(resolver: ScanResolver) -> list[PickleFinding]:
    """Findings for every symbol, from the policy tables and the way it was used."""
    findings = list(resolver.findings)
    for symbol in resolver.symbols:
        findings.extend(_judge_symbol(symbol, resolver.torchscript))
    return findings


def _judge_symbol(symbol: Symbol, torchscript: bool) -> list[PickleFinding]:
    if not isinstance(symbol.module, str) or not isinstance(symbol.name, str):
        return []  # already reported as dynamic-global
    key = (symbol.module, symbol.name)
    name = symbol.path
    usage = (
        Usage.CALLED if symbol.calls else Usage.INSTANTIATED if symbol.news else Usage.REFERENCED
    )
    at = symbol.calls[0][0] if symbol.calls else symbol.news[0][0] if symbol.news else symbol.step

    def finding(severity: Severity, rule: str, message: str) -> list[PickleFinding]:
        return [PickleFinding(severity, rule, at.offset, at.opcode, name, usage.value, message)]

    if (
        key == _NESTED_TORCH
        and symbol.calls
        and all(args[:1] and isinstance(args[0], (bytes, ByteSpan)) for _, args in symbol.calls)
    ):
        return finding(
            Severity.INFO,
            "nested-loader",
            f"{name} loads a torch file embedded as bytes: those bytes are scanned as well",
        )
    exploit = policy.gadget(*key)
    if exploit is not None:
        verb = (
            "calls"
            if usage is Usage.CALLED
            else "instantiates"
            if usage is Usage.INSTANTIATED
            else "references"
        )
        return finding(Severity.CRITICAL, "known-gadget", f"{verb} {name}, which {exploit}")
    if key in policy.SAFE_CALLS:
        return []
    if key in policy.SAFE_VALUES:
        if usage is Usage.REFERENCED:
            return []
        return finding(
            Severity.HIGH, "value-called", f"calls {name}, which is a value, not a constructor"
        )
    if key in policy.SAFE_STDLIB_CALLS:
        return finding(Severity.INFO, "stdlib-value", f"{name}: {policy.SAFE_STDLIB_CALLS[key]}")
    if key in policy.SAFE_LIBRARY_OBJECTS:
        reason = policy.SAFE_LIBRARY_OBJECTS[key]
        return finding(Severity.INFO, "library-object", f"{name}: {reason}")
    if torchscript and (symbol.module == "__torch__" or symbol.module.startswith("__torch__.")):
        return finding(
            Severity.INFO,
            "torchscript-class",
            f"TorchScript class {name} (defined in the archive's code/)",
        )
    if usage is Usage.CALLED:
        return finding(
            Severity.HIGH,
            "unknown-call",
            f"calls {name}, which is not on the allowlist: a normal loader would import and run it",
        )
    if usage is Usage.REFERENCED:
        return finding(
            Severity.MEDIUM,
            "unknown-global",
            f"references {name} without using it the way model files do",
        )
    severity, rule, message = _instantiation(symbol, key, name)
    return finding(severity, rule, message) if rule else []


def _instantiation(symbol: Symbol, key: tuple[str, str], name: str) -> tuple[Severity, str, str]:
    """A class the pickle instantiates, judged by its arguments and the state handed to it;
    an empty rule when it is on the allowlist and used as model files use it."""
    plain_args = all(args == () for _, args in symbol.news)
    plain_state = all(_is_plain_state(state) for made in symbol.made for state in made.states)
    if key in policy.SAFE_CLASSES and plain_args:
        return Severity.INFO, "", ""
    if plain_args and plain_state:
        return (
            Severity.MEDIUM,
            "custom-class",
            f"instantiates {name} the way pickle stores a custom object: loading it "
            "normally imports that class and runs its code",
        )
    if plain_args:
        return (
            Severity.MEDIUM,
            "custom-state",
            f"instantiates {name} and hands its __setstate__ a non-dict state: loading it "
            "normally runs that class's code on data from the file",
        )
    return (
        Severity.HIGH,
        "unknown-constructor-args",
        f"instantiates {name} with constructor arguments, which model files never do",
    )


def _names_joblib_wrapper(symbol: Symbol) -> bool:
    """Whether a global names joblib's array wrapper (its parts may be any value a hostile
    STACK_GLOBAL took, not text)."""
    names = (symbol.module, symbol.name)
    return all(isinstance(n, str) for n in names) and names in _JOBLIB_WRAPPERS


def _is_plain_state(state: Any) -> bool:
    """A dict, or the (dict | None, dict | None) pair that classes with __slots__ pickle."""
    if isinstance(state, dict):
        return True
    return (
        isinstance(state, tuple)
        and len(state) == 2
        and all(part is None or isinstance(part, dict) for part in state)
    )


@dataclass(frozen=True)
class PickleScan:
    findings: list[PickleFinding]
    nested: list[NestedPayload]
    end: int
    opcodes: int


def scan_pickle(
    data: bytes | memoryview,
    *,
    start: int = 0,
    torchscript: bool = False,
    expect_persistent_ids: bool = False,
    limits: Limits | None = None,
) -> PickleScan:
    """Scan one pickle starting at ``start``; raises ``ModelportError`` if it cannot be parsed
    to its STOP (the caller reports that as an ``error`` verdict, never as safe)."""
    limits = limits or Limits()
    view = memoryview(data)
    resolver = ScanResolver(
        torchscript=torchscript,
        expect_persistent_ids=expect_persistent_ids,
        data=view,
        limits=limits,
    )
    try:
        result = run(view, resolver, start=start, limits=limits)
    except (CorruptFileError, TruncatedFileError) as exc:
        truncated = isinstance(exc, TruncatedFileError)
        raise UnparsedPickleError(str(exc), findings=judge(resolver), truncated=truncated) from exc
    return PickleScan(judge(resolver), resolver.nested, result.end, result.opcodes)
