"""The old scanning resolver and scan_pickle (reference only)."""

from __future__ import annotations

import _compat_pickle
import re
from dataclasses import dataclass
from typing import Any, Final

from modelport.errors import CorruptFileError, TruncatedFileError, UnparsedPickleError
from modelport.pickles import hooks, joblib_arrays, policy
from modelport.pickles.interface import Limits, Step
from modelport.pickles.records import ByteSpan
from modelport.pickles.rules import judge_symbol
from modelport.pickles.symbols import (
    Made,
    NestedPayload,
    PickleFinding,
    Severity,
    Symbol,
    Usage,
    describe,
)
from tests.reference_machine.machine import run

__all__ = ["PickleFinding", "PickleScan", "Severity", "scan_pickle"]

_NESTED_TORCH = ("torch.storage", "_load_from_bytes")
_MAX_NESTED_ARRAY_PICKLES = 8

# Python's own special names (``__reduce_ex__``, ``__class__``, ``__setstate__``) are all
# lower case; copy, pickle and the interpreter look them up on an object. An upper-case
# dunder (sklearn-crfsuite's ``__FILE_RESOURCE_DATA__``) is an application's field.
_PYTHON_SPECIAL: Final = re.compile(r"__[a-z][a-z0-9_]*__")


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
        nested_torch = isinstance(func, Symbol) and func.key == _NESTED_TORCH
        self._payloads(args[1:] if nested_torch else args, at)
        if isinstance(func, Symbol) and func.key == hooks.ENCODE:
            encoded = hooks.encoded_payload(args)
            if encoded is not None:
                self.nested.append(NestedPayload(at.offset, encoded, hooks.BYTES_CONSTANT))
        if isinstance(func, Symbol):
            func.made.append(made)
            func.calls.append((at, args))
            nested_loader = (func.module, func.name) == _NESTED_TORCH
            if nested_loader and args and isinstance(args[0], (bytes, ByteSpan)):
                self.nested.append(NestedPayload(at.offset, args[0]))
            self._pass_on(func, args, at)
        else:
            self._note(
                Severity.HIGH,
                "computed-call",
                at,
                describe(func),
                "called",
                "calls a value computed by the pickle itself, not a named global",
            )
        return made

    def _pass_on(self, func: Symbol, args: tuple[Any, ...], at: Step) -> None:
        """What an allowlisted reconstructor calls or instantiates with its arguments."""
        key = func.key
        for use in policy.PASSED_ON.get(key, ()) if key is not None else ():
            if use.index >= len(args):
                continue
            target = args[use.index]
            if isinstance(target, Symbol):
                if use.usage is Usage.CALLED and target.key == policy.NO_BASE:
                    continue
                target.passed_on.append((at, use.usage, f"{func.path} ({use.source})"))
            elif isinstance(target, Made):
                self._note(
                    Severity.HIGH,
                    "computed-call",
                    at,
                    describe(target),
                    use.usage.value,
                    f"{func.path} {use.usage.value.removesuffix('ed')}s a value computed by "
                    f"the pickle itself ({use.source})",
                )

    def new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[Any, Any] | None, at: Step) -> Made:
        made = Made(cls, at, args)
        self._payloads((args, kwargs), at)
        if isinstance(cls, Symbol):
            cls.made.append(made)
            cls.news.append((at, args if kwargs is None else (*args, kwargs)))
        else:
            self._note(
                Severity.HIGH,
                "computed-call",
                at,
                describe(cls),
                "instantiated",
                "instantiates a value computed by the pickle itself, not a named class",
            )
        return made

    def build(self, obj: Any, state: Any, at: Step) -> Any:
        if isinstance(obj, Symbol):
            obj.patched.append(at)
        elif isinstance(obj, Made):
            obj.states.append(state)
            self._state_hooks(obj, state, at)
            if joblib_arrays.is_wrapper(obj.origin):
                self._skip_joblib_array(state, at)
        self._payloads(state, at)
        for key in _state_keys(state):
            if _PYTHON_SPECIAL.fullmatch(key):
                self._note(
                    Severity.HIGH,
                    "attribute-smuggling",
                    at,
                    describe(obj),
                    "build-target",
                    f"BUILD sets the special attribute {key!r}, which changes how the object "
                    "behaves when it is used",
                )
        return obj

    def _skip_joblib_array(self, state: Any, at: Step) -> None:
        """Step over the array bytes joblib reads after its wrapper's BUILD; an object array
        is a nested pickle there, which is scanned like the rest."""
        layout = joblib_arrays.layout_of(state)
        if layout.holds_objects:
            if self.data is None or self.depth >= _MAX_NESTED_ARRAY_PICKLES:
                raise CorruptFileError("joblib object arrays nested too deep to analyse")
            self.depth += 1
            try:
                start = at.cursor.position
                inner = run(self.data, self, start=start, limits=self.limits)
                at.cursor.read(inner.end - start)
            finally:
                self.depth -= 1
            return
        if layout.aligned:
            at.cursor.read(at.cursor.read(1)[0])
        # raw bytes that open like a pickle are scanned all the same: no reading that stops
        # before them (pickle.load's, at an array's bytes) leaves them unjudged
        self._payloads(ByteSpan(at.cursor.position, layout.nbytes), at)
        at.cursor.read(layout.nbytes)

    def _state_hooks(self, obj: Made, state: Any, at: Step) -> None:
        """The rules the scan gained since (``hooks``), the same way."""
        if hooks.opaque_state(state):
            self._note(
                Severity.HIGH,
                "opaque-state",
                at,
                describe(obj),
                "build-target",
                f"BUILD hands {describe(obj)} a state computed by the pickle "
                f"({describe(state)}): the attributes it sets, special ones among them, "
                "cannot be read from the file",
            )
        if hooks.repeated_build(obj):
            self._note(
                Severity.HIGH,
                "repeated-build",
                at,
                describe(obj),
                "called",
                f"a second BUILD on {describe(obj)}: pickle builds each object once, and a "
                "BUILD calls the __setstate__ an earlier state may have planted",
            )

    def append(self, target: Any, items: list[Any], at: Step) -> None:
        self._item_hook(target, False, at)
        self._payloads(items, at)

    def set_items(self, target: Any, pairs: list[tuple[Any, Any]], at: Step) -> None:
        self._item_hook(target, True, at)
        self._payloads(pairs, at)

    def _item_hook(self, target: Any, setting: bool, at: Step) -> None:
        why = hooks.item_hook(target, setting)
        if why is not None:
            self._note(Severity.HIGH, "item-hook", at, describe(target), "called", why)

    def _payloads(self, value: Any, at: Step) -> None:
        for payload in hooks.payloads(value, self.data):
            self.nested.append(NestedPayload(at.offset, payload, hooks.BYTES_CONSTANT))

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


def judge(resolver: ScanResolver) -> list[PickleFinding]:
    """Findings for every symbol, from the policy tables and the way it was used."""
    findings = list(resolver.findings)
    for symbol in resolver.symbols:
        findings.extend(judge_symbol(symbol, resolver.torchscript))
    return findings


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
