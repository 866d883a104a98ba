"""The machine against CPython's unpickler (the C one ``pickle.load`` uses), the reference
for what a pickle's opcodes mean: what CPython reads to its STOP, the machine reads to the
same STOP. CPython runs with every global replaced by an inert stand-in, so nothing from the
data is imported or called. (CPython reads a protocol 4+ frame whole before running it, so
its stream position may lie past the STOP inside a damaged frame, never before it.)"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelport.errors import ModelportError
from modelport.pickles.judging import ScanResolver
from modelport.pickles.machine import run
from tests.conftest import attack_pickles
from tests.models import TinyResNet, trained_checkpoint


class _Inert:
    """What every global becomes in the reference run: callable, buildable, never code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class _Reference(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        return _Inert()


def reference_end(data: bytes) -> int | None:
    """Where CPython's unpickler stops, or None when it refuses the bytes."""
    stream = io.BytesIO(data)
    try:
        _Reference(stream).load()
    except Exception:  # any refusal: the reference's only verdict is "does not parse"
        return None
    return stream.tell()


def machine_end(data: bytes) -> int | None:
    try:
        return run(data, ScanResolver(data=memoryview(data), expect_persistent_ids=True)).end
    except ModelportError:
        return None


def _real_pickles() -> list[bytes]:
    found = []
    for protocol in range(6):
        value = {"w": [1.5, -2, "x" * 300, b"\x00" * 70], "t": (None, True), 2: {3, 4}}
        found.append(pickle.dumps(value, protocol=protocol))
        found.append(pickle.dumps(np.arange(6.0).reshape(2, 3), protocol=protocol))
    for obj in (
        TinyResNet().state_dict(),
        trained_checkpoint(TinyResNet(), torch.ones(1, 3, 8, 8)),
    ):
        buffer = io.BytesIO()
        torch.save(obj, buffer, _use_new_zipfile_serialization=False)
        raw = buffer.getvalue()
        # the legacy stream's pickles: magic number, protocol, sys_info, objects, storage keys
        end = 0
        for _ in range(5):
            stop = machine_end(raw[end:])
            assert stop is not None
            found.append(raw[end : end + stop])
            end += stop
    return found


REAL = _real_pickles()


@pytest.mark.parametrize("index", range(len(REAL)))
def test_real_pickles_end_where_cpython_ends(index: int) -> None:
    data = REAL[index]
    assert machine_end(data) == reference_end(data) == len(data)


# Where the reference refuses only because its stand-ins are not the real globals: an
# unregistered extension code, a STACK_GLOBAL whose name a stand-in call was to compute.
_REFERENCE_CANNOT_FOLLOW = frozenset(("ext-code", "dynamic-stack-global"))


@pytest.mark.parametrize("name", sorted(attack_pickles(Path("M"))))
def test_attack_pickles_end_where_cpython_ends(name: str) -> None:
    data = attack_pickles(Path("M"))[name]
    if name in _REFERENCE_CANNOT_FOLLOW:
        assert reference_end(data) is None and machine_end(data) == len(data)
        return
    assert machine_end(data) == reference_end(data) == len(data)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_pickles_agree_with_cpython(data: st.DataObject) -> None:
    raw = bytearray(data.draw(st.sampled_from(REAL)))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    mutated = bytes(raw[: data.draw(st.integers(1, len(raw)))])
    reference = reference_end(mutated)
    ours = machine_end(mutated)
    if reference is not None:  # what CPython reads to its STOP, the machine reads the same
        assert ours is not None and ours <= reference, mutated
