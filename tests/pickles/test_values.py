"""``Value``, the plain-class stand-in for a frozen dataclass that the pickle layer and the
scan's findings are built on: the same equality, hashing, repr, immutability and pickling a
frozen dataclass of the same fields has, which is what the code using them relies on."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import pytest

from modelport.pickles.interface import Limits
from modelport.pickles.records import ByteSpan, FileBytes
from modelport.pickles.symbols import PickleFinding
from modelport.pickles.torch_types import TorchDType
from modelport.scanning.findings import Finding
from modelport.severity import Severity
from modelport.tensors import Storage


@dataclass(frozen=True)
class _Limits:
    """What ``Limits`` was: the oracle for its defaults, repr and equality."""

    max_opcodes: int = 50_000_000
    max_memo: int = 10_000_000
    max_stack: int = 1_000_000
    max_marks: int = 100_000
    inline_bytes: int = 64 * 1024
    max_seconds: float | None = None


def test_a_value_compares_hashes_and_shows_as_a_frozen_dataclass() -> None:
    ours, theirs = Limits(max_opcodes=32, max_seconds=1.5), _Limits(max_opcodes=32, max_seconds=1.5)
    assert repr(ours) == repr(theirs).replace("_Limits", "Limits")
    assert ours == Limits(32, max_seconds=1.5)
    assert hash(ours) == hash(Limits(32, max_seconds=1.5))
    assert ours != Limits() and Limits() == Limits()
    assert ours != theirs  # another class, as between two dataclasses
    assert {TorchDType("float32"): 1}[TorchDType("float32")] == 1


def test_a_value_cannot_be_changed() -> None:
    limits = Limits()
    with pytest.raises(AttributeError):
        limits.max_opcodes = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del limits.max_memo
    assert limits.max_opcodes == 50_000_000


def test_a_subclass_compares_and_shows_only_its_fields() -> None:
    """``FileBytes`` is its span to compare and show (its storage is where the bytes lie),
    and never equal to a bare ``ByteSpan``, as the dataclass was."""
    first = FileBytes(8, 16, Storage(None, 0, 16, "a"))
    second = FileBytes(8, 16, Storage(None, 0, 16, "b"))
    assert first == second and hash(first) == hash(second)
    assert first != ByteSpan(8, 16)
    assert repr(first) == "FileBytes(offset=8, length=16)"


def test_values_survive_pickle_and_copy() -> None:
    """The fleet's workers send findings back pickled."""
    finding = Finding(Severity.HIGH, "unknown-call", "data.pkl", "calls os.system", offset=4)
    span = FileBytes(1, 2, Storage(None, 0, 2, "k"))
    assert pickle.loads(pickle.dumps(finding)) == finding
    assert copy.deepcopy(finding) == finding
    restored = pickle.loads(pickle.dumps(span))
    assert restored == span and restored.storage.key == "k"
    found = PickleFinding(Severity.INFO, "r", 0, "GLOBAL", "a.b", "called", "m")
    assert copy.copy(found) == found
