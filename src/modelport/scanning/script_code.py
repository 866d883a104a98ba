"""What the TorchScript source inside an archive may do once the model runs.

``torch.jit.load`` compiles the ``code/*.py`` members of a TorchScript archive. TorchScript
cannot import Python modules, but a few of its operators reach outside the tensor world:
``aten::from_file`` maps any file of the machine into a tensor (its bytes can then leave
through the model's outputs). The archive's code is plain text, serialized by torch in a
fixed style (``torch.from_file(...)``, ``ops.aten.from_file(...)``), so a pattern over
the text finds every call; nothing is compiled or run.
"""

from __future__ import annotations

import re

from modelport.pickles.judging import Severity
from modelport.scanning.findings import Finding

_FILE_OPS = re.compile(rb"\b(from_file)\s*\(")


def findings(code: bytes, member: str) -> list[Finding]:
    """The calls in one ``code/*.py`` member that read files of the machine."""
    found = []
    for match in _FILE_OPS.finditer(code):
        line = code.count(b"\n", 0, match.start()) + 1
        found.append(
            Finding(
                Severity.HIGH,
                "torchscript-file-access",
                member,
                f"TorchScript code calls {match.group(1).decode()}() at line {line}: running "
                "the model reads a file of the machine it runs on into a tensor",
            )
        )
    return found
