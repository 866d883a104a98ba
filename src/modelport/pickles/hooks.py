"""Calls a pickle makes without naming them: the methods its own opcodes reach on an object,
and loaders hidden in bytes it hands on.

- APPEND, APPENDS and ADDITEMS on anything but the list or set the pickle made call the
  object's ``append``, ``extend`` or ``add``, looked up on the object, so an attribute a
  BUILD state planted wins; SETITEM(S) calls its type's ``__setitem__``, which may look up
  the object's own methods in turn (torch's ``ModuleDict.add_module``). pickle writes an
  object's items before its state, so items after a BUILD are a planted call.
- BUILD puts the keys of a dict state into the object's ``__dict__`` (``nn.Module`` and any
  class without ``__setstate__``): a state that is no literal dict, a computed mapping
  (``OrderedDict(...)``) or a global, has keys no scan can read, ``__setstate__`` among
  them, which a second BUILD on the object then calls. pickle builds each object once.
- A bytes constant that opens like a pickle, a zip or an ``.npy`` is what a class's own
  ``__setstate__`` or a config loader may load: scanned as a nested payload.
Each rule is a plain function, so the Python machine's resolver and the fast path's records
decide alike.
"""

from __future__ import annotations

import re
from itertools import islice
from typing import Any, Final

from modelport.pickles import policy
from modelport.pickles.records import ByteSpan
from modelport.pickles.rules import PLAIN_SAFE_CALLS
from modelport.pickles.symbols import BYTES_CONSTANT, Made, Symbol

__all__ = [
    "BYTES_CONSTANT",
    "PAYLOAD_HEADS",
    "item_hook",
    "encoded_payload",
    "may_hold_payload",
    "opaque_state",
    "payloads",
    "repeated_build",
]

# Classes whose ``__setitem__`` is the C mapping's own: items set on them call nothing the
# object holds, whatever a state put in its ``__dict__``.
_PLAIN_MAPPINGS: Final = frozenset(
    {
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("collections", "Counter"),
        ("builtins", "dict"),
    }
)
# Allowlisted globals whose result is never a mapping, so never a dict state in disguise:
# the allowlist less the mappings and the reconstructors that call or instantiate one of
# their arguments (their result is whatever that argument makes).
_NOT_MAPPINGS: Final = (
    (
        policy.SAFE_CALLS
        | policy.SAFE_VALUES
        | frozenset(policy.SAFE_CLASSES)
        | frozenset(policy.SAFE_STDLIB_CALLS)
        | frozenset(policy.SAFE_LIBRARY_OBJECTS)
    )
    - _PLAIN_MAPPINGS
    - frozenset(policy.PASSED_ON)
)

# How a nested payload opens: a pickle's PROTO 2-5, a zip's local header, numpy's magic.
PAYLOAD_HEADS: Final = (
    *(bytes([0x80, protocol]) for protocol in range(2, 6)),
    b"PK\x03\x04",
    b"\x93NUMPY",
)
_FIRST_BYTES: Final = frozenset(head[0] for head in PAYLOAD_HEADS)
_LONGEST_HEAD: Final = max(len(head) for head in PAYLOAD_HEADS)
ENCODE: Final = ("_codecs", "encode")
# How much of a value ``payloads`` looks through: nesting and items, per opcode.
_PAYLOAD_DEPTH = 4
_PAYLOAD_ITEMS = 256


def item_hook(target: Any, setting: bool) -> str | None:
    """Why adding items to ``target`` (SETITEM(S) when ``setting``, else APPEND(S) or
    ADDITEMS) may run a call the pickle planted; None when it only fills a container."""
    if isinstance(target, Symbol):
        return (
            f"adds items to {target.path} itself (a module, class or function): that calls "
            "its methods with data from the file, or changes it for the whole process"
        )
    if not isinstance(target, Made) or not target.states:
        return None
    origin = target.origin
    if setting and isinstance(origin, Symbol) and origin.key in _PLAIN_MAPPINGS:
        return None
    method = "__setitem__" if setting else "append, extend or add"
    return (
        f"adds items to an object after a BUILD gave it state: pickle writes items first, "
        f"and the state can plant the {method} the items are handed to, a hidden call"
    )


def opaque_state(state: Any) -> bool:
    """Whether a BUILD state may be a mapping whose keys no scan reads: a computed value or a
    global, alone or as a part of a (state, slot state) pair whose parts could be dicts."""
    if isinstance(state, tuple) and len(state) == 2:
        if not all(part is None or isinstance(part, dict) or _computed(part) for part in state):
            return False  # a part no unpickler takes as a dict: a __setstate__ of its own
        return any(_computed(part) for part in state)
    return _computed(state)


def _computed(value: Any) -> bool:
    if isinstance(value, Symbol):
        return True
    if not isinstance(value, Made):
        return False
    origin = value.origin
    return not (isinstance(origin, Symbol) and origin.key in _NOT_MAPPINGS)


