"""The nested part of a torch archive's ``data.pkl``: plain data around the tensors.

``convert --all`` keeps a training checkpoint whole; for a torch target its tree
(``typed_json`` plain data with ``OutputTensor`` leaves) is pickled as ``torch.save`` would
pickle it, with only what ``torch.load(weights_only=True)`` accepts (protocol 2):

- ``None``, ``True``/``False``, ints (``BININT1``/``BININT2``/``BININT``/``LONG1``: at most
  255 bytes, ``weights_only`` has no ``LONG4``), floats (``BINFLOAT``, every bit kept: nan
  payloads, ``-0.0``), strings (``BINUNICODE``, lone surrogates as torch writes them);
- lists (``EMPTY_LIST`` + ``APPENDS`` in batches), tuples (``TUPLE1/2/3``, ``TUPLE``),
  dicts (``EMPTY_DICT`` + ``SETITEMS``), ``collections.OrderedDict`` (``REDUCE`` +
  ``SETITEMS``, then ``BUILD`` with its attribute dict, the state_dict's ``_metadata``,
  where it has one);
- ``bytes`` as ``_codecs.encode(latin-1 text, "latin1")``, ``bytearray(bytes)``,
  ``set([items])``, ``complex(real, imag)``, ``torch.<dtype>``, ``torch.device(spec)``:
  each a global ``weights_only`` allows;
- each tensor leaf as the writer's ``_rebuild_tensor_v2`` call; a tensor at several leaves
  (tied) is rebuilt at each over one storage record, so they share memory again.

Nothing else is written: anything outside plain data is a ``ConversionError``.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from modelport import limits
from modelport.errors import ConversionError
from modelport.pickles.torch_types import TorchDevice, TorchDType
from modelport.transfer.write_plan import OutputTensor

BATCH = 1000  # items per APPENDS / SETITEMS, as pickle batches them
LONG1_BYTES = 255


class PickleOut(Protocol):
    """What the torch writer's opcode emitter offers (``torch_zip._Pickle``)."""

    out: bytearray

    def global_(self, module: str, name: str) -> None: ...
    def text(self, value: str, *, memo: bool = False) -> None: ...
    def integer(self, value: int) -> None: ...
    def ordered_dict(self) -> None: ...


def pickle_tree(out: PickleOut, tree: Any, tensor: Callable[[OutputTensor], None]) -> None:
    """Append the opcodes that build ``tree`` to ``out``; ``tensor`` emits one tensor."""
    _Tree(out, tensor).value(tree, 0)


class _Tree:
    def __init__(self, out: PickleOut, tensor: Callable[[OutputTensor], None]) -> None:
        self.out = out
        self.tensor = tensor

    def value(self, value: Any, depth: int) -> None:
        if depth > limits.MAX_DEPTH:
            raise ConversionError(f"the tree nests deeper than {limits.MAX_DEPTH} containers")
        raw = self.out.out
        kind = type(value)
        if value is None:
            raw += b"N"
        elif kind is bool:
            raw += b"\x88" if value else b"\x89"
        elif kind is int:
            self.int_(value)
        elif kind is float:
            raw += b"G" + struct.pack(">d", value)
        elif kind is str:
            self.out.text(value)
        elif kind is bytes:
            self.bytes_(value)
        elif kind is bytearray:
            self.out.global_("builtins", "bytearray")
            self.bytes_(bytes(value))
            raw += b"\x85R"
        elif kind is complex:
            self.out.global_("builtins", "complex")
            raw += b"G" + struct.pack(">d", value.real) + b"G" + struct.pack(">d", value.imag)
            raw += b"\x86R"
        elif isinstance(value, OutputTensor):
            self.tensor(value)
        elif kind is list:
            raw += b"]"
            self.appends(value, depth)
        elif kind is tuple:
            self.tuple_(value, depth)
        elif kind is set:
            self.out.global_("builtins", "set")
            raw += b"]"
            self.appends(list(value), depth)
            raw += b"\x85R"
        elif isinstance(value, OrderedDict):
            self.out.ordered_dict()
            self.setitems(value, depth)
            state = getattr(value, "pickle_state", None)
            if state is not None:
                self.value(state, depth + 1)
                raw += b"b"  # BUILD: OrderedDict.__dict__.update(state)
        elif kind is dict:
            raw += b"}"
            self.setitems(value, depth)
        elif isinstance(value, TorchDType):
            self.out.global_("torch", value.name)
        elif isinstance(value, TorchDevice):
            self.out.global_("torch", "device")
            self.out.text(value.spec)
            raw += b"\x85R"
        else:
            raise ConversionError(f"a torch archive's tree cannot hold a {kind.__qualname__}")

    def int_(self, value: int) -> None:
        if (value.bit_length() >> 3) + 1 > LONG1_BYTES:
            raise ConversionError(
                f"an int of {value.bit_length()} bits is past what torch.load(weights_only=True) "
                "reads"
            )
        self.out.integer(value)

    def bytes_(self, value: bytes) -> None:
        """``_codecs.encode("<latin-1 text>", "latin1")``: protocol 2's spelling of bytes."""
        self.out.global_("_codecs", "encode")
        self.out.text(value.decode("latin-1"))
        self.out.text("latin1", memo=True)
        self.out.out += b"\x86R"

    def tuple_(self, value: tuple[Any, ...], depth: int) -> None:
        if not value:
            self.out.out += b")"
            return
        if len(value) > 3:
            self.out.out += b"("
        for item in value:
            self.value(item, depth + 1)
        self.out.out += b"t" if len(value) > 3 else (b"\x85", b"\x86", b"\x87")[len(value) - 1]

    def appends(self, items: list[Any], depth: int) -> None:
        for start in range(0, len(items), BATCH):
            self.out.out += b"("
            for item in items[start : start + BATCH]:
                self.value(item, depth + 1)
            self.out.out += b"e"

    def setitems(self, mapping: dict[Any, Any], depth: int) -> None:
        pairs = list(mapping.items())
        for start in range(0, len(pairs), BATCH):
            self.out.out += b"("
            for key, item in pairs[start : start + BATCH]:
                self.value(key, depth + 1)
                self.value(item, depth + 1)
            self.out.out += b"u"
