"""The one rule that turns what a pickle does with each global into findings.

- A known gadget (the denylist names it) is critical whatever the pickle does with it.
- An allowlisted reconstructor is fine; what it calls or instantiates with its arguments
  (``policy.PASSED_ON``) is judged as called or instantiated, and such an indirect call
  is unsafe unless its target is allowlisted too.
- Calling a standard-library callable that is not allowlisted is unsafe: the stdlib is
  where gadgets come from (files, processes, sockets, code, imports).
- Constructing a third-party class (NEWOBJ, or a call of a class) is suspicious: loading
  imports that package and runs its constructor, which is what every whole-model pickle
  does. Calling a third-party function is unsafe.
- BUILD on a global itself (a module or class, not an instance) patches its attributes:
  unsafe.
Python names classes in CapWords and functions in lower case; the name is the only
evidence a static scan has, and a gadget that breaks the convention belongs on the
denylist.
"""

from __future__ import annotations

import re
from operator import itemgetter
from typing import Any, Final

from modelport.pickles import policy
from modelport.pickles.interface import Step
from modelport.pickles.records import ByteSpan, is_attribute_state
from modelport.pickles.symbols import Made, PickleFinding, Severity, Symbol, Usage

_NESTED_TORCH = ("torch.storage", "_load_from_bytes")


def judge_symbol(symbol: Symbol, torchscript: bool) -> list[PickleFinding]:
    key = symbol.key
    if key is None:
        return []  # already reported as dynamic-global
    found = [
        PickleFinding(
            Severity.HIGH,
            "attribute-patching",
            step.offset,
            step.opcode,
            symbol.path,
            "build-target",
            f"BUILD sets attributes on {symbol.path} itself (a module or class, not an "
            "object): loading it patches code that runs later",
        )
        for step in symbol.patched
    ]
    return found + _judge_use(symbol, key, torchscript)


def judged_clean(symbol: Symbol, torchscript: bool) -> bool:
    """Whether ``judge_symbol`` finds nothing, remembered per key and way of use: what the
    rules read of a symbol besides where it was used is its key, whether it was called,
    instantiated (with arguments or without) or passed on (and how), and, for torch's
    nested loader, its arguments; a global patched by BUILD is always reported."""
    key = symbol.key
    if key is None:
        return True
    if symbol.patched:
        return False
    if key == _NESTED_TORCH:
        return not judge_symbol(symbol, torchscript)
    news = symbol.news
    use = (
        key,
        torchscript,
        not symbol.calls,
        not news,
        all(args == () for _, args in news) if news else True,
        frozenset(map(_USAGE, symbol.passed_on)) if symbol.passed_on else _NO_USAGES,
    )
    clean = _CLEAN_USES.get(use)
    if clean is None:
        clean = _CLEAN_USES[use] = not judge_symbol(symbol, torchscript)
    return clean


_USAGE: Final = itemgetter(1)  # of a ``Symbol.passed_on`` entry
_NO_USAGES: Final = frozenset[Usage]()

# ``judged_clean``'s answers by way of use: bounded by the allowlist's keys (the fast path
# asks only about those) times the few ways of use.
_CLEAN_USES: dict[tuple[object, ...], bool] = {}


