"""Whether bytes that open like a pickle are one, decided by parsing them with the scanner's
pickle judge (which runs nothing): the readings ``first_bytes`` cannot decide alone."""

from __future__ import annotations

import pickletools

from modelport.errors import LimitExceededError, ModelportError, UnparsedPickleError
from modelport.pickles.interface import Limits
from modelport.pickles.judging import Severity, scan_pickle
from modelport.scanning.first_bytes import PickleReading, decided_reading

_SNIFF_OPCODES = 100_000
# A tag or pointer file (DeepSpeed's and Lightning's ``latest``) is a line or two; longer text
# that reads as a cut pickle is left to the pickle reading, whose error names the damage.
SHORT_TEXT_BYTES = 4096
# Opcodes that name something the loader resolves: a global to import, a persistent id.
_NAMING_OPCODES = frozenset(
    ("GLOBAL", "INST", "STACK_GLOBAL", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4")
)


def pickle_reading(data: memoryview) -> PickleReading:
    """Whether bytes that start like a pickle are one. A pickle that names code to run before
    it fails counts as whole: pickle.loads would have run that code by then. A cut one is
    weaker evidence (a compressed stream can open with a length opcode that runs past the
    end), so callers take it only when nothing else reads the bytes."""
    decided = decided_reading(data)
    if decided is not None:
        return decided
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
