"""Static analysis of one pickle: every global, tied to how the pickle uses it.

The scanner runs the same machine as the reader with a symbolic resolver: GLOBAL pushes a
``Symbol`` that remembers where it was named; REDUCE/INST/OBJ mark it *called*,
NEWOBJ/NEWOBJ_EX *instantiated*, BUILD records the state it was given. After STOP, each
symbol is judged by the policy tables from how it was used. Nothing is imported, called or
reconstructed, so the scan does not depend on the file being well-formed torch data.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import re
from typing import Any, Final

from modelport.errors import CorruptFileError, TruncatedFileError, UnparsedPickleError
from modelport.pickles import fast_scan, joblib_arrays, policy
from modelport.pickles.interface import Limits, Step, Value, fill
from modelport.pickles.machine import run
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

__all__ = ["SIDE_FILE_RULE", "PickleFinding", "PickleScan", "Severity", "scan_pickle"]

_NESTED_TORCH = ("torch.storage", "_load_from_bytes")
_PASSED_ON = policy.PASSED_ON
# What each reconstructor in ``_PASSED_ON`` is noted as on a global it calls or instantiates.
_VIAS: Final = {
    key: tuple(f"{key[0]}.{key[1]} ({use.source})" for use in uses)
    for key, uses in _PASSED_ON.items()
}
# The callables whose arguments a call looks at; a call of any other is only recorded.
_CALLS_LOOKED_AT: Final = frozenset({*_PASSED_ON, _NESTED_TORCH})
_MAX_NESTED_ARRAY_PICKLES = 8

# Python's own special names (``__reduce_ex__``, ``__class__``, ``__setstate__``) are all
# lower case; copy, pickle and the interpreter look them up on an object. An upper-case
# dunder (sklearn-crfsuite's ``__FILE_RESOURCE_DATA__``) is an application's field.
_PYTHON_SPECIAL: Final = re.compile(r"__[a-z][a-z0-9_]*__")
# The finding that names a plain-named side file; its ``global_name`` is the file's name.
SIDE_FILE_RULE: Final = "joblib-side-file"
# joblib < 0.10 kept each array in a file beside the pickle; joblib.load still reads it, with
# numpy's np.load(allow_pickle=True), at os.path.join(the pickle's folder, its name).
_SIDE_FILE_WRAPPERS: Final = frozenset(
    {("joblib.numpy_pickle", "NDArrayWrapper"), ("joblib.numpy_pickle_compat", "NDArrayWrapper")}
)
# The classes BUILD looks for among what the object it fills may be (joblib's wrappers).
_JOBLIB_NAMES: Final = joblib_arrays.WRAPPER_NAMES | {name for _, name in _SIDE_FILE_WRAPPERS}


class ScanResolver:
    """Gives opcodes symbolic meaning and collects findings that need no policy context.

    ``symbol_type`` and ``made_type`` are the records it makes: ``Symbol`` and ``Made``, or
    for a run in CPython's C unpickler (``fast_scan``) subclasses that C can call and fill."""

    # Globals whose calls ``call`` only records, whatever their arguments: those of the
    # allowlist the fast path may meet, but the ones whose arguments it looks at.
    calls_only_recorded: Final = (
        policy.SAFE_CALLS | policy.SAFE_VALUES | frozenset(policy.SAFE_CLASSES)
    ) - _CALLS_LOOKED_AT

    def __init__(
        self,
        *,
        torchscript: bool = False,
        expect_persistent_ids: bool = False,
        data: memoryview | None = None,
        limits: Limits | None = None,
        symbol_type: type[Symbol] = Symbol,
        made_type: type[Made] = Made,
        joblib_view: bool = True,
    ) -> None:
        # joblib's NumpyUnpickler reads array bytes after a wrapper's BUILD; pickle.load,
        # torch.load and the plain unpickler joblib uses for object arrays run them as opcodes
        self.joblib_view = joblib_view
        self.skipped_arrays = 0
        self.symbol_type = symbol_type
        self.made_type = made_type
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
        symbol = self.symbol_type(module, name, at)
        self.symbols.append(symbol)
        return symbol

    def call(self, func: Any, args: tuple[Any, ...], at: Step) -> Made:
        made = self.made_type(func, at, args)
        if isinstance(func, Symbol):
            func.made.append(made)
            func.calls.append((at, args))
            key = func.key
            if key in _CALLS_LOOKED_AT:
                if key == _NESTED_TORCH and args and isinstance(args[0], (bytes, ByteSpan)):
                    self.nested.append(NestedPayload(at.offset, args[0]))
                uses = _PASSED_ON.get(key)  # type: ignore[arg-type]  # in the set: text
                if uses is not None:
                    self._pass_on(func, uses, _VIAS[key], args, at)  # type: ignore[index]
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

    def _pass_on(
        self,
        func: Symbol,
        uses: tuple[policy.PassedOn, ...],
        vias: tuple[str, ...],
        args: tuple[Any, ...],
        at: Step,
    ) -> None:
        """What an allowlisted reconstructor calls or instantiates with its arguments
        (``vias``: how each use names the reconstructor, ``_VIAS``)."""
        for use, via in zip(uses, vias, strict=True):
            if use.index >= len(args):
                continue
            target = args[use.index]
            if isinstance(target, Symbol):
                if use.usage is Usage.CALLED and target.key == policy.NO_BASE:
                    continue
                target.passed_on.append((at, use.usage, via))
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
        made = self.made_type(cls, at, args)
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
            classes = joblib_arrays.classes_of(obj)
            for cls in classes:  # a name not text is judged as joblib_arrays judges it
                if isinstance(cls, Symbol) and (cls.key is None or cls.key[1] in _JOBLIB_NAMES):
                    self._build_joblib(classes, state, at)
                    break
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

    def _build_joblib(self, classes: list[Any], state: Any, at: Step) -> None:
        """BUILD of an object that may be one of joblib's array wrappers (``classes``:
        what it may be an instance of, ``joblib_arrays.classes_of``)."""
        if self.depth == 0 and joblib_arrays.wraps_arrays(classes):
            if self.joblib_view:
                self.skipped_arrays += 1
                self._skip_joblib_array(state, at)
            elif joblib_arrays.layout_of(state).holds_objects:
                # pickle.load runs joblib's nested pickle with this pickle's memo and
                # stops at its STOP: in a real joblib file what it names there is noise
                raise _PlainReadingEnds
        self._check_side_file(classes, state, at)

    def _check_side_file(self, classes: list[Any], state: Any, at: Step) -> None:
        """A side file named by a path, not a plain name, lies wherever the path leads (an
        absolute one anywhere): a scan of the pickle's folder never judges it. A plain name
        is noted (``SIDE_FILE_RULE``, the name as the finding's name) for the scanner, which
        judges that file with the pickle when the pickle is scanned alone. ``classes``:
        what the object BUILD fills may be (``joblib_arrays.classes_of``)."""
        wrappers = [
            cls for cls in classes if isinstance(cls, Symbol) and cls.key in _SIDE_FILE_WRAPPERS
        ]
        if not wrappers:
            return
        origin = wrappers[0]
        name = _built_attribute(state, "filename")
        if isinstance(name, str) and (not name or any(c in name for c in "/\\:") or ".." in name):
            self._note(
                Severity.HIGH,
                "reaches-outside",
                at,
                origin.path,
                "build-target",
                f"joblib loads the array file {name!r} with np.load(allow_pickle=True), which "
                "unpickles a pickle found there: a path that leaves the folder reaches a file "
                "no scan of the folder judges",
            )
        elif isinstance(name, str):
            self._note(
                Severity.INFO,
                SIDE_FILE_RULE,
                at,
                name,
                "build-target",
                f"joblib.load reads the array file {name!r} beside the pickle with "
                "np.load(allow_pickle=True), which unpickles an object array found there",
            )

    def _skip_joblib_array(self, state: Any, at: Step) -> None:
        """Step over the array bytes joblib reads after its wrapper's BUILD; an object array
        is a nested pickle there, which is scanned like the rest."""
        layout = joblib_arrays.layout_of(state)
        if at.cursor.frame_end > at.cursor.position:
            # joblib's unpickler holds the frame in memory: it reads the array from past the
            # frame's end and then runs the frame's remaining bytes as opcodes
            self._note(
                Severity.HIGH,
                "joblib-frame-split",
                at,
                "",
                "build-target",
                f"an array wrapper's BUILD ends {at.cursor.frame_end - at.cursor.position} "
                "bytes before its FRAME does: joblib reads the array from past the frame and "
                "runs those bytes as opcodes, which a reading of the array in place never sees",
            )
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
        at.cursor.read(layout.nbytes)

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
        symbol = self.symbol_type("copyreg", f"<extension {code}>", at)
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


