"""Shared fixtures. Models are built here, tiny and random, and saved by their own libraries."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest


def digest(array: np.ndarray) -> str:
    """sha256 of a tensor's bytes in C order: the bit-for-bit comparison tests use."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def torch_digest(tensor: object) -> str:
    import torch

    assert isinstance(tensor, torch.Tensor)
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype.is_floating_point and flat.element_size() == 2:
        flat = flat.view(torch.int16)
    elif flat.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bool):
        flat = flat.view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where a malicious payload would write if it ever ran; tests assert it never appears."""
    return tmp_path / "PWNED"
