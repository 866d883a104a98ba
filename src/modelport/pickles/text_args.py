"""The arguments protocols 0 and 1 write as lines of text, read as CPython's unpickler reads
them: a refusal there is a ``CorruptFileError`` here (``at`` is the opcode's offset)."""

from __future__ import annotations

import codecs
import warnings

from modelport.errors import CorruptFileError, LimitExceededError

MAX_INT_DIGITS = 4300  # CPython's own limit on converting decimal text to int


def int_or_bool(line: bytes, at: int) -> int | bool:
    """INT: an integer, or ``01`` / ``00`` for True / False (protocol 0's booleans)."""
    if line == b"01":
        return True
    if line == b"00":
        return False
    return integer(line, at)


def long(line: bytes, at: int) -> int:
    """LONG: an integer, with Python 2's trailing ``L`` or without."""
    return integer(line[:-1] if line.endswith(b"L") else line, at)


def float_(line: bytes, at: int) -> float:
    try:
        return float(line)
    except ValueError:
        raise CorruptFileError(f"pickle: bad float literal at byte {at}") from None


def quoted_string(line: bytes, at: int) -> str:
    """STRING: a quoted, backslash-escaped byte string, read as latin-1; an invalid escape
    is kept as CPython keeps it (it only warns)."""
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b'"', b"'"):
        raise CorruptFileError(f"pickle: STRING argument not quoted at byte {at}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        text: bytes = codecs.escape_decode(line[1:-1])[0]
    return text.decode("latin-1")


def ascii_line(line: bytes, opcode: str, at: int) -> str:
    """An argument CPython reads as ASCII (PERSID); anything else it refuses."""
    try:
        return line.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptFileError(f"pickle: {opcode} is not ASCII at byte {at}") from None


def integer(text: bytes, at: int) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise LimitExceededError("pickle integer digits", MAX_INT_DIGITS, len(text))
    try:
        return int(text)
    except ValueError:
        raise CorruptFileError(f"pickle: bad integer literal at byte {at}") from None
