"""The subcommands, the module that implements each, and the exit codes they share.

``main`` parses argv against this table before importing anything a command needs: the
command chosen is the only one whose module is imported, so ``modelport --version`` and
``modelport --help`` import no format, numpy or rich, and ``modelport scan`` imports the
scanning path alone.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class ExitCode(IntEnum):
    """Stable exit codes, documented in README."""

    OK = 0  # success
    NO = 1  # the command ran and the answer is "no": a scan found something, a check failed
    ERROR = 2  # bad input, an unreadable file, a missing dependency, bad usage
    INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
    TERMINATED = 143  # SIGTERM, as shells report it


class Command(NamedTuple):
    """A row of the table: a named tuple, since a dataclass would import ``dataclasses``
    (and ``inspect`` with it) before argv is parsed."""

    module: str  # implements ``register(commands)`` and the ``run`` it sets as default
    help: str


COMMANDS: dict[str, Command] = {
    "inspect": Command(
        "modelport.cli.cmd_inspect",
        "show what a model file holds (format, tensors, metadata, checkpoint extras)",
    ),
    "scan": Command(
        "modelport.cli.cmd_scan",
        "check whether model files are safe to load (never executes them)",
    ),
    "convert": Command(
        "modelport.cli.cmd_convert",
        "convert weights between formats (streamed, bounded memory, verified)",
    ),
    "diff": Command(
        "modelport.cli.cmd_diff", "compare the weights of two model files (any formats)"
    ),
    "hash": Command(
        "modelport.cli.cmd_hash", "fingerprint the weights of model files, independent of format"
    ),
    "check": Command(
        "modelport.cli.cmd_check",
        "will these weights load into this model? (names and shapes, no tensor data)",
    ),
    "export": Command(
        "modelport.cli.cmd_export",
        "export a torch model to ONNX / TorchScript / .pt2 and verify it against eager",
    ),
    "rebuild": Command(
        "modelport.cli.cmd_rebuild",
        "weights + model class -> a whole saved model (pickle / TorchScript / .pt2)",
    ),
    "report": Command(
        "modelport.cli.cmd_report",
        "one self-contained HTML page: identity, scan, structure, value statistics, diff",
    ),
    "card": Command(
        "modelport.cli.cmd_card",
        "a Hugging Face model card (README.md): contents, loading code, scan, provenance",
    ),
}