def _judge_use(symbol: Symbol, key: tuple[str, str], torchscript: bool) -> list[PickleFinding]:
    if key in PLAIN_SAFE_CALLS:
        return []
    name = symbol.path
    indirect = [(step, via) for step, usage, via in symbol.passed_on if usage is Usage.CALLED]
    instantiated = symbol.news or any(u is Usage.INSTANTIATED for _, u, _ in symbol.passed_on)
    usage = (
        Usage.CALLED
        if symbol.calls or indirect
        else Usage.INSTANTIATED
        if instantiated
        else Usage.REFERENCED
    )
    at = _first_use(symbol)

    def finding(severity: Severity, rule: str, message: str) -> list[PickleFinding]:
        return [PickleFinding(severity, rule, at.offset, at.opcode, name, usage.value, message)]

    if key == _NESTED_TORCH and _loads_bytes_only(symbol):
        return finding(
            Severity.INFO,
            "nested-loader",
            f"{name} loads a torch file embedded as bytes: those bytes are scanned as well",
        )
    exploit = policy.gadget(*key) or _traversed_gadget(key)
    if exploit is not None:
        verb = {Usage.CALLED: "calls", Usage.INSTANTIATED: "instantiates"}.get(usage, "references")
        return finding(Severity.CRITICAL, "known-gadget", f"{verb} {name}, which {exploit}")
    if key in policy.SAFE_CALLS:
        return []
    if key in policy.SAFE_VALUES:
        if not (symbol.calls or symbol.news or indirect):
            return []  # a dtype, or the ndarray type numpy's reconstructor instantiates
        return finding(
            Severity.HIGH, "value-called", f"calls {name}, which is a value, not a constructor"
        )
    if key in policy.SAFE_STDLIB_CALLS:
        return finding(Severity.INFO, "stdlib-value", f"{name}: {policy.SAFE_STDLIB_CALLS[key]}")
    if key in policy.SAFE_LIBRARY_OBJECTS:
        reason = policy.SAFE_LIBRARY_OBJECTS[key]
        return finding(Severity.INFO, "library-object", f"{name}: {reason}")
    if torchscript and (key[0] == "__torch__" or key[0].startswith("__torch__.")):
        return finding(
            Severity.INFO,
            "torchscript-class",
            f"TorchScript class {name} (defined in the archive's code/)",
        )
    if indirect:
        step, via = indirect[0]
        return [
            PickleFinding(
                Severity.HIGH,
                "indirect-call",
                step.offset,
                step.opcode,
                name,
                Usage.CALLED.value,
                f"{via} calls {name} with data from the file: a call hidden behind an "
                "allowlisted reconstructor",
            )
        ]
    if symbol.calls:
        return finding(*_direct_call(key, name))
    if _through_module(key):
        return finding(
            Severity.HIGH,
            "attribute-traversal",
            f"names {name}: protocol 4 resolves a dotted name attribute by attribute, so it "
            "reaches whatever that package imported (os, subprocess), not a class of its own",
        )
    if usage is Usage.REFERENCED:
        return finding(
            Severity.MEDIUM,
            "unknown-global",
            f"references {name} without using it the way model files do",
        )
    judged = _instantiation(symbol, key, name)
    return finding(*judged) if judged is not None else []


def _direct_call(key: tuple[str, str], name: str) -> tuple[Severity, str, str]:
    if policy.is_standard_library(key[0]):
        return (
            Severity.HIGH,
            "stdlib-call",
            f"calls {name}, a standard-library callable that is not on the allowlist: the "
            "standard library is where code execution, files, processes and sockets are",
        )
    if policy.names_a_class(key[1]) and not _through_module(key):
        return (
            Severity.MEDIUM,
            "custom-class-call",
            f"constructs {name} with arguments from the file: loading it normally imports "
            "that package and runs the class's constructor",
        )
    return (
        Severity.HIGH,
        "unknown-call",
        f"calls {name}, which is not on the allowlist: a normal loader would import and run it",
    )


def _instantiation(
    symbol: Symbol, key: tuple[str, str], name: str
) -> tuple[Severity, str, str] | None:
    """A class the pickle instantiates, judged by its arguments and the state handed to it;
    None when it is on the allowlist and used as model files use it."""
    plain_args = all(args == () for _, args in symbol.news)
    if key in policy.SAFE_CLASSES and plain_args:
        return None
    plain_state = all(is_attribute_state(state) for made in symbol.made for state in made.states)
    if not plain_args:
        if policy.is_standard_library(key[0]):
            return (
                Severity.HIGH,
                "unknown-constructor-args",
                f"instantiates the standard-library class {name} with constructor arguments, "
                "which model files never do",
            )
        return (
            Severity.MEDIUM,
            "custom-class-call",
            f"instantiates {name} with constructor arguments from the file: loading it "
            "normally imports that package and runs the class's constructor",
        )
    if plain_state:
        return (
            Severity.MEDIUM,
            "custom-class",
            f"instantiates {name} the way pickle stores a custom object: loading it "
            "normally imports that class and runs its code",
        )
    return (
        Severity.MEDIUM,
        "custom-state",
        f"instantiates {name} and hands its __setstate__ a non-dict state: loading it "
        "normally runs that class's code on data from the file",
    )


def _through_module(key: tuple[str, str]) -> bool:
    """A dotted name whose inner parts are not all classes: ``torch`` +
    ``_strobelight.cli_function_profiler.subprocess.Popen`` walks modules to reach
    ``subprocess.Popen``; a nested class (``Outer.Inner``) walks classes only."""
    inner = key[1].split(".")[:-1]
    return any(not policy.names_a_class(part) for part in inner)


