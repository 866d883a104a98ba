"""A pickled key that would cost more to hash than to read: tuples shared through the memo
unfold exponentially, and deeply nested ones overflow the C stack. The Python machine
refuses both before hashing, in bounded time, through both readings."""

from __future__ import annotations

import time

import pytest

from modelport.errors import LimitExceededError, ModelportError
from modelport.pickles import judging
from modelport.pickles.interface import Limits
from modelport.pickles.keys import MAX_KEY_TUPLES, bounded_key
from modelport.pickles.reading import read_pickle

# (1,), then 60 times a pair of the tuple before: 2**60 tuples unfolded, in 311 bytes.
SHARED = b"\x80\x02}K\x01\x85q\x00" + b"h\x00\x86q\x00" * 60 + b"Ns."
# 5,000 nested one-item tuples as a key.
NESTED = b"\x80\x02}K\x01" + b"\x85" * 5000 + b"Ns."


@pytest.mark.parametrize("data", [SHARED, NESTED], ids=["shared", "nested"])
def test_the_reading_machine_refuses_a_key_too_costly_to_hash(data: bytes) -> None:
    started = time.monotonic()
    with pytest.raises(ModelportError):
        read_pickle(data, limits=Limits(max_seconds=30.0))
    assert time.monotonic() - started < 5


def test_the_scanning_machine_refuses_it_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judging.fast_scan, "clean_run", lambda *args: None)  # the machine alone
    started = time.monotonic()
    with pytest.raises(ModelportError):
        judging.scan_pickle(SHARED)
    assert time.monotonic() - started < 5


def test_a_real_key_passes_unchanged() -> None:
    key = (("layer", 3), (16, 16), "weight")
    assert bounded_key(key) is key
    wide = tuple((i,) for i in range(MAX_KEY_TUPLES))
    with pytest.raises(LimitExceededError):
        bounded_key(wide)
