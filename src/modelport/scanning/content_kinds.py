"""What a run of bytes may be, decided by its content alone, for the scanner's readings."""

from __future__ import annotations

import pickletools
from enum import Enum

from modelport.errors import LimitExceededError, ModelportError, UnparsedPickleError
from modelport.formats import _compressed, npy, torch_legacy
from modelport.formats._zip import EOCD_SIGNATURE, LOCAL_SIGNATURE
from modelport.pickles.interface import Limits
from modelport.pickles.judging import Severity, scan_pickle

# Every opcode a pickle can open with that then reaches STOP: protocol 2+ (PROTO), and the
# text and protocol-1 opcodes that begin Python 2 era and protocol 0/1 pickles.
PICKLE_STARTS = frozenset(
    b"(})]cPKJMNILFGSTUVXBC\x82\x83\x84\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x95\x96"
)
_SNIFF_OPCODES = 100_000
# A tag or pointer file (DeepSpeed's and Lightning's ``latest``) is a line or two; longer text
# that reads as a cut pickle is left to the pickle reading, whose error names the damage.
SHORT_TEXT_BYTES = 4096
# Opcodes that name something the loader resolves: a global to import, a persistent id.
_NAMING_OPCODES = frozenset(
    ("GLOBAL", "INST", "STACK_GLOBAL", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4")
)


def may_hold_code(head: bytes) -> bool:
    """Whether bytes may hold something a loader interprets: a pickle (binary or text), a
    zip, a tar, an ``.npy`` header (its data may be a pickle) or a compressed stream."""
    return (
        head.startswith((LOCAL_SIGNATURE, EOCD_SIGNATURE, npy.MAGIC))
        or _compressed.compression_of(head[:16]) is not None
        or torch_legacy.is_tar(head[:512])
        or starts_like_pickle(head)
    )


def starts_like_pickle(head: bytes | memoryview) -> bool:
    if not head:
        return False
    if head[0] == 0x80:
        return len(head) > 1 and 0 <= head[1] <= 5
    return head[0] in PICKLE_STARTS


class PickleReading(Enum):
    NONE = "none"
    CUT = "cut"  # valid opcodes up to the end of the bytes: a cut pickle, or chance
    WHOLE = "whole"  # parses to STOP, or names code to run before it fails


def pickle_reading(data: memoryview) -> PickleReading:
    """Whether bytes that start like a pickle are one. A pickle that names code to run before
    it fails counts as whole: pickle.loads would have run that code by then. A cut one is
    weaker evidence (a compressed stream can open with a length opcode that runs past the
    end), so callers take it only when nothing else reads the bytes."""
    if not starts_like_pickle(data[:2]):
        return PickleReading.NONE
    if data[0] == 0x80:
        return PickleReading.WHOLE
    try:
        scan_pickle(data, limits=Limits(max_opcodes=_SNIFF_OPCODES))
    except UnparsedPickleError as exc:
        if any(_runs_code(f.rule, f.severity) for f in exc.findings):
            return PickleReading.WHOLE
        return PickleReading.CUT if exc.truncated else PickleReading.NONE
    except LimitExceededError:
        return PickleReading.WHOLE  # valid opcode after valid opcode for that long
    except ModelportError:
        return PickleReading.NONE
    return PickleReading.WHOLE


def is_text_not_pickle(data: memoryview) -> bool:
    """Short UTF-8 text whose reading as a pickle is only cut and names nothing: a line such
    as ``checkpoint`` opens with GLOBAL (``c``) by chance and runs out inside its argument.
    ``pickle.loads`` raises before anything is imported or called, so the bytes are text. A
    real protocol-0 pickle is text too, but it reaches STOP (or names a global before it
    fails) and keeps its pickle reading; so does a cut one that names a global."""
    if len(data) > SHORT_TEXT_BYTES or pickle_reading(data) is not PickleReading.CUT:
        return False
    raw = bytes(data)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if b"\x00" in raw:
        return False
    try:
        for opcode, _, _ in pickletools.genops(raw):
            if opcode.name in _NAMING_OPCODES:
                return False
    except ValueError:  # how pickletools says the bytes ran out (or stopped parsing)
        return True
    return False  # reached STOP: a pickle after all


# An EXT opcode names a global through copyreg's extension registry, which Python and the
# common libraries leave empty: pickle.loads raises at once ("unregistered extension code").
# Bytes that open with one (a msgpack map of 2 to 4 keys does: 0x82-0x84) and then fail to
# parse ran nothing, so that alone does not make them a pickle.
_NAMES_NOTHING_RUN = frozenset(("extension-code",))


def _runs_code(rule: str, severity: Severity) -> bool:
    return severity in (Severity.CRITICAL, Severity.HIGH) and rule not in _NAMES_NOTHING_RUN
