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
from typing import Any, Final

from modelport.errors import CorruptFileError, TruncatedFileError, UnparsedPickleError
from modelport.pickles import fast_scan, hooks, joblib_arrays, policy
from modelport.pickles.interface import DEFAULT_LIMITS, Limits, Step, Value, fill
from modelport.pickles.machine import run
from modelport.pickles.records import ByteSpan
from modelport.pickles.rules import judge_symbol, judged_clean, pass_on, special_names
from modelport.pickles.symbols import (
    Made,
    NestedPayload,
    PickleFinding,
    Severity,
    Symbol,
    describe,
)

__all__ = ["SIDE_FILE_RULE", "PickleFinding", "PickleScan", "Severity", "scan_pickle"]

_NESTED_TORCH = ("torch.storage", "_load_from_bytes")
_PASSED_ON = policy.PASSED_ON
_CALLS_LOOKED_AT: Final = frozenset({*_PASSED_ON, _NESTED_TORCH})
_MAX_NESTED_ARRAY_PICKLES = 8

# The finding that names a plain-named side file; its ``global_name`` is the file's name.
SIDE_FILE_RULE: Final = "joblib-side-file"
# joblib < 0.10 kept each array in a file beside the pickle; joblib.load still reads it, with
# numpy's np.load(allow_pickle=True), at os.path.join(the pickle's folder, its name).
_SIDE_FILE_WRAPPERS: Final = frozenset(
    {("joblib.numpy_pickle", "NDArrayWrapper"), ("joblib.numpy_pickle_compat", "NDArrayWrapper")}
)
# The classes BUILD looks for among what the object it fills may be (joblib's wrappers).
_JOBLIB_NAMES: Final = joblib_arrays.BUILT_NAMES


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
        payloads: bool = True,
    ) -> None:
        # joblib's NumpyUnpickler reads array bytes after a wrapper's BUILD; pickle.load,
        # torch.load and the plain unpickler joblib uses for object arrays run them as opcodes
        self.joblib_view = joblib_view
        # whether values handed on are looked through for bytes constants: only when the
        # pickle's bytes may hold one (``hooks.may_hold_payload``), the walk costs a third
        self.payloads = payloads
        self.skipped_arrays = 0
        self.symbol_type = symbol_type
        self.made_type = made_type
        self.data = data
        self.limits = limits or DEFAULT_LIMITS
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
        nested_torch = isinstance(func, Symbol) and func.key == _NESTED_TORCH
        self._payloads(args[1:] if nested_torch else args, at)  # its first: a torch file
        if isinstance(func, Symbol) and func.key == hooks.ENCODE:
            encoded = hooks.encoded_payload(args)
            if encoded is not None:
                self.nested.append(NestedPayload(at.offset, encoded, hooks.BYTES_CONSTANT))
        if isinstance(func, Symbol):
            func.made.append(made)
            func.calls.append((at, args))
            key = func.key
            if key in _CALLS_LOOKED_AT:
                if key == _NESTED_TORCH and args and isinstance(args[0], (bytes, ByteSpan)):
                    self.nested.append(NestedPayload(at.offset, args[0]))
                if key in _PASSED_ON:
                    self._pass_on(func, key, args, at)  # type: ignore[arg-type]  # in it: text
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

    def _pass_on(self, func: Symbol, key: tuple[str, str], args: tuple[Any, ...], at: Step) -> None:
        """What an allowlisted reconstructor calls or instantiates with its arguments."""
        for use in pass_on(key, args, at):
            self._note(
                Severity.HIGH,
                "computed-call",
                at,
                describe(args[use.index]),
                use.usage.value,
                f"{func.path} {use.usage.value.removesuffix('ed')}s a value computed by "
                f"the pickle itself ({use.source})",
            )

    def new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[Any, Any] | None, at: Step) -> Made:
        made = self.made_type(cls, at, args)
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
            classes = joblib_arrays.classes_of(obj)
            for cls in classes:  # a name not text is judged as joblib_arrays judges it
                if isinstance(cls, Symbol) and (cls.key is None or cls.key[1] in _JOBLIB_NAMES):
                    self._build_joblib(classes, state, at)
                    break
        self._payloads(state, at)
        for key in special_names(state):
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

    def _state_hooks(self, obj: Made, state: Any, at: Step) -> None:
        """A state whose keys no scan reads, and a second BUILD, which calls a
        ``__setstate__`` such a state may have planted (``hooks``)."""
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
        # raw bytes that open like a pickle are scanned all the same: no reading that stops
        # before them (pickle.load's, at an array's bytes) leaves them unjudged
        span = ByteSpan(at.cursor.position, layout.nbytes)
        for payload in hooks.payloads(span, self.data):
            self.nested.append(NestedPayload(at.offset, payload, hooks.BYTES_CONSTANT))
        at.cursor.read(layout.nbytes)

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
        """Bytes that open like a pickle, a zip or an ``.npy``, handed to what may load them
        (a class's own ``__setstate__``, a config loader): scanned as nested payloads."""
        if not self.payloads:
            return
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


