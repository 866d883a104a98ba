"""Tar headers as Python's ``tarfile`` reads them (torch 0.1-0.3 saved checkpoints as tars;
``torch.load`` still tries a tar before a pickle): what a header is, and the regular members
a run of bytes holds. Bytes only: nothing here reads a member's content.

Layout (POSIX.1-1988 ustar, pax): 512-byte header blocks; the name at bytes 0..100, the
size in octal (or base-256 past 8 GiB) at 124..136, the checksum at 148..156, the type flag
at 156 (``0`` or NUL a regular file, ``x`` a pax header for the next member), ``ustar`` at
257, a name prefix at 345..500; each member's data padded to a whole block.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelport import limits

TAR_BLOCK = 512
TAR_MAGIC = b"ustar"
TAR_MAGIC_AT = 257


def is_tar(head: bytes | memoryview) -> bool:
    """A tar header as Python's ``tarfile`` (torch's legacy loader) accepts it: ustar/PAX
    magic at byte 257, or the old V7 layout, which has no magic and is known only by the
    checksum of its 512-byte header."""
    header = bytes(head[:TAR_BLOCK])
    if header[TAR_MAGIC_AT : TAR_MAGIC_AT + len(TAR_MAGIC)] == TAR_MAGIC:
        return True
    if len(header) < TAR_BLOCK or header == bytes(TAR_BLOCK):
        return False
    field = header[148:156].split(b"\0", 1)[0].strip()
    if not field or any(c not in b"01234567" for c in field):
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return int(field, 8) in (unsigned, signed)


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int
    size: int


# What ``tarfile`` takes for a regular file (REGULAR_TYPES less GNU sparse), and the header
# types it reads that change what follows (GNU long names, global pax, sparse maps): a walk
# that meets one of those cannot say where tarfile puts the members.
_REGULAR = (b"0", b"\0", b"7")
_NOT_WALKED = (b"g", b"L", b"K", b"S")


def tar_members(data: bytes | memoryview) -> list[TarMember]:
    """The regular members of a tar held in ``data`` (a pax ``path`` renames the next one)."""
    return tar_layout(data)[0]


def tar_layout(data: bytes | memoryview) -> tuple[list[TarMember], str | None]:
    """The regular members, and why the walk may differ from ``tarfile``'s (a header type
    it reads differently), or None. A pax ``size`` resizes the next member as in tarfile."""
    members: list[TarMember] = []
    pos = 0
    rename: str | None = None
    resize: int | None = None
    for _ in range(limits.MAX_TAR_HEADERS):
        header = bytes(data[pos : pos + TAR_BLOCK])
        if len(header) < TAR_BLOCK or header == bytes(TAR_BLOCK):
            break
        if not is_tar(header):
            break
        size = _tar_size(header[124:136])
        if size is None:
            break
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        kind = header[156:157]
        start = pos + TAR_BLOCK
        if kind in _NOT_WALKED:
            return members, f"tar header type {kind!r}, which tarfile reads differently"
        if kind == b"x":
            records = bytes(data[start : start + min(size, 1 << 16)])
            rename = _pax_field(records, b"path") or rename
            given = _pax_field(records, b"size")
            resize = int(given) if given is not None and given.isdigit() else resize
            pos = start + -(-size // TAR_BLOCK) * TAR_BLOCK
            continue
        size = size if resize is None else resize
        if kind in _REGULAR:
            members.append(
                TarMember(rename or (f"{prefix}/{name}" if prefix else name), start, size)
            )
        rename, resize = None, None
        pos = start + -(-size // TAR_BLOCK) * TAR_BLOCK
    return members, None


def _tar_size(field: bytes) -> int | None:
    if field[:1] and field[0] & 0x80:  # base-256 for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def _pax_field(records: bytes, wanted: bytes) -> str | None:
    for line in records.split(b"\n"):
        _, _, field = line.partition(b" ")
        key, _, value = field.partition(b"=")
        if key == wanted:
            return value.decode("utf-8", "replace")
    return None
