"""What a run of bytes may be, from its first bytes alone: no parse, so nothing here imports
the pickle machine. Whether bytes that open like a pickle are one takes a parse
(``content_kinds``), which the scanner reaches only for bytes that do."""

from __future__ import annotations

from enum import Enum

from modelport.formats._compressed import compression_of
from modelport.formats._npy_header import MAGIC as NPY_MAGIC
from modelport.formats._tar import is_tar
from modelport.formats._zip import EOCD_SIGNATURE, LOCAL_SIGNATURE

# Every opcode a pickle can open with that then reaches STOP: protocol 2+ (PROTO), and the
# text and protocol-1 opcodes that begin Python 2 era and protocol 0/1 pickles.
PICKLE_STARTS = frozenset(
    b"(})]cPKJMNILFGSTUVXBC\x82\x83\x84\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x95\x96"
)


class PickleReading(Enum):
    NONE = "none"
    CUT = "cut"  # valid opcodes up to the end of the bytes: a cut pickle, or chance
    WHOLE = "whole"  # parses to STOP, or names code to run before it fails


def may_hold_code(head: bytes) -> bool:
    """Whether bytes may hold something a loader interprets: a pickle (binary or text), a
    zip, a tar, an ``.npy`` header (its data may be a pickle) or a compressed stream."""
    return (
        head.startswith((LOCAL_SIGNATURE, EOCD_SIGNATURE, NPY_MAGIC))
        or compression_of(head[:16]) is not None
        or is_tar(head[:512])
        or starts_like_pickle(head)
    )


def starts_like_pickle(head: bytes | memoryview) -> bool:
    if not head:
        return False
    if head[0] == 0x80:
        return len(head) > 1 and 0 <= head[1] <= 5
    return head[0] in PICKLE_STARTS


def decided_reading(head: bytes | memoryview) -> PickleReading | None:
    """The pickle reading the first two bytes decide alone: none (no pickle opens so), or
    whole (a PROTO opcode, protocol 2 and later); None when only a parse can tell."""
    if not starts_like_pickle(head[:2]):
        return PickleReading.NONE
    return PickleReading.WHOLE if head[0] == 0x80 else None
