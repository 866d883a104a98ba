"""What the TorchScript source inside an archive may do when it is loaded or run.

``torch.jit.load`` compiles the ``code/**.py`` members of a TorchScript archive and runs
each class's ``__setstate__`` while it loads; the rest runs when the model is called.
TorchScript cannot import Python modules, but some of its operators reach outside the tensor
world: ``aten::from_file`` maps any file of the machine into a tensor (its bytes can then
leave through the model's outputs), and operators of a namespace that is not torch's own
exist only where a native library was loaded. The code is Python syntax, so Python's own
tokenizer reads it: every dotted name that is called is found however it is spaced, split
across lines or commented; nothing is compiled or run. Code the tokenizer rejects is not
analysed, which makes the file's verdict ``error``.
"""

from __future__ import annotations

import io
import tokenize

from modelport.pickles.judging import Severity
from modelport.scanning.findings import Finding

# Operators that read or write files of the machine the model runs on, by their last name.
FILE_OPERATORS = frozenset(("from_file", "_load_for_mobile", "load_library"))
# ``aten::save`` (TorchScript's ``torch.save``) writes any path; ``save`` alone is also an
# ordinary method name, so it is matched by its full spelling.
SAVE_OPERATORS = frozenset(("torch.save", "ops.aten.save", "torch.ops.aten.save"))
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
    for dotted, line, function in calls:
        when = "while the model loads" if function in _LOAD_TIME else "when the model runs"
        parts = dotted.split(".")
        if parts[-1] in FILE_OPERATORS or dotted in SAVE_OPERATORS:
            found.append(
                Finding(
                    Severity.HIGH,
                    "torchscript-file-access",
                    member,
                    f"TorchScript code calls {dotted}() at line {line} in {function or 'module'}"
                    f" {when}: it reads or writes files of the machine it runs on",
                )
            )
        elif len(parts) >= 4 and parts[-3] == "ops" and parts[-2] not in TORCH_NAMESPACES:
            found.append(
                Finding(
                    Severity.MEDIUM,
                    "torchscript-custom-op",
                    member,
                    f"TorchScript code calls the operator {dotted}() at line {line} {when}: "
                    f"namespace {parts[-2]!r} is not torch's, so it runs native code from a "
                    "library the loading program must have loaded",
                )
            )
    return found


def _called_names(text: str) -> list[tuple[str, int, str]]:
    """(dotted name, line, enclosing function) of every dotted name the code mentions: a
    name need not be followed by "(" to be called (``(torch.from_file)(...)`` calls it)."""
    calls: list[tuple[str, int, str]] = []
    chain: list[str] = []
    expect_name = False
    function, pending_def = "", False
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        kind, value = token.type, token.string
        if kind in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT):
            continue
        if kind == tokenize.NAME and value == "def":
            pending_def, chain = True, []
            continue
        if pending_def and kind == tokenize.NAME:
            function, pending_def = value, False
            continue
        if kind == tokenize.NAME and (expect_name or not chain):
            chain = [*chain, value] if expect_name else [value]
            expect_name = False
        elif kind == tokenize.OP and value == "." and chain:
            expect_name = True
        else:
            if chain:
                calls.append((".".join(chain), token.start[0], function))
            chain, expect_name = [], False
            if kind == tokenize.NAME:
                chain = [value]
    return calls
