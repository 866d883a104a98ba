"""torch's legacy magic number: the first pickle of every stream ``torch.save`` wrote before
1.6 (torch/serialization.py ``MAGIC_NUMBER``), and of the blobs its zip archives nest. Told
apart from other pickles under a few opcodes' limits, so that a large pickle (a whole model)
is not read a second time, nor its arrays built, to learn that it is something else."""

from __future__ import annotations

from modelport.errors import ModelportError
from modelport.pickles.interface import Limits
from modelport.pickles.reading import read_pickle

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
# How a pickle can spell the number: a pickle has no arithmetic, so one whose value is the
# number holds it as LONG1/LONG4's little-endian bytes or as INT/LONG's decimal digits.
_SPELLINGS = (MAGIC_NUMBER.to_bytes(10, "little"), str(MAGIC_NUMBER).encode())
SNIFF_LIMITS = Limits(max_opcodes=32, max_memo=32, max_stack=32, max_marks=8, inline_bytes=64)


def is_magic_number(pickled: bytes | memoryview) -> bool:
    """Whether ``pickled`` is one pickle of the magic number (the scan's test of a stream's
    first pickle)."""
    held = bytes(pickled)
    if not any(spelling in held for spelling in _SPELLINGS):
        return False  # most pickles, told without running one
    try:
        value = read_pickle(pickled, limits=SNIFF_LIMITS).value
    except ModelportError:
        return False
    return type(value) is int and value == MAGIC_NUMBER


def opens_with_magic(head: bytes) -> bool:
    """Whether a file's first bytes open with that pickle: protocol 2 to 5, or the ``L`` line
    in which protocols 0 and 1 spell the number."""
    if head[0] == 0x80:
        if len(head) < 2 or not 2 <= head[1] <= 5:
            return False
    elif head[:1] != b"L":
        return False
    return is_magic_number(head)
