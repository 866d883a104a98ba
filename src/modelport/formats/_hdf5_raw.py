"""The parts of HDF5 modelport parses itself: the superblock, and global heap collections.

Superblock (HDF5 File Format Specification 3.0): the signature ``\\x89HDF\\r\\n\\x1a\\n`` at
byte 0 or, after a user block, at 512, 1024, 2048, ...; versions 0/1 keep the offset and
length sizes at bytes 13-14 and base, free-space, end-of-file and driver addresses from
byte 24 (28 for v1); versions 2/3 keep the sizes at bytes 9-10 and base, extension,
end-of-file and root addresses from byte 12. The end-of-file address is written as an
absolute offset (user block included) and the library compares it so with the file size.

A check the HDF5 library lacks: the global heap behind a variable-length string attribute.

Reading a variable-length string makes the library parse the whole global heap collection
the string lives in, and a malformed collection (a free-space object of size 0, sizes that
overflow) sends that parser into an endless loop. Keras stores its ``model_config``,
``keras_version`` and ``backend`` that way, so modelport checks the collection itself first
and reads the attribute only when the check passes.

Layout (HDF5 File Format Specification 3.0):

- object header v1: version 1, reserved, message count (u16), reference count (u32), header
  size (u32), 4 bytes of padding, then messages ``type u16, size u16, flags u8, 3 reserved,
  data`` (8-byte aligned); v2: ``OHDR``, version 2, flags, optional times (16) and
  attribute phase change values (4), chunk size (1 << (flags & 3) bytes), messages ``type u8,
  size u16, flags u8, [creation order u16]``, checksum; continuation blocks (message 0x10:
  offset, length) hold more messages (v2 blocks start with ``OCHK``);
- attribute message (0x0C) v1/v2/v3: version, flags, name/datatype/dataspace sizes (u16
  each), [encoding u8 in v3], name, datatype, dataspace (each padded to 8 in v1), data;
- a variable-length string element is ``length u32, collection address, object index u32``;
- global heap collection: ``GCOL``, version 1, 3 reserved, collection size (length size),
  then objects ``index u16, references u16, 4 reserved, size, data padded to 8``; index 0
  is the free space, whose size counts from its own start.

Any structure this module does not understand (dense attribute storage, shared messages)
means "not verified": the attribute is then described, not read.

Filter pipelines name each filter by its registered identifier (1-255 the library's own,
32000 and up registered with The HDF Group) and MAY store a name; ``filter_label`` gives
both, so an error about a filter the library lacks says which one it is.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from modelport import limits
from modelport.errors import CorruptFileError, TruncatedFileError

RawReader = Callable[[int, int], bytes]  # (offset in the HDF5 file, length) -> bytes

SIGNATURE = b"\x89HDF\r\n\x1a\n"
FIRST_USERBLOCK = 512

ATTRIBUTE = 0x000C
CONTINUATION = 0x0010
VLEN_CLASS = 9

FILTER_NAMES: Final = MappingProxyType(
    {
        1: "deflate",
        2: "shuffle",
        3: "fletcher32",
        4: "szip",
        5: "nbit",
        6: "scaleoffset",
        32000: "lzf",
        32001: "blosc",
        32004: "lz4",
        32008: "bitshuffle",
        32013: "zfp",
        32015: "zstd",
        32026: "blosc2",
    }
)


def filter_label(code: int, stored_name: bytes = b"") -> str:
    """``blosc (HDF5 filter 32001)``: the registered name, else the one the file stores."""
    name = FILTER_NAMES.get(code) or stored_name.decode("ascii", "replace").strip("\0 ")
    return f"{name or 'an unregistered filter'} (HDF5 filter {code})"


def find_superblock(head: bytes, size: int, path: Path | None = None) -> int | None:
    """Offset of the superblock signature (0, 512, 1024, ...), or None.

    Offsets past ``head`` are read from ``path`` (one open, one 8-byte read per offset).
    """
    offsets: list[int] = []
    offset = 0
    while offset + len(SIGNATURE) <= size:
        offsets.append(offset)
        offset = FIRST_USERBLOCK if offset == 0 else offset * 2
    beyond = []
    for offset in offsets:
        if offset + len(SIGNATURE) <= len(head):
            if head[offset : offset + len(SIGNATURE)] == SIGNATURE:
                return offset
        else:
            beyond.append(offset)
    if not beyond or path is None:
        return None
    with open(path, "rb", buffering=0) as handle:  # 8 bytes a try, not a buffer's worth
        for offset in beyond:
            handle.seek(offset)
            if handle.read(len(SIGNATURE)) == SIGNATURE:
                return offset
    return None


@dataclass(frozen=True)
class Superblock:
    offset: int  # where the signature is (the user block's size)
    version: int
    base_address: int
    end_of_file: int
    offset_size: int
    length_size: int

    def heap_guard(self, raw: RawReader, size: int) -> HeapGuard | None:
        """The global heap checker for this file (None for unusual address widths)."""
        if self.length_size not in (2, 4, 8):
            return None
        return HeapGuard(raw, self.base_address, size, self.offset_size, self.length_size)


def read_superblock(block: bytes, offset: int, size: int, path: Path | None) -> Superblock:
    """The superblock (``block`` starts at its signature, found at ``offset`` of a ``size``-byte
    file): version and extent, with the end-of-file address checked against the size."""
    if len(block) < 9:
        raise TruncatedFileError(
            "HDF5 superblock is cut short", expected=offset + 9, actual=size, path=path
        )
    version = block[8]
    if version in (0, 1):
        sizes_at, addresses_at, eof_index = 13, 24 if version == 0 else 28, 2
    elif version in (2, 3):
        sizes_at, addresses_at, eof_index = 9, 12, 2
    else:
        raise CorruptFileError(f"HDF5 superblock version {version} is not 0-3", path=path)
    if len(block) < sizes_at + 2:
        raise TruncatedFileError(
            "HDF5 superblock is cut short", expected=offset + sizes_at + 2, actual=size, path=path
        )
    offset_size = block[sizes_at]
    if offset_size not in (2, 4, 8):
        raise CorruptFileError(f"HDF5 superblock offset size {offset_size} is invalid", path=path)
    code = {2: "<H", 4: "<I", 8: "<Q"}[offset_size]
    needed = addresses_at + offset_size * (eof_index + 1)
    if len(block) < needed:
        raise TruncatedFileError(
            "HDF5 superblock is cut short", expected=offset + needed, actual=size, path=path
        )
    base, eof = (
        struct.unpack_from(code, block, addresses_at + offset_size * i)[0] for i in (0, eof_index)
    )
    if eof > size:
        raise TruncatedFileError(
            f"HDF5 file ends at byte {size} but its superblock says {eof} (truncated download?)",
            expected=eof,
            actual=size,
            path=path,
        )
    return Superblock(offset, version, base, eof, offset_size, block[sizes_at + 1])


class Unverified(Exception):
    """The structure could not be checked; callers treat the attribute as unreadable."""


def _unpack(code: str, data: bytes, at: int) -> tuple[int, ...]:
    if at < 0 or at + struct.calcsize(code) > len(data):
        raise Unverified("structure runs past its block")
    return struct.unpack_from(code, data, at)


class HeapGuard:
    """Verifies the global heap collections variable-length string attributes point into."""

    def __init__(self, raw: RawReader, base: int, size: int, offset_size: int, length_size: int):
        self._raw = raw
        self._base = base
        self._size = size
        self._o = {2: "<H", 4: "<I", 8: "<Q"}[offset_size]
        self._l = {2: "<H", 4: "<I", 8: "<Q"}[length_size]
        self._osize = offset_size
        self._lsize = length_size
        self._collections: dict[int, dict[int, int] | None] = {}

    def vlen_attribute_ok(self, header_address: int, name: str) -> bool:
        try:
            refs = self._references(header_address, name.encode("utf-8"))
            for length, address, index in refs:
                objects = self._collection(address)
                if objects is None or objects.get(index, -1) < length:
                    return False
            return True
        except (Unverified, struct.error):
            return False

    def _read(self, address: int, length: int) -> bytes:
        start = self._base + address
        if address < 0 or length < 0 or start + length > self._size:
            raise Unverified("address past the end of the file")
        data = self._raw(start, length)
        if len(data) != length:
            raise Unverified("short read")
        return data

    # ----------------------------------------------------------------- object headers

    def _messages(self, address: int) -> list[tuple[int, bytes]]:
        head = self._read(address, 16)
        if head[:4] == b"OHDR":
            return self._messages_v2(address)
        if head[0] != 1:
            raise Unverified("unknown object header version")
        (_, _, _count, _refs, chunk_size) = _unpack("<BBHII", head, 0)
        blocks = [(address + 16, chunk_size)]
        found: list[tuple[int, bytes]] = []
        while blocks:
            if len(blocks) > limits.MAX_HDF5_HEADER_BLOCKS:
                raise Unverified("too many header continuation blocks")
            start, length = blocks.pop(0)
            data = self._read(start, length)
            at = 0
            while at + 8 <= len(data):
                kind, size = _unpack("<HH", data, at)
                body = data[at + 8 : at + 8 + size]
                if len(body) != size:
                    raise Unverified("header message runs past its block")
                self._collect(kind, body, found, blocks)
                at += 8 + size
        return found

    def _messages_v2(self, address: int) -> list[tuple[int, bytes]]:
        prefix = self._read(address, 4 + 1 + 1 + 16 + 4 + 8)
        version, flags = prefix[4], prefix[5]
        if version != 2:
            raise Unverified("unknown object header version")
        at = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 0x03)
        (chunk_size,) = _unpack({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width], prefix, at)
        blocks = [(address + at + width, chunk_size, False)]
        order = 2 if flags & 0x04 else 0
        found: list[tuple[int, bytes]] = []
        spawned: list[tuple[int, int]] = []
        count = 0
        while blocks:
            count += 1
            if count > limits.MAX_HDF5_HEADER_BLOCKS:
                raise Unverified("too many header continuation blocks")
            start, length, is_continuation = blocks.pop(0)
            data = self._read(start, length)
            at = 0
            if is_continuation:
                if data[:4] != b"OCHK":
                    raise Unverified("continuation block without OCHK")
                at, data = 4, data[:-4]  # checksum
            while at + 4 + order <= len(data):
                kind, size, _ = _unpack("<BHB", data, at)
                at += 4 + order
                body = data[at : at + size]
                if len(body) != size:
                    raise Unverified("header message runs past its block")
                self._collect(kind, body, found, spawned)
                at += size
            blocks.extend((start, length, True) for start, length in spawned)
            spawned.clear()
        return found

    def _collect(
        self, kind: int, body: bytes, found: list[tuple[int, bytes]], blocks: list[tuple[int, int]]
    ) -> None:
        if kind == ATTRIBUTE:
            found.append((kind, body))
        elif kind == CONTINUATION:
            (offset,) = _unpack(self._o, body, 0)
            (length,) = _unpack(self._l, body, self._osize)
            blocks.append((offset, length))

    # ----------------------------------------------------------------- attributes

    def _references(self, header_address: int, name: bytes) -> list[tuple[int, int, int]]:
        for _, body in self._messages(header_address):
            parsed = self._attribute(body)
            if parsed is not None and parsed[0] == name:
                return parsed[1]
        raise Unverified("attribute not in the object header (dense storage?)")

    def _attribute(self, body: bytes) -> tuple[bytes, list[tuple[int, int, int]]] | None:
        version, flags, name_size, type_size, space_size = _unpack("<BBHHH", body, 0)
        if version not in (1, 2, 3) or flags & 0x03:
            raise Unverified("unknown attribute message (or a shared datatype)")
        at = 8 if version in (1, 2) else 9

        def span(size: int) -> int:
            return (size + 7) & ~7 if version == 1 else size

        name = body[at : at + name_size].split(b"\0", 1)[0]
        at += span(name_size)
        datatype = body[at : at + type_size]
        at += span(type_size)
        dataspace = body[at : at + space_size]
        at += span(space_size)
        if len(datatype) < 8 or datatype[0] & 0x0F != VLEN_CLASS:
            return name, []
        count = self._elements(dataspace)
        element = 4 + self._osize + 4
        data = body[at : at + count * element]
        if len(data) != count * element:
            raise Unverified("attribute data runs past its message")
        refs = []
        for index in range(count):
            start = index * element
            (length,) = _unpack("<I", data, start)
            (address,) = _unpack(self._o, data, start + 4)
            (object_index,) = _unpack("<I", data, start + 4 + self._osize)
            if length:
                refs.append((length, address, object_index))
        return name, refs

    def _elements(self, dataspace: bytes) -> int:
        version, rank, _flags = _unpack("<BBB", dataspace, 0)
        if version == 1:
            at = 8
        elif version == 2:
            at = 4
            if dataspace[3] == 2:  # null dataspace
                return 0
        else:
            raise Unverified("unknown dataspace version")
        count = 1
        for axis in range(rank):
            (extent,) = _unpack(self._l, dataspace, at + axis * self._lsize)
            count *= extent
        if count > 1 << 24:
            raise Unverified("too many elements")
        return count

    # ----------------------------------------------------------------- global heap

    def _collection(self, address: int) -> dict[int, int] | None:
        """Object sizes by index, if the collection parses with strict progress and bounds."""
        if address in self._collections:
            return self._collections[address]
        self._collections[address] = None
        head = self._read(address, 8 + self._lsize)
        if head[:4] != b"GCOL" or head[4] != 1:
            return None
        (size,) = _unpack(self._l, head, 8)
        if size < 8 + self._lsize or size > limits.MAX_HDF5_COLLECTION:
            return None
        data = self._read(address, size)
        header = 8 + self._lsize  # index, references, reserved, size
        objects: dict[int, int] = {}
        at = 8 + self._lsize
        while at < size:
            if at + header > size:
                break  # too small for an object: free space
            (index,) = _unpack("<H", data, at)
            (object_size,) = _unpack(self._l, data, at + 8)
            need = object_size if index == 0 else header + ((object_size + 7) & ~7)
            if need < header or need > size - at:
                return None
            if index:
                objects[index] = object_size
            at += need
        self._collections[address] = objects
        return objects
