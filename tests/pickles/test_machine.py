"""The pickle machine: stdlib pickle is the oracle for plain data; nothing in a file ever runs."""

from __future__ import annotations

import copyreg
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import modelport
from modelport.errors import (
    CorruptFileError,
    FormatError,
    LimitExceededError,
    ModelportError,
    TruncatedFileError,
)
from modelport.pickles.interface import Limits
from modelport.pickles.reading import CALLABLES, CONSTANTS, read_pickle
from modelport.pickles.records import CallRecord, GlobalRef, ObjectRecord
from tests.conftest import ATTACKS
from tests.mutation import pickle_walk

plain_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=5)
        | st.frozensets(st.integers(), max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(value=plain_data, protocol=st.integers(0, 5))
def test_plain_data_matches_stdlib(value: Any, protocol: int) -> None:
    data = pickle.dumps(value, protocol=protocol)
    assert read_pickle(data).value == pickle.loads(data)


def test_shared_references_stay_shared() -> None:
    inner = [1, 2]
    value = read_pickle(pickle.dumps({"a": inner, "b": inner}, protocol=4)).value
    assert value["a"] is value["b"]


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=200))
def test_random_bytes_only_raise_modelport_errors(blob: bytes) -> None:
    """Random bytes are refused with a typed error, or read as a pickle that ends (and has
    the protocol) where Python's own walk of the same bytes finds its STOP."""
    walk = pickle_walk(blob)
    try:
        result = read_pickle(blob, limits=Limits(max_opcodes=10_000))
    except ModelportError as exc:  # the outcome: asserted on, not swallowed
        assert isinstance(exc, (FormatError, LimitExceededError)), repr(exc)
        assert str(exc) != ""
        return
    # modelport reads names CPython cannot decode (GLOBAL, INST, PERSID), showing U+FFFD
    end = walk.end_any_name if walk.undecodable_name else walk.end
    assert end is not None, f"read {blob!r}, in which Python's walk finds no STOP"
    assert (result.end, result.protocol) == (end, walk.protocol), "not where Python's walk ends"
    assert 0 < result.end <= len(blob) and blob[result.end - 1 : result.end] == b"."
    assert result.opcodes >= 1


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x80\x04}]Ns.", id="list-as-dict-key"),
        pytest.param(b"\x80\x04\x8f(]\x90.", id="list-added-to-set"),
        pytest.param(
            b"\x80\x04\x8f]a.",
            id="list-appended-to-set",
        ),
        pytest.param(
            b"\x80\x04\x8f(]e.",
            id="lists-appended-to-set",
        ),
    ],
)
def test_unhashable_items_are_corrupt_pickles(tmp_path: Path, payload: bytes) -> None:
    """Python's unpickler refuses each of these (unhashable key, no append on a set); the
    machine must too, with a typed error, and the scanner must report an error, not crash."""
    with pytest.raises(CorruptFileError):
        read_pickle(payload)
    path = tmp_path / "p.pkl"
    path.write_bytes(payload)
    assert modelport.scan(path).verdict == "error"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x80\x04}\x8c\x01x\x93.", id="global-of-a-dict"),
        pytest.param(
            b"\x80\x04}\x8c\x01x\x93)\x81}b.",
            id="object-of-a-dict-global-built",
        ),
        pytest.param(
            b"\x80\x04}\x8c\x01x\x93)R.",
            id="call-of-a-dict-global",
        ),
    ],
)
def test_globals_named_by_non_text_never_crash_the_scan(tmp_path: Path, payload: bytes) -> None:
    """CPython refuses STACK_GLOBAL on anything but two str ("STACK_GLOBAL requires str");
    the scanner may report such a pickle as it likes, except safe, and must not crash."""
    path = tmp_path / "p.pkl"
    path.write_bytes(payload)
    assert modelport.scan(path).verdict in ("suspicious", "unsafe", "error")


# The catalogue's attacks whose pickle is one call or object at the top (not data holding one).
TOP_LEVEL_ATTACKS = tuple(name for name in ATTACKS if name != "weights-and-call")