def _traversed_gadget(key: tuple[str, str]) -> str | None:
    """The known gadget a dotted name ends on (``torch`` + ``serialization.os.system`` is
    ``os.system``), tried at each module-like part from the innermost out."""
    parts = [key[0], *key[1].split(".")]
    for i in range(len(parts) - 2, 0, -1):
        found = policy.gadget(".".join(parts[i:-1]), parts[-1]) or policy.gadget(
            parts[i], ".".join(parts[i + 1 :])
        )
        if found is not None:
            return found
    return None


def _first_use(symbol: Symbol) -> Step:
    if symbol.calls:
        return symbol.calls[0][0]
    if symbol.news:
        return symbol.news[0][0]
    if symbol.passed_on:
        return symbol.passed_on[0][0]
    return symbol.step


def _loads_bytes_only(symbol: Symbol) -> bool:
    return bool(symbol.calls) and all(
        args[:1] and isinstance(args[0], (bytes, ByteSpan)) for _, args in symbol.calls
    )


# The allowlisted callables judged fine however they are used (the end of ``_judge_use``'s
# way for them, taken first: most globals of a model file are these).
PLAIN_SAFE_CALLS: Final = frozenset(
    key
    for key in policy.SAFE_CALLS
    if key != _NESTED_TORCH and policy.gadget(*key) is None and _traversed_gadget(key) is None
)


# Python's own special names (``__reduce_ex__``, ``__class__``, ``__setstate__``) are all
# lower case; copy, pickle and the interpreter look them up on an object. An upper-case
# dunder (sklearn-crfsuite's ``__FILE_RESOURCE_DATA__``) is an application's field.
_PYTHON_SPECIAL: Final = re.compile(r"__[a-z][a-z0-9_]*__")


def special_names(state: Any) -> list[str]:
    """The names of a BUILD state that are Python's own special names: setting one changes
    how the object behaves when it is used (the attribute-smuggling rule)."""
    found: list[str] = []
    for part in state if isinstance(state, tuple) else (state,):
        if isinstance(part, dict):
            found += [
                k
                for k in part
                if isinstance(k, str) and k[:2] == "__" and _PYTHON_SPECIAL.fullmatch(k)
            ]
    return found


# What each reconstructor in ``policy.PASSED_ON`` is noted as on a global it calls or
# instantiates, with the use.
_PASSES: Final = {
    key: tuple((use, f"{key[0]}.{key[1]} ({use.source})") for use in uses)
    for key, uses in policy.PASSED_ON.items()
}


def pass_on(key: tuple[str, str], args: tuple[Any, ...], at: Step) -> list[policy.PassedOn]:
    """Note on each global that the allowlisted reconstructor ``key`` calls or instantiates
    with ``args`` how it does (``Symbol.passed_on``); the uses that would call or
    instantiate a value computed by the pickle instead, for the caller to report."""
    computed: list[policy.PassedOn] = []
    for use, via in _PASSES[key]:
        if use.index >= len(args):
            continue
        target = args[use.index]
        if isinstance(target, Symbol):
            if use.usage is Usage.CALLED and target.key == policy.NO_BASE:
                continue
            target.passed_on.append((at, use.usage, via))
        elif isinstance(target, Made):
            computed.append(use)
    return computed


def passes_computed(key: tuple[str, str], calls: list[tuple[Step, tuple[Any, ...]]]) -> bool:
    """``pass_on`` for each of ``calls`` of the reconstructor ``key``, noting the same uses on
    the same globals: whether any would call or instantiate a computed value (one loop for
    a run's calls of one reconstructor, where ``pass_on`` is a call each)."""
    for index, usage, via, skips_no_base in _FLAT_PASSES[key]:
        for at, args in calls:
            if index < len(args):
                target = args[index]
                if isinstance(target, Symbol):
                    if not (skips_no_base and target.key == policy.NO_BASE):
                        target.passed_on.append((at, usage, via))
                elif isinstance(target, Made):
                    return True
    return False


# ``_PASSES`` as ``passes_computed`` reads it: (argument index, use, note, whether ``object``
# as that argument is passed over, as ``pass_on`` passes it over).
_FLAT_PASSES: Final = {
    key: tuple((use.index, use.usage, via, use.usage is Usage.CALLED) for use, via in passes)
    for key, passes in _PASSES.items()
}
