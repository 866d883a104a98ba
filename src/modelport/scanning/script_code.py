"""What the TorchScript source inside an archive may do when it is loaded or run.

``torch.jit.load`` compiles the ``code/**.py`` members of a TorchScript archive and runs
each class's ``__setstate__`` while it loads; the rest runs when the model is called.
TorchScript cannot import Python modules, but some of its operators reach outside the tensor
world: ``aten::from_file`` maps any file of the machine into a tensor (its bytes can then
leave through the model's outputs), and operators of a namespace that is not torch's own
exist only where a native library was loaded. The code is Python syntax, so Python's own
tokenizer reads it: every dotted name that is called is found however it is spaced, split
across lines or commented; nothing is compiled or run. Code the tokenizer rejects is not
analysed, which makes the file's verdict ``error``. ``getattr(torch, "save")`` names
``torch.save`` as TorchScript resolves it; a ``getattr`` on torch's operators whose name is
no string literal hides which one it calls.
"""

from __future__ import annotations

import ast
import io
import tokenize
from tokenize import NAME
from typing import NamedTuple

from modelport.pickles.judging import Severity
from modelport.scanning.findings import Finding

# Operators that read or write files of the machine the model runs on, by their last name.
FILE_OPERATORS = frozenset(("from_file", "_load_for_mobile", "load_library"))
# ``aten::save`` (TorchScript's ``torch.save``) writes any path; ``save`` alone is also an
# ordinary method name, so it counts under ``torch`` or ``ops`` only, in any namespace there.
SAVE_OPERATOR = "save"
# TorchScript reads ``torch.autograd`` as ``torch`` (and ``ops.<ns>.autograd`` as
# ``ops.<ns>``): names are judged with these parts dropped.
_TRANSPARENT = "autograd"
# Operator namespaces torch itself defines (its dispatcher's registrations, and TorchScript's
# ``prim``); any other needs a native library loaded first. Left out on purpose: ``c10d`` and
# ``symm_mem`` (they send tensors to other processes) and torch's test and debug namespaces.
TORCH_NAMESPACES = frozenset(
    (
        *("aten", "prim", "prims", "quantized", "_quantized", "quantization", "profiler"),
        *("_c10d_functional", "_c10d_functional_autograd", "_dtensor", "_native", "export"),
        *("inductor", "inductor_prims", "mkl", "mkldnn", "mkldnn_prepacked", "onednn"),
        *("rngprims", "sparse", "static_runtime"),
    )
)
_LOAD_TIME = frozenset(("__setstate__",))
# What TorchScript code names operators through: ``torch`` (aten), ``ops.<namespace>``.
_OPERATOR_ROOTS = frozenset(("torch", "ops"))
# Parts of a name a getattr makes: longer ones (no model's code has them) count as computed,
# so that getattrs nested a thousand deep cost no copies of ever longer names.
_MAX_PARTS = 256
_SHOWN_TOKENS = 16  # of the object a computed getattr looks into, in its finding
_SKIP = frozenset((tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT))


def findings(code: bytes, member: str) -> list[Finding]:
    try:
        calls = _called_names(code.decode("utf-8"))
    except (UnicodeDecodeError, tokenize.TokenError, SyntaxError, IndentationError) as exc:
        return [
            Finding(
                Severity.HIGH,
                "not-analysed",
                member,
                f"TorchScript code that Python's tokenizer rejects ({exc}): not analysed",
            )
        ]
    found = []
    for call in calls:
        when = "while the model loads" if call.function in _LOAD_TIME else "when the model runs"
        where = f"at line {call.line} in {call.function or 'module'} {when}"
        parts = _canonical(call.name.split("."))
        if call.computed:
            found.append(
                Finding(
                    Severity.HIGH,
                    "computed-call",
                    member,
                    f"TorchScript code looks up an attribute of {call.name} by a name that is "
                    f"no string literal {where}: it may reach any operator, aten::save (which "
                    "writes files) and aten::from_file (which reads them) among them",
                )
            )
        elif parts[-1] in FILE_OPERATORS or (
            parts[-1] == SAVE_OPERATOR and parts[0] in _OPERATOR_ROOTS
        ):
            found.append(
                Finding(
                    Severity.HIGH,
                    "torchscript-file-access",
                    member,
                    f"TorchScript code calls {call.name}() {where}: it reads or writes files of "
                    "the machine it runs on",
                )
            )
        elif not call.in_getattr and _is_namespace(parts):
            found.append(
                Finding(
                    Severity.HIGH,
                    "computed-call",
                    member,
                    f"TorchScript code takes the operator namespace {call.name} as a value "
                    f"{where}: any operator may be called through it, aten::save (which "
                    "writes files) and aten::from_file (which reads them) among them",
                )
            )
        elif (namespace := _custom_namespace(parts)) is not None:
            found.append(
                Finding(
                    Severity.MEDIUM,
                    "torchscript-custom-op",
                    member,
                    f"TorchScript code calls the operator {call.name}() {where}: namespace "
                    f"{namespace!r} is not torch's, so it runs native code from a library the "
                    "loading program must have loaded",
                )
            )
    return found


