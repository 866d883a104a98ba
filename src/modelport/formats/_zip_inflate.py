"""Zip members inflated under a cap: deflate a megabyte of input at a time into one buffer,
bzip2 and LZMA through ``_compressed``'s pieces."""

from __future__ import annotations

import zlib

from modelport.errors import CorruptFileError
from modelport.formats._compressed import DEFLATED, member_pieces

_INFLATE_CHUNK = 1 << 20


def inflate_deflated(raw: memoryview, limit: int) -> bytearray:
    """A deflated member's bytes, at most ``limit + 1`` of them (one more says it goes on),
    inflated from ``_INFLATE_CHUNK`` of input at a time into one buffer: zlib's one call
    with ``max_length`` holds its output twice as it finishes (2 GB for 1 GB). Raises
    ``zlib.error`` when the data does not inflate."""
    inflater = zlib.decompressobj(-15)
    out = bytearray()
    position, pending, more = 0, b"", False
    while len(out) <= limit and not inflater.eof:
        if not pending and not more:
            if position >= len(raw):
                break
            pending = bytes(raw[position : position + _INFLATE_CHUNK])
            position += len(pending)
        room = min(_INFLATE_CHUNK, limit + 1 - len(out))
        piece = inflater.decompress(pending, room)
        out += piece
        # input left over comes back in ``unconsumed_tail``; a full ``room`` may leave output
        # held inside, to be asked for again before more input goes in
        pending, more = inflater.unconsumed_tail, len(piece) == room
    return out


def inflate_member(raw: memoryview, method: int, limit: int) -> bytearray:
    """A deflated, bzip2 or LZMA member's bytes, at most ``limit + 1`` of them (one more
    says it goes on). Raises ``CorruptFileError`` when the data does not inflate."""
    if method == DEFLATED:
        try:
            return inflate_deflated(raw, limit)
        except zlib.error as exc:
            raise CorruptFileError(f"deflate data is corrupt ({exc})") from None
    out = bytearray()
    position = 0

    def read(count: int) -> bytes:
        nonlocal position
        piece = bytes(raw[position : position + count])
        position += len(piece)
        return piece

    for piece in member_pieces(read, method):
        out += piece
        if len(out) > limit:
            break
    return out[: limit + 1]
