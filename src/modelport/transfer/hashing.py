"""A file's (or a folder's) sha256, streamed through one reused buffer: the one digest of
raw bytes that conversion provenance, fleet dedupe, reports and model cards all record; and
a tensor's, over its elements, which the weights hash and the duplicate flag compare."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

from modelport.tensors import TensorRef
from modelport.transfer.streaming import source_chunks

READ_STEP: Final = 1 << 20  # bytes read at a time (hashlib releases the GIL above 2 KiB)
NO_DATA: Final = "no-data"  # the digest of a tensor saved without its values


def sha256_of(path: str | Path) -> str:
    """The full-content sha256 of a file, or of every file of a folder in name order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    buffer = bytearray(READ_STEP)
    view = memoryview(buffer)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                digest.update(view[:count])
    return digest.hexdigest()


def tensor_digest(tensor: TensorRef) -> str:
    """sha256 of the tensor's elements in C order, read a bounded chunk at a time."""
    import numpy as np

    if tensor.storage is None:
        return NO_DATA
    hasher = hashlib.sha256()
    if tensor.numel > 0:
        for chunk in source_chunks(tensor):
            hasher.update(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data)
    return hasher.hexdigest()
