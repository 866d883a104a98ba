"""The safetensors writer: the header ``safetensors`` reads, then each tensor's bytes.

It lives beside the reader, not in it, so that reading or scanning a file imports none of
the byte movers (``transfer.streaming``); conversion finds ``WRITER`` through the registry
(``registry.every_writer``).
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

from modelport.formats import safetensors
from modelport.transfer.streaming import write_all, write_tensor
from modelport.transfer.write_plan import WritePlan


def header_bytes(plan: WritePlan) -> bytes:
    """The header for ``plan``: tensors back to back in plan order, padded with spaces to a
    multiple of 8 bytes as the reference writer does (so the data section stays aligned)."""
    header: dict[str, Any] = {}
    if plan.metadata:
        header[safetensors.METADATA_KEY] = plan.metadata
    offset = 0
    for tensor in plan.tensors:
        header[tensor.name] = {
            "dtype": safetensors.CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write(handle: BinaryIO, plan: WritePlan) -> None:
    write_all(handle, header_bytes(plan))
    for tensor in plan.tensors:
        write_tensor(handle, tensor)


WRITER = safetensors.READER._replace(write=write)