def _clean(resolver: ScanResolver) -> bool:
    """Whether ``judge`` would find nothing (the rules' answers for each way of use are
    remembered, ``rules.judged_clean``)."""
    if resolver.findings or resolver.nested:
        return False
    torchscript = resolver.torchscript
    return all(judged_clean(symbol, torchscript) for symbol in resolver.symbols)


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
    limits = limits or DEFAULT_LIMITS
    view = memoryview(data)

    def new_resolver(
        symbol_type: type[Symbol] = Symbol,
        made_type: type[Made] = Made,
        *,
        joblib_view: bool = True,
        payloads: bool = False,
    ) -> ScanResolver:
        return ScanResolver(
            torchscript=torchscript,
            expect_persistent_ids=expect_persistent_ids,
            data=view,
            limits=limits,
            symbol_type=symbol_type,
            made_type=made_type,
            joblib_view=joblib_view,
            payloads=payloads,
        )

    # CPython's C unpickler first (fast_scan): kept only when it vouches for the run and
    # nothing in it is worth reporting; the Python machine locates every finding.
    resolver = new_resolver(fast_scan.LiveSymbol, fast_scan.LiveMade)
    end = fast_scan.clean_run(view, start, resolver, limits)
    clean = end is not None and _clean(resolver)
    _release(resolver)
    if end is not None and clean:
        return PickleScan([], [], end)
    resolver = new_resolver()
    try:
        result = run(view, resolver, start=start, limits=limits)
    except (CorruptFileError, TruncatedFileError) as exc:
        truncated = isinstance(exc, TruncatedFileError)
        findings = judge(resolver)
        _release(resolver)
        raise UnparsedPickleError(str(exc), findings=findings, truncated=truncated) from exc
    findings = judge(resolver)
    _release(resolver)
    nested = resolver.nested
    if hooks.may_hold_payload(bytes(view[start : result.end])):
        # a bytes constant may open like a payload: read again, looking through each value
        # handed on (rare; the walk is a third of a reading)
        again = new_resolver(payloads=True)
        run(view, again, start=start, limits=limits)
        _release(again)
        nested = again.nested
    if resolver.skipped_arrays:
        # The same bytes as pickle.load reads them, joblib's array bytes run as opcodes.
        # Where that reading stops, pickle.load stops too; what it named before counts, and
        # only that: the resolver's other notes on array bytes read as opcodes are noise.
        plain = new_resolver(joblib_view=False)
        with contextlib.suppress(CorruptFileError, TruncatedFileError, _PlainReadingEnds):
            run(view, plain, start=start, limits=limits)
        named = (f for symbol in plain.symbols for f in judge_symbol(symbol, torchscript))
        findings += [f for f in named if f not in findings]  # both readings may name it
    return PickleScan(findings, nested, result.end)


def _release(resolver: ScanResolver) -> None:
    """Each result names the symbol that made it, the symbol its results, and a state may
    hold its own object: the scan's records are cycles, which only the garbage collector
    frees, and a process scanning many files spent a third of its time collecting them.
    Once judged, they are let go."""
    for symbol in resolver.symbols:
        for made in symbol.made:
            made.states.clear()
        symbol.made.clear()


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
