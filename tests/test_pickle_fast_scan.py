"""The scan's fast path (``pickles.fast_scan``, CPython's C unpickler with the scan's
resolver) against the Python machine alone: over every pickle the suite builds, crafted
edge cases and mutated torch pickles, ``scan_pickle`` gives the same findings, nested
payloads, end, opcode count and errors whether the fast path took the pickle or not; the
fast path takes the common clean files, never calls an attack clean, and never imports or
runs anything."""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelport.pickles import fast_scan, judging
from modelport.pickles.interface import Limits
from tests.conftest import attack_pickles, mutated, short
from tests.models import TinyResNet, trained_checkpoint
from tests.test_pickle_machine_differential import PICKLES

LIMITS = (
    Limits(),
    Limits(max_stack=40),
    Limits(max_memo=30),
    Limits(max_marks=5),
    Limits(max_opcodes=150),
    Limits(inline_bytes=4),
    Limits(max_seconds=60.0),
)


def _data_pkl(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))


torch.manual_seed(0)
_MODEL = TinyResNet()
STATE_DICT = _data_pkl(_MODEL.state_dict())
CHECKPOINT = _data_pkl(trained_checkpoint(_MODEL, torch.ones(1, 3, 8, 8)))
NUMPY = pickle.dumps({"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3, np.float32)}, 4)

# Edge cases where C and the Python machine could part: each must scan the same either way.
CRAFTED = [
    b"\x80\x02]K\x00a(K\x00K\x05u.",  # SETITEMS on a list: C calls list.__setitem__
    b"\x80\x02}Nb.",  # BUILD with no state on a dict: a no-op in both
    b"\x80\x02}(N}tb.",  # BUILD with an empty slot state
    b"\x80\x02}}b.",  # BUILD with a dict state on a dict: C finds no __dict__
    b"\x80\x02(K\x01K\x02K\x03d.",  # DICT with an odd count
    b"\x80\x02]\x8f(K\x01\x90.",  # ADDITEMS on a list
    b"\x80\x02N]K\x01a.",  # APPEND after another value
    b"\x80\x02)(e.",  # APPENDS of nothing onto a tuple: C appends nothing, the machine refuses
    b"\x80\x02)(\x80\x02e.",
    b"\x80\x02)(K\x010e.",  # ... after a POP
    b"\x80\x02)((1e.",  # ... after a POP_MARK
    b"\x80\x02)(K\x01e.",  # APPENDS of one item onto a tuple
    b"\x80\x02(0K\x01.",  # POP of a MARK
    b"\x80\x02r\x00\x00\x00\x40K\x01.",  # LONG_BINPUT on an empty stack
    b"\x80\x02K\x01r\xff\xff\xff\x7f.",  # a memo index C would allocate gigabytes for
    b"\x80\x02K\x01r\x00\x01\x00\x00h\x00.",  # BINGET of a key never put
    b"\x80\x02\x8b\x01\x00\x00\x80.",  # LONG4 with a negative length
    b"\x80\x02\x8b\x01\x00\x01\x00" + b"\x01" * 65537 + b".",  # LONG4 past the machine's bound
    b"\x80\x02\x8e" + struct.pack("<Q", 1 << 40) + b"ab.",  # BINBYTES8 claiming a terabyte
    b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N.",  # FRAME past the end
    b"\x80\x06N.",  # protocol 6
    b"\x80\x02c\nset\n)R.",  # GLOBAL with an empty module line
    b"\x80\x02c__builtin__\nset\n)R.",  # protocol 2 name mapping
    b"\x80\x02ccollections\nOrderedDict\n)R}b.",  # BUILD with an empty dict on a made object
    b"\x80\x02ccollections\nOrderedDict\n)R}X\x07\x00\x00\x00__dict_N\x86b.",
    b"\x80\x02ccollections\nOrderedDict\n)R}X\x08\x00\x00\x00__call__N\x86b.",
    b"\x80\x02ccollections\nOrderedDict\nb.",  # BUILD on a global itself
    b"\x80\x02ccollections\nOrderedDict\n)R)R.",  # a call of a call's result
    b"\x80\x02ccollections\nOrderedDict\n\x81.",  # NEWOBJ
    b"\x80\x02\x82\x01.",  # EXT1
    b"\x80\x02X\x01\x00\x00\x00aX\x01\x00\x00\x00b\x93.",  # STACK_GLOBAL of an unknown name
    b"\x80\x02K\x01K\x02\x93.",  # STACK_GLOBAL of numbers
    b"\x80\x02K\x01Q.",  # a persistent id
    b"\x80\x02(X\x06\x00\x00\x00moduleccollections\nOrderedDict\nNNtQ)R.",
    b"\x80\x02ctorch.storage\n_load_from_bytes\nC\x02ab\x85R.",  # nested torch bytes
    b"\x80\x02K\x01.junk after",
    b"\x80\x02K\x01",  # no STOP
    b"(K\x01p1\nK\x02g1\n.",  # protocol 0 PUT and GET
    b"\x80\x05\x96\x02\x00\x00\x00\x00\x00\x00\x00ab.",  # BYTEARRAY8
]


def _slow(data: bytes, **options: Any) -> judging.PickleScan:
    with mock.patch.object(fast_scan, "clean_run", lambda *args: None):
        return judging.scan_pickle(data, **options)


def outcome(scan: Any, data: bytes, **options: Any) -> Any:
    """What a scan returned (findings as tuples) or raised (type, message, findings)."""
    try:
        result = scan(data, **options)
    except judging.UnparsedPickleError as exc:
        return ("raised", type(exc).__name__, str(exc), _tuples(exc.findings), exc.truncated)
    except Exception as exc:  # the Python machine's verdict may be any error: compare it too
        return ("raised", type(exc).__name__, str(exc))
    nested = [(n.offset, n.payload) for n in result.nested]
    return ("returned", _tuples(result.findings), nested, result.end, result.opcodes)


def _tuples(findings: list[judging.PickleFinding]) -> list[tuple[Any, ...]]:
    return [tuple(getattr(f, name) for name in f.FIELDS) for f in findings]


def assert_same(data: bytes, limits: tuple[Limits, ...] = LIMITS, start: int = 0) -> None:
    for limit in limits:
        for persistent in (False, True):
            options = {"start": start, "expect_persistent_ids": persistent, "limits": limit}
            expected = outcome(_slow, data, **options)
            assert outcome(judging.scan_pickle, data, **options) == expected, (data[:80], limit)


def live_resolver(data: bytes, persistent: bool) -> judging.ScanResolver:
    """The resolver ``scan_pickle`` gives a C run: its records are ones C can call."""
    return judging.ScanResolver(
        expect_persistent_ids=persistent,
        data=memoryview(data),
        symbol_type=fast_scan.LiveSymbol,
        made_type=fast_scan.LiveMade,
    )


def fast_verdict(data: bytes, persistent: bool = True) -> tuple[bool, list[Any]]:
    """Whether the fast path vouched for the run, and what its resolver's records judge."""
    resolver = live_resolver(data, persistent)
    taken = fast_scan.clean_run(memoryview(data), 0, resolver, Limits()) is not None
    return taken, judging.judge(resolver)


@pytest.mark.parametrize("index", range(len(PICKLES)))
def test_every_built_pickle_scans_as_the_machine_alone(index: int) -> None:
    assert_same(PICKLES[index])


@pytest.mark.parametrize("index", range(len(CRAFTED)))
def test_edge_cases_scan_as_the_machine_alone(index: int) -> None:
    assert_same(CRAFTED[index])


def test_each_pickle_of_a_stream_scans_as_the_machine_alone() -> None:
    stream = STATE_DICT + NUMPY + CHECKPOINT
    starts = [0, len(STATE_DICT), len(STATE_DICT) + len(NUMPY)]
    for start in starts:
        assert_same(stream, (Limits(),), start)
    assert judging.scan_pickle(stream, start=starts[1]).end == starts[2]


@pytest.mark.skipif(not fast_scan.ENABLED, reason="the fast path is off on this Python")
@pytest.mark.parametrize("data", [STATE_DICT, CHECKPOINT, NUMPY], ids=["state", "adam", "numpy"])
def test_the_fast_path_takes_clean_model_files(data: bytes) -> None:
    assert fast_verdict(data) == (True, [])
    opcodes = len(list(pickletools.genops(data)))
    assert judging.scan_pickle(data, expect_persistent_ids=True).opcodes == opcodes


def test_an_attack_is_never_clean() -> None:
    attacks = attack_pickles(Path("PWNED"))
    for name, data in attacks.items():
        for persistent in (False, True):
            taken, findings = fast_verdict(data, persistent)
            assert not taken or findings, name
            assert judging.scan_pickle(data, expect_persistent_ids=persistent).findings, name


def test_a_persistent_id_is_clean_only_where_expected() -> None:
    assert fast_verdict(STATE_DICT, persistent=False)[1]
    assert judging.scan_pickle(STATE_DICT).findings == _slow(STATE_DICT).findings != []


@contextmanager
def watched() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Every audit event that would mean running the file: imports, processes, opens of the
    marker, exec/compile, the stdlib unpickler's own find_class."""
    events: list[tuple[str, tuple[Any, ...]]] = []
    watching = [True]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if watching[0] and event in _RUNNING:
            events.append((event, args))

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet after the block
    try:
        yield events
    finally:
        watching[0] = False


_RUNNING = frozenset(
    {"import", "os.system", "subprocess.Popen", "exec", "compile", "pickle.find_class", "open"}
)


def test_the_fast_path_never_imports_or_runs_anything(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    never_imported = b"\x80\x02cnot_a_module_anyone_has\nrun\n" + short(b"x") + b"\x85R."
    pickles = [*attack_pickles(marker).values(), never_imported, STATE_DICT, CHECKPOINT, NUMPY]
    modules = set(sys.modules)
    with watched() as events:
        for data in pickles:
            resolver = live_resolver(data, True)
            fast_scan.clean_run(memoryview(data), 0, resolver, Limits())
    assert events == []
    assert set(sys.modules) == modules
    assert "not_a_module_anyone_has" not in sys.modules
    assert not marker.exists()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutated_torch_pickles_scan_as_the_machine_alone(data: st.DataObject) -> None:
    raw = data.draw(st.sampled_from([STATE_DICT, CHECKPOINT, NUMPY, *CRAFTED[:20]]))
    if data.draw(st.booleans()):
        assert_same(mutated(data, raw, flips=4), (Limits(),))
    else:  # whole, so that C runs to a STOP
        changed = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 3))):
            changed[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        assert_same(bytes(changed), (Limits(),))


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(min_size=1, max_size=48))
def test_random_bytes_scan_as_the_machine_alone(blob: bytes) -> None:
    assert_same(b"\x80\x02" + blob, (Limits(),))