def _custom_namespace(parts: list[str]) -> str | None:
    """The namespace of an operator outside torch's own: ``ops.<ns>.<op>`` as archives
    spell it, ``torch.ops.<ns>.<op>`` as Python does, ``<...>.ops.<ns>.<op>`` otherwise."""
    if parts[0] == "ops" and len(parts) >= 3:
        namespace = parts[1]
    elif len(parts) >= 4 and "ops" in parts[:-2]:
        namespace = parts[parts.index("ops") + 1]
    else:
        return None
    return None if namespace in TORCH_NAMESPACES else namespace


def _canonical(parts: list[str]) -> list[str]:
    if parts[0] not in _OPERATOR_ROOTS:
        return parts
    return [parts[0], *(part for part in parts[1:] if part != _TRANSPARENT)]


def _is_namespace(parts: list[str]) -> bool:
    """Whether a name is ``torch``, ``ops``, ``torch.ops`` or one of its namespaces: what
    code calls operators through, never a value of its own."""
    if parts[:2] == ["torch", "ops"]:
        return len(parts) <= 3
    return parts[0] in _OPERATOR_ROOTS and len(parts) <= (1 if parts[0] == "torch" else 2)


class _Call(NamedTuple):
    name: str  # dotted; for a computed lookup, the object looked into
    line: int
    function: str  # the enclosing function
    computed: bool  # getattr(<name>, <not a string literal>) on torch's operators
    in_getattr: bool = False  # the object a getattr with a literal name looks into


def _called_names(text: str) -> list[_Call]:
    """Every dotted name the code mentions, with its line and enclosing function: a name
    need not be followed by "(" to be called (``(torch.from_file)(...)`` calls it).
    ``getattr(torch, "save")`` names ``torch.save``, as TorchScript resolves it; a name
    that continues after it (``getattr(ops, "aten").save``) continues the dotted name."""
    tokens = [
        t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in _SKIP
    ]
    resolved, computed, objects = _getattrs(tokens)
    calls: list[_Call] = []
    chain: list[str] = []
    chain_start = 0
    expect_name = False
    function, pending_def = "", False
    for index, token in enumerate(tokens):
        kind, value, line = token.type, token.string, token.start[0]
        if index in computed:
            calls.append(_Call(computed[index], line, function, True))
        if kind == tokenize.NAME and value == "def":
            pending_def, chain = True, []
            continue
        if pending_def and kind == tokenize.NAME:
            function, pending_def = value, False
            continue
        if kind == tokenize.NAME and (expect_name or not chain):
            if expect_name:
                chain.append(value)  # in place: a name of n parts costs n, not n squared
            else:
                chain, chain_start = [value], index
            expect_name = False
        elif kind == tokenize.OP and value == "." and chain:
            expect_name = True
        else:
            if chain:
                looked_into = chain_start in objects
                calls.append(_Call(".".join(chain), line, function, False, looked_into))
            chain, expect_name, chain_start = [], False, index
            if kind == tokenize.NAME:
                chain = [value]
            elif index in resolved:  # the ")" closing getattr(<name>, "<literal>")
                chain = list(resolved[index])
    return calls


