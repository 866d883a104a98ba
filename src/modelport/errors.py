"""Every error modelport raises on purpose.

Callers catch one family at the depth they care about; each class also subclasses the
builtin a caller would otherwise expect, so ``except ValueError`` keeps working.

    ModelportError
    ├── ModelFileNotFoundError (FileNotFoundError) no such file; ``filename`` is set
    ├── FileError (ValueError)                 something in an input file; ``path`` names it
    │   ├── FormatError                        the bytes are not what they must be
    │   │   ├── UnknownFormatError             no reader recognises the content
    │   │   ├── NotAModelError                 something else (LFS pointer, HTML, empty)
    │   │   ├── TruncatedFileError             shorter than its own header says
    │   │   ├── CorruptFileError               inconsistent structure (offsets, sizes, opcodes)
    │   │   │   └── UnparsedPickleError        a pickle that stops before its STOP (scanner)
    │   │   └── UnsupportedVersionError        a known format at a version we do not read
    │   └── LimitExceededError                 a declared size or count past a hard limit
    ├── UnsafeModelError                       the scanner found code execution; loading refused
    ├── UsageError (ValueError)                arguments that cannot work together or parse
    ├── ConversionError                        a conversion refused before writing (or failed)
    ├── VerificationError                      the written file does not match its source
    ├── ModelSpecError                         the model named by --model cannot be built
    ├── TensorNotFoundError (KeyError)         no tensor by that name
    ├── UnsupportedDtypeError (TypeError)      a dtype numpy or torch cannot represent
    └── MissingDependencyError (ImportError)   an optional extra is not installed

    ModelportWarning (UserWarning)
    ├── SuspiciousModelWarning                 a normal loader would run the file's classes
    └── CodeExecutionWarning                   modelport runs a file's code the caller trusted
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ModelportError(Exception):
    """Base class of every error modelport raises deliberately."""


class ModelFileNotFoundError(ModelportError, FileNotFoundError):
    """The path does not exist. ``filename`` is the missing path, as ``open`` sets it; the
    message may say more (an ONNX model's external data file that was not copied along)."""

    def __init__(self, path: Path | str, message: str | None = None) -> None:
        super().__init__(errno.ENOENT, message or os.strerror(errno.ENOENT), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class FileError(ModelportError, ValueError):
    """Something in an input file; ``path`` names the file. A parser deep inside a format may
    not know the path: ``locate`` adds it where the file was opened, so every such error that
    leaves modelport says which file it is about."""

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)

    def locate(self, path: Path | str) -> None:
        """Name the file, unless the error already names one."""
        if self.path is None:
            self.path = Path(path)
            self.args = (f"{path}: {self.args[0]}", *self.args[1:])


class SourceChangedError(FileError):
    """The input changed while modelport was reading it (rewritten in place, or another
    file renamed over it): what was scanned is not what was read, so nothing is written."""


class FormatError(FileError):
    """The file's bytes do not form the format they claim or appear to be."""


class UnknownFormatError(FormatError):
    """No reader recognises the content; the extension is never trusted instead."""


class NotAModelError(FormatError):
    """The file is recognisably something other than a model (LFS pointer, HTML, empty)."""

    def __init__(self, message: str, *, kind: str, path: Path | str | None = None) -> None:
        self.kind = kind
        super().__init__(message, path=path)


class TruncatedFileError(FormatError):
    """The file ends before the bytes its own header promises."""

    def __init__(
        self, message: str, *, expected: int, actual: int, path: Path | str | None = None
    ) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(message, path=path)


class CorruptFileError(FormatError):
    """The structure contradicts itself: overlapping ranges, bad offsets, malformed opcodes."""


class EscapingReferenceError(CorruptFileError):
    """The file points its loader at bytes outside what it may read: a path that climbs out
    of the model's folder, a symbolic link leading elsewhere. A loader that follows it reads
    files of the machine, so the scanner calls it unsafe, not merely damaged."""


class UnparsedPickleError(CorruptFileError):
    """A pickle the scanner could not walk to its STOP. ``findings`` are what it judged in
    the opcodes before that (``pickles.judging.PickleFinding``); ``truncated``: the bytes
    ran out first (a cut file, or a pickle longer than the part read)."""

    def __init__(self, message: str, *, findings: Sequence[Any], truncated: bool) -> None:
        self.findings = tuple(findings)
        self.truncated = truncated
        super().__init__(message)


class UnsupportedVersionError(FormatError):
    """A known format at a version modelport does not read."""


class UnsafeModelError(ModelportError):
    """The scanner judged the file ``unsafe``; ``allow_unsafe=True`` extracts tensors anyway
    (still without executing anything). ``findings`` are the scanner's findings that decided
    it (``scanning.findings.Finding``). ``advice`` replaces the closing hint where the load
    refused would run the file (a ``--model`` file, see ``torch_models.building``)."""

    def __init__(
        self,
        path: Path | str,
        summary: str,
        *,
        findings: Sequence[Any] = (),
        advice: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.findings = tuple(findings)
        advice = advice or (
            "modelport never runs it; pass allow_unsafe=True (--allow-unsafe) to extract its "
            "tensors anyway"
        )
        super().__init__(f"{path}: refused, the file is unsafe to load: {summary}. {advice}")


class UsageError(ModelportError, ValueError):
    """Arguments that cannot work: a malformed ``--input`` or ``--dynamic`` spec, options that
    exclude each other, a value out of range. Nothing was read or written yet."""


class ConversionError(ModelportError):
    """A conversion that cannot or must not happen: an output that exists, a dtype the
    target cannot hold, names that collide. Nothing was written."""


class VerificationError(ModelportError):
    """The output, read back, differs from what was meant to be written; it was removed."""


class ModelSpecError(ModelportError):
    """The model named for ``check``/``export`` (``pkg.module:Name``, an HF directory) could
    not be imported or built."""


class ModelportWarning(UserWarning):
    """Base class of the warnings modelport issues, to filter them in one place."""


class SuspiciousModelWarning(ModelportWarning):
    """The scanner judged the file ``suspicious`` (a normal loader would run its classes' code)."""


class CodeExecutionWarning(ModelportWarning):
    """modelport is about to run code stored in a file, because the caller trusted it
    (``trust_code``): the message carries the scanner's verdict on that file."""


class LimitExceededError(FileError):
    """A declared size or count is past a hard safety limit (``limits``); nothing was
    allocated for it."""

    def __init__(self, resource: str, limit: int, actual: int, *, path: Path | str | None = None):
        self.resource = resource
        self.limit = limit
        self.actual = actual
        super().__init__(f"{resource} is {actual:,}, above the limit of {limit:,}", path=path)


class TensorNotFoundError(ModelportError, KeyError):
    """No tensor by that name in the file."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "tensor not found"


class UnsupportedDtypeError(ModelportError, TypeError):
    """The tensor's dtype has no numpy or torch equivalent (quantized GGUF blocks, say)."""


class MissingDependencyError(ModelportError, ImportError):
    """An optional extra is needed for this operation and is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the '{package}' package: pip install 'modelport[{extra}]'"
        )


def describe(exc: BaseException) -> str | None:
    """A one-line message for errors users can act on (the CLI prints it, a fleet record
    keeps it); None for bugs."""
    if isinstance(exc, ModelportError):
        return str(exc)
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}"
    if isinstance(exc, IsADirectoryError):
        return f"expected a file, got a directory: {exc.filename}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    if isinstance(exc, (RecursionError, MemoryError)):
        return f"the file is too complex to read safely ({type(exc).__name__})"
    return None