def repeated_build(made: Made) -> bool:
    """Whether BUILD has filled ``made`` more than once, for an object whose BUILD is not its
    allowlisted reconstructor's own (a numpy array's or dtype's ``__setstate__``, an
    ``OrderedDict``'s attributes, whose every state the other rules read)."""
    if len(made.states) < 2:
        return False
    origin = made.origin
    return not (isinstance(origin, Symbol) and origin.key in PLAIN_SAFE_CALLS)


def payloads(value: Any, data: memoryview | None) -> list[bytes | ByteSpan]:
    """The bytes in ``value`` (looked through tuples, lists, dicts and sets, a bounded
    amount) that open like a pickle, a zip or an ``.npy``; a ``ByteSpan`` is read in
    ``data``, the pickle's bytes."""
    found: list[bytes | ByteSpan] = []
    todo: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while todo and seen < _PAYLOAD_ITEMS:
        item, depth = todo.pop()
        seen += 1
        if isinstance(item, (bytes, bytearray)):
            if item[:1] and item[0] in _FIRST_BYTES and _is_payload(bytes(item[:_LONGEST_HEAD])):
                found.append(bytes(item))
        elif isinstance(item, ByteSpan):
            if data is not None and _is_payload(
                bytes(data[item.offset : item.offset + min(item.length, _LONGEST_HEAD)])
            ):
                found.append(item)
        elif depth < _PAYLOAD_DEPTH and isinstance(item, (tuple, list, set, frozenset)):
            todo += [(part, depth + 1) for part in islice(item, _PAYLOAD_ITEMS)]
        elif depth < _PAYLOAD_DEPTH and isinstance(item, dict):
            todo += [(part, depth + 1) for part in islice(item.values(), _PAYLOAD_ITEMS)]
    return found


def encoded_payload(args: tuple[Any, ...]) -> bytes | None:
    """The bytes a protocol 2 pickle spells as ``_codecs.encode(text, "latin1")`` (``args``),
    when they open like a payload: looked at where they are made, since the text may be
    spelled with escapes no search of the pickle's bytes finds."""
    if len(args) != 2:
        return None
    text, codec = args
    if not (isinstance(text, str) and text and ord(text[0]) in _FIRST_BYTES):
        return None
    if codec not in ("latin1", "latin-1", "iso-8859-1"):
        return None
    try:
        encoded = text.encode("latin-1")
    except UnicodeEncodeError:
        return None  # the loader's encode fails before anything is loaded
    return encoded if _is_payload(encoded[:_LONGEST_HEAD]) else None


def _is_payload(head: bytes) -> bool:
    return head.startswith(PAYLOAD_HEADS)


# Where a payload's first bytes may begin: PROTO 2-5 (found by one search), a zip's local
# header, numpy's magic; in UTF-8 text the first and last follow a 0xc2 byte.
_PROTOCOL_HEAD: Final = re.compile(rb"\x80[\x02-\x05]")
_OTHER_HEADS: Final = ((b"PK\x03\x04", False), (b"\x93NUMPY", True))
_UTF8_LEAD = 0xC2
# The opcodes that may hold the head as the first bytes of their constant, by how far
# before the head their opcode byte lies (the opcode and its length): bytes (SHORT_BINBYTES,
# BINBYTES, BINBYTES8, BYTEARRAY8, and the protocol 0-2 strings read as latin-1), and
# text, read as UTF-8, for ``_codecs.encode`` (SHORT_BINUNICODE, BINUNICODE, BINUNICODE8).
_BYTES_OPCODES: Final = ((2, b"CU"), (5, b"BT"), (9, b"\x8e\x96"))
_TEXT_OPCODES: Final = ((2, b"\x8c"), (5, b"X"), (9, b"\x8d"))


def may_hold_payload(program: bytes) -> bool:
    """Whether a pickle's bytes may hold a constant ``payloads`` would find: every place a
    payload's first bytes appear, looked at with the bytes before it (an opcode that would
    make them the first of its constant). It finds every such constant and, rarely, data
    that only looks like one; the heads are rare, and searches for them run in C."""
    for found in _PROTOCOL_HEAD.finditer(program):
        if _payload_at(program, found.start(), True):
            return True
    for head, led in _OTHER_HEADS:
        at = program.find(head)
        while at >= 0:
            if _payload_at(program, at, led):
                return True
            at = program.find(head, at + 1)
    return False


def _payload_at(program: bytes, at: int, led: bool) -> bool:
    """Whether the head at ``at`` begins a bytes constant, or a text one (where a head
    ``led`` by 0xc2 in UTF-8 begins a byte earlier)."""
    if _opens(program, at, _BYTES_OPCODES):
        return True
    if led:
        at -= 1
        if at < 0 or program[at] != _UTF8_LEAD:
            return False
    return _opens(program, at, _TEXT_OPCODES)


def _opens(program: bytes, at: int, opcodes: tuple[tuple[int, bytes], ...]) -> bool:
    """Whether one of ``opcodes`` lies just far enough before ``at`` for its constant to
    begin there."""
    return any(at >= distance and program[at - distance] in codes for distance, codes in opcodes)
