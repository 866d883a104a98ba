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


def mutated(data: object, raw: bytes, *, flips: int = 4, keep: int = 0) -> bytes:
    """``raw`` with 1..``flips`` random bytes changed (never the first ``keep``), then cut at
    a random length: the input of every "bad bytes only raise ModelportError" property."""
    from hypothesis import strategies as st

    draw = data.draw  # type: ignore[attr-defined]
    changed = bytearray(raw)
    for _ in range(draw(st.integers(1, flips))):
        changed[draw(st.integers(keep, len(changed) - 1))] = draw(st.integers(0, 255))
    return bytes(changed[: draw(st.integers(0, len(changed)))])


def assert_same_tensors(expected: dict[str, object], path: Path, fmt: str | None = None) -> None:
    """modelport.open must list exactly these torch tensors: names, dtypes, shapes, bytes."""
    import torch

    import modelport

    with modelport.open(path) as model:
        if fmt is not None:
            assert model.format.value == fmt
        assert list(model.tensors) == list(expected)
        for name, tensor in expected.items():
            assert isinstance(tensor, torch.Tensor)
            ref = model.tensors[name]
            assert ref.dtype == str(tensor.dtype).removeprefix("torch."), name
            assert ref.shape == tuple(tensor.shape), name
            assert ref.nbytes == tensor.numel() * tensor.element_size(), name
            assert torch_digest(ref.torch()) == torch_digest(tensor), name
            if tensor.dtype not in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
                assert digest(ref.numpy()) == digest(tensor.contiguous().numpy()), name
