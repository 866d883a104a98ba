"""Serialized objects carried inside a JSON configuration as base64 text. Keras 3's
``TorchModuleWrapper`` stores a whole ``torch.save`` of its module in its layer config and
``torch.load``s it when the model is loaded with ``safe_mode=False``; other layers and
tools embed pickles the same way. Every long base64 string of a config is decoded, and
what decodes to something a loader interprets (a zip, a pickle, a compressed stream) is
handed back to be scanned like any member."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from typing import Any

from modelport import limits
from modelport.scanning.first_bytes import may_hold_code

_MIN_CHARS = 64  # shorter base64 holds nothing that could carry code
_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]+={0,2}")


def blobs_in(document: Any) -> Iterator[tuple[str, bytes]]:
    """(JSON path, decoded bytes) of each base64 string that decodes to loadable bytes."""
    stack: list[tuple[str, Any]] = [("$", document)]
    nodes = 0
    while stack and nodes < limits.MAX_TREE_NODES:
        where, value = stack.pop()
        nodes += 1
        if isinstance(value, dict):
            stack.extend((f"{where}.{key}", child) for key, child in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", child) for index, child in enumerate(value))
        elif isinstance(value, str) and len(value) >= _MIN_CHARS and _BASE64.fullmatch(value):
            try:
                raw = base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError):
                continue
            if may_hold_code(raw[: 1 << 12]):
                yield where, raw