def _getattrs(
    tokens: list[tokenize.TokenInfo],
) -> tuple[dict[int, list[str]], dict[int, str], set[int]]:
    """The ``getattr`` calls of the code: where each that names an attribute by a string
    literal closes (its ")") with the dotted name it makes, and where each that looks one
    up in ``torch`` or ``ops`` by anything else starts, with the object it looks into; and
    where the objects of the first kind start. Inner calls close first, so a nested
    ``getattr(getattr(ops, "aten"), "save")`` finds its object already resolved."""
    resolved: dict[int, list[str]] = {}
    computed: dict[int, str] = {}
    objects: set[int] = set()
    named = [i for i, token in enumerate(tokens[:-1]) if token.string == "getattr"]
    if not named:
        return resolved, computed, objects
    closing = _closing(tokens)
    starts = [i for i in named if tokens[i].type == tokenize.NAME and i + 1 in closing]
    roots = [0]  # roots[i]: how many of tokens[:i] are torch or ops
    for token in tokens:
        roots.append(roots[-1] + (token.type == tokenize.NAME and token.string in _OPERATOR_ROOTS))
    for start in sorted(starts, key=lambda i: closing[i + 1]):
        close = closing[start + 1]
        first_end = _argument_end(tokens, start + 2, close, closing)
        obj = _primary(tokens, start + 2, first_end, closing, resolved)
        name = _literal(tokens, first_end + 1, close) if first_end < close else None
        if obj is not None and name is not None and len(obj) + name.count(".") < _MAX_PARTS:
            resolved[close] = [*obj, *name.split(".")]
            inner = tokens[start + 2].string == "getattr"  # the object's name starts at its ")"
            objects.add(closing[start + 3] if inner else start + 2)
            continue
        if roots[first_end] > roots[start + 2]:  # torch or ops in the object looked into
            shown = tokens[start + 2 : min(first_end, start + 2 + _SHOWN_TOKENS)]
            computed[start] = "".join(t.string for t in shown)
            objects.add(next((i for i, t in enumerate(shown, start + 2) if t.type == NAME), -1))
    return resolved, computed, objects


def _closing(tokens: list[tokenize.TokenInfo]) -> dict[int, int]:
    """Each opening bracket's index to its closing one's (the tokenizer has checked that
    they pair)."""
    pairs: dict[int, int] = {}
    opened: list[int] = []
    for index, token in enumerate(tokens):
        if token.type != tokenize.OP:
            continue
        if token.string in "([{":
            opened.append(index)
        elif token.string in ")]}" and opened:
            pairs[opened.pop()] = index
    return pairs


def _argument_end(
    tokens: list[tokenize.TokenInfo], at: int, close: int, closing: dict[int, int]
) -> int:
    """Where the argument that starts at ``at`` ends: its "," or the call's ")"."""
    while at < close and tokens[at].string != ",":
        at = closing[at] + 1 if at in closing else at + 1
    return min(at, close)


def _primary(
    tokens: list[tokenize.TokenInfo],
    at: int,
    end: int,
    closing: dict[int, int],
    resolved: dict[int, list[str]],
) -> list[str] | None:
    """The dotted name ``tokens[at:end]`` spells (a name, or a resolved getattr, then
    ``.name`` parts); None when they spell anything else."""
    if at >= end or tokens[at].type != tokenize.NAME:
        return None
    if tokens[at].string == "getattr" and at + 1 in closing:
        parts = resolved.get(closing[at + 1])
        if parts is None:
            return None
        parts, at = list(parts), closing[at + 1] + 1
    else:
        parts, at = [tokens[at].string], at + 1
    while at + 1 < end and tokens[at].string == "." and tokens[at + 1].type == tokenize.NAME:
        parts.append(tokens[at + 1].string)
        at += 2
    return parts if at == end else None


def _literal(tokens: list[tokenize.TokenInfo], at: int, close: int) -> str | None:
    """The string the literals at ``at`` spell (adjacent ones joined, as Python joins
    them), when they are the whole argument; None otherwise."""
    pieces = []
    while at < close and tokens[at].type == tokenize.STRING:
        try:
            piece = ast.literal_eval(tokens[at].string)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
        if not isinstance(piece, str):
            return None
        pieces.append(piece)
        at += 1
    if not pieces or (at < close and tokens[at].string != ","):
        return None
    return "".join(pieces)