class _PlainReadingEnds(Exception):
    """Where the reading of a joblib pickle as pickle.load reads it (``scan_pickle``) stops."""


def _state_keys(state: Any) -> list[str]:
    """The names of a BUILD state that start like a special name: the only ones looked at."""
    found: list[str] = []
    for part in state if isinstance(state, tuple) else (state,):
        if isinstance(part, dict):
            found += [k for k in part if isinstance(k, str) and k[:2] == "__"]
    return found


def judge(resolver: ScanResolver) -> list[PickleFinding]:
    """Findings for every symbol, from the policy tables and the way it was used."""
    findings = list(resolver.findings)
    for symbol in resolver.symbols:
        findings.extend(judge_symbol(symbol, resolver.torchscript))
    return findings


class PickleScan(Value):
    FIELDS = ("findings", "nested", "end")
    __slots__ = FIELDS
    findings: list[PickleFinding]
    nested: list[NestedPayload]
    end: int

    def __init__(
        self, findings: list[PickleFinding], nested: list[NestedPayload], end: int
    ) -> None:
        fill(self, findings=findings, nested=nested, end=end)


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

    def new_resolver(
        symbol_type: type[Symbol] = Symbol,
        made_type: type[Made] = Made,
        *,
        joblib_view: bool = True,
    ) -> ScanResolver:
        return ScanResolver(
            torchscript=torchscript,
            expect_persistent_ids=expect_persistent_ids,
            data=view,
            limits=limits,
            symbol_type=symbol_type,
            made_type=made_type,
            joblib_view=joblib_view,
        )

    # CPython's C unpickler first (fast_scan): kept only when it vouches for the run and
    # nothing in it is worth reporting; the Python machine locates every finding.
    resolver = new_resolver(fast_scan.LiveSymbol, fast_scan.LiveMade)
    end = fast_scan.clean_run(view, start, resolver, limits)
    if end is not None and not resolver.nested and not (findings := judge(resolver)):
        return PickleScan(findings, [], end)
    resolver = new_resolver()
    try:
        result = run(view, resolver, start=start, limits=limits)
    except (CorruptFileError, TruncatedFileError) as exc:
        truncated = isinstance(exc, TruncatedFileError)
        raise UnparsedPickleError(str(exc), findings=judge(resolver), truncated=truncated) from exc
    findings = judge(resolver)
    if resolver.skipped_arrays:
        # The same bytes as pickle.load reads them, joblib's array bytes run as opcodes.
        # Where that reading stops, pickle.load stops too; what it named before counts, and
        # only that: the resolver's other notes on array bytes read as opcodes are noise.
        plain = new_resolver(joblib_view=False)
        with contextlib.suppress(CorruptFileError, TruncatedFileError, _PlainReadingEnds):
            run(view, plain, start=start, limits=limits)
        named = (f for symbol in plain.symbols for f in judge_symbol(symbol, torchscript))
        findings += [f for f in named if f not in findings]  # both readings may name it
    return PickleScan(findings, resolver.nested, result.end)


def _built_attribute(state: Any, name: str) -> Any:
    """The value BUILD gives attribute ``name`` of an object without ``__setstate__``: a
    dict state sets it, and the second of a ``(state, slotstate)`` pair sets it after
    (``pickle``'s ``load_build``, with ``setattr``); None when neither names it."""
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    value = state.get(name) if isinstance(state, dict) else None
    if isinstance(slots, dict) and name in slots:
        value = slots[name]
    return value