@pytest.mark.parametrize("name", TOP_LEVEL_ATTACKS)
def test_attack_pickles_never_run(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes], name: str
) -> None:
    payload = attacks[name]
    value = read_pickle(payload).value
    assert not marker.exists()
    assert isinstance(value, (CallRecord, ObjectRecord, GlobalRef))
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    report = modelport.inspect(path)  # reading shows it, and says what it is; never runs it
    assert report.safety["verdict"] == "unsafe", report.safety
    assert not marker.exists()
    # The reference loader would run it: proves the payload is real (in a child process).
    if name in ("global-reduce", "exec"):
        import subprocess
        import sys

        subprocess.run(
            [
                sys.executable,
                "-c",
                "import pickle,sys; pickle.loads(open(sys.argv[1],'rb').read())",
                str(path),
            ],
            check=False,
        )
        assert marker.exists()
        marker.unlink()


def test_extension_codes_stay_records() -> None:
    copyreg.add_extension("posix", "system", 0x7F01)
    try:
        payload = pickle.dumps(os.system, protocol=2)
    finally:
        copyreg.remove_extension("posix", "system", 0x7F01)
    assert b"\x83\x01\x7f" in payload  # EXT2 0x7f01
    value = read_pickle(payload).value
    assert isinstance(value, GlobalRef) and "extension" in value.name


def test_memo_and_stack_bombs_hit_limits() -> None:
    memo_bomb = b"\x80\x04" + b"N\x94" * 5000 + b"."
    with pytest.raises(LimitExceededError):
        read_pickle(memo_bomb, limits=Limits(max_memo=1000))
    stack_bomb = b"N" * 5000 + b"."
    with pytest.raises(LimitExceededError):
        read_pickle(stack_bomb, limits=Limits(max_stack=1000))
    mark_bomb = b"(" * 5000
    with pytest.raises(LimitExceededError):
        read_pickle(mark_bomb, limits=Limits(max_marks=1000))


def test_deep_nesting_does_not_recurse(tmp_path: Path) -> None:
    depth = 100_000
    payload = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    value = read_pickle(payload).value
    assert isinstance(value, list)
    path = tmp_path / "deep.pkl"
    path.write_bytes(payload)
    with pytest.raises(ModelportError):
        modelport.inspect(path)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x80\x04",
        b"\x80\x04\x8c\x05ab",
        b"\x80\x02X\xff\xff\xff\x7f",
        b"\x80\x09.",
        b"\xff.",
        b"0.",
    ],
)
def test_malformed_pickles(payload: bytes) -> None:
    with pytest.raises(ModelportError):
        read_pickle(payload)


def test_lying_binbytes8_length_is_caught_before_allocation() -> None:
    payload = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"abc."
    with pytest.raises(TruncatedFileError, match="needs 4611686018427387904 bytes, 4 remain"):
        read_pickle(payload)


def test_numpy_arrays_in_pickles_are_tensors() -> None:
    array = np.arange(20_000, dtype=np.float32).reshape(100, 200)
    for protocol in (2, 3, 4, 5):
        value = read_pickle(
            pickle.dumps({"a": array, "s": np.float64(2.5)}, protocol=protocol)
        ).value
        assert value["s"] == 2.5
        tensor = value["a"].tensor
        assert tensor.dtype == "float32" and tensor.shape == (100, 200)
        assert np.array_equal(tensor.numpy(), array)


def test_allowlist_tables_are_immutable_and_explained() -> None:
    for table in (CALLABLES, CONSTANTS):
        with pytest.raises(TypeError):
            table[("os", "system")] = None  # type: ignore[index]
        for key, (_, reason) in table.items():
            assert isinstance(reason, str) and reason.strip() != "", key
    assert not any(
        module in ("os", "posix", "subprocess", "builtins")
        and name in ("system", "exec", "eval", "getattr", "__import__")
        for module, name in CALLABLES
    )


def test_a_frame_longer_than_the_pickle_is_truncated_as_cpython_says() -> None:
    good = pickle.dumps({"a": 1}, protocol=4)
    bad = good[:3] + struct.pack("<Q", 1000) + good[11:]
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        pickle.loads(bad)  # the reference unpickler's answer
    with pytest.raises(TruncatedFileError, match="FRAME at byte 2 claims 1000 bytes"):
        read_pickle(bad)
    assert read_pickle(good).value == {"a": 1}
