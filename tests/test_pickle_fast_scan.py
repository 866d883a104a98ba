"""The scan's fast path (``pickles.fast_scan``, CPython's C unpickler with the scan's
resolver) against the Python machine alone: over every pickle the suite builds, crafted
edge cases and mutated torch pickles, ``scan_pickle`` gives the same findings, nested
payloads, end and errors whether the fast path took the pickle or not, with either of the
walks that admit a pickle to it (``fast_walk``: by opcode, and by the runs of its regular
expression); the fast path takes the common clean files, never calls an attack clean, and
never imports or runs anything."""

from __future__ import annotations

import io
import pickle
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelport.pickles import fast_scan, fast_walk, judging
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


@pytest.fixture(autouse=True, params=["by_opcode", "by_runs"])
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with each walk: by opcode, and by the expression's runs from the
    first pickle on."""
    after = 0 if request.param == "by_runs" else 1 << 62
    monkeypatch.setattr(fast_walk, "_EXPRESSIONS", fast_walk._Expressions(after))
    return str(request.param)


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
# A whole module of torch's own layers: NEWOBJ of each class, then BUILD.
MODULE = _data_pkl(
    torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
)

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
    b"\x80\x02ccollections\nOrderedDict\n\x81.",  # NEWOBJ without arguments
    b"\x80\x02ccollections\nOrderedDict\n)\x81.",  # NEWOBJ
    b"\x80\x02ccollections\nOrderedDict\nK\x01\x81.",  # NEWOBJ of a number
    b"\x80\x02ccollections\nOrderedDict\n)R)\x81.",  # NEWOBJ of a made object
    b"\x80\x02\x81.",  # NEWOBJ on an empty stack
    b"\x80\x02(ccollections\nOrderedDict\n)\x81t.",  # NEWOBJ after MARK
    b"\x80\x02(ccollections\nOrderedDict\n\x81t.",  # ... popping the MARK
    b"\x80\x02ccollections\nOrderedDict\nq\x00)\x81h\x00)R\x86.",  # NEWOBJ, then REDUCE
    b"\x80\x02ccollections\nOrderedDict\nq\x00)Rh\x00)\x81\x86.",  # REDUCE, then NEWOBJ
    b"\x80\x02(ccollections\nOrderedDict\nq\x00oh\x00)\x81h\x00)R\x87.",  # OBJ first
    b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81}b.",  # a torch layer, filled
    b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81}X\x08\x00\x00\x00__call__N\x86b.",
    b"\x80\x02cos\nsystem\n)\x81.",  # NEWOBJ of a function the rules report
    # A torch layer may be instantiated but not called: each call must be told apart.
    b"\x80\x02ccollections\nOrderedDict\n)\x81ctorch.nn.modules.linear\nLinear\n)R\x86.",
    b"\x80\x02ctorch.nn.modules.linear\nLinear\n)Rccollections\nOrderedDict\n)\x81\x86.",
    b"\x80\x02ccollections\nOrderedDict\n)Rctorch.nn.modules.linear\nLinear\n)\x81\x86.",
    b"\x80\x02ctorch.nn.modules.linear\nLinear\nK\x01\x85\x81.",  # instantiated with arguments
    b"\x80\x02(ccollections\nOrderedDict\noctorch.nn.modules.linear\nLinear\n)R"
    b"ccollections\nOrderedDict\n)\x81\x87.",  # OBJ counts as a call too
    # Where the expression's runs stop: string lengths, memo indexes, marks, lines, frames.
    b"\x80\x02X\x7f\x00\x00\x00" + b"a" * 127 + b"X\x80\x00\x00\x00" + b"b" * 128 + b"\x86.",
    b"\x80\x04\x8c\x7f" + b"a" * 127 + b"\x8c\xff" + b"b" * 255 + b"\x86.",
    b"\x80\x02X\x80\x00\x00\x00" + b"b" * 100 + b".",  # a string past the end
    b"\x80\x02K\x01r\xff\xff\x00\x00r\x00\x00\x01\x00.",  # the last index, then one past
    b"\x80\x02(\x80\x02K\x01e.",  # a MARK the next opcode makes odd, then items
    b"\x80\x02]q\x00(K\x01K\x02e.",  # APPENDS of two items onto a list
    b"\x80\x02cos\nsystem\n\x85.",  # a GLOBAL line, then an opcode C does not take here
    b"\x80\x02c" + b"m" * 300 + b"\nn\nq\x00.",  # a long module line
    b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01K\x02\x86.",  # a FRAME
    b"\x80\x02\x8a\x02\xff\x7f\x8b\x03\x00\x00\x00\x01\x02\x03\x86.",  # LONG1, LONG4
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
    return ("returned", _tuples(result.findings), nested, result.end)


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
    stream = STATE_DICT + NUMPY + MODULE + CHECKPOINT
    starts = [0, len(STATE_DICT), len(STATE_DICT) + len(NUMPY)]
    starts.append(starts[-1] + len(MODULE))
    for start in starts:
        assert_same(stream, (Limits(),), start)
    assert judging.scan_pickle(stream, start=starts[1]).end == starts[2]


@pytest.mark.skipif(not fast_scan.ENABLED, reason="the fast path is off on this Python")
@pytest.mark.parametrize(
    "data", [STATE_DICT, CHECKPOINT, NUMPY, MODULE], ids=["state", "adam", "numpy", "module"]
)
def test_the_fast_path_takes_clean_model_files(data: bytes) -> None:
    assert fast_verdict(data) == (True, [])
    assert judging.scan_pickle(data, expect_persistent_ids=True).end == len(data)


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
    pickles.append(MODULE)
    modules = set(sys.modules)
    with watched() as events:
        for data in pickles:
            resolver = live_resolver(data, True)
            fast_scan.clean_run(memoryview(data), 0, resolver, Limits())
    assert events == []
    assert set(sys.modules) == modules
    assert "not_a_module_anyone_has" not in sys.modules
    assert not marker.exists()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_torch_pickles_scan_as_the_machine_alone(data: st.DataObject) -> None:
    raw = data.draw(st.sampled_from([STATE_DICT, CHECKPOINT, NUMPY, MODULE, *CRAFTED[:20]]))
    if data.draw(st.booleans()):
        assert_same(mutated(data, raw, flips=4), (Limits(),))
    else:  # whole, so that C runs to a STOP
        changed = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 3))):
            changed[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        assert_same(bytes(changed), (Limits(),))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(min_size=1, max_size=48))
def test_random_bytes_scan_as_the_machine_alone(blob: bytes) -> None:
    assert_same(b"\x80\x02" + blob, (Limits(),))


def test_one_small_pickle_never_compiles_the_expression(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = fast_walk._Expressions(fast_walk._COMPILE_AFTER)
    monkeypatch.setattr(fast_walk, "_EXPRESSIONS", fresh)
    assert judging.scan_pickle(CHECKPOINT, expect_persistent_ids=True).findings == []
    assert (fresh.compiled, fresh.bytes_walked) == (None, len(CHECKPOINT))
    for _ in range(fast_walk._COMPILE_AFTER // len(CHECKPOINT) + 1):
        judging.scan_pickle(CHECKPOINT, expect_persistent_ids=True)
    assert fresh.compiled is not None
    assert judging.scan_pickle(MODULE, expect_persistent_ids=True).findings == []


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02K\x01r\x00\x00\x01\x00.",  # a memo index C would grow its array for
        b"\x80\x02K\x01r\xff\xff\xff\x7f.",
        b"\x80\x02\x8b\x01\x00\x01\x00" + b"\x01" * 65537 + b".",  # LONG4 past the bound
        b"\x80\x02\x8e\x02\x00\x00\x00\x00\x00\x00\x00ab.",  # an 8-byte length
        b"\x80\x02)(e.",  # APPENDS of nothing
    ],
)
def test_the_walk_refuses_what_c_would_do_otherwise(data: bytes) -> None:
    assert fast_walk.admit(memoryview(data), 0, 1 << 20) is None
    assert fast_walk.admit(memoryview(data[:-1] + b"K\x01."), 0, 1 << 20) is None
