"""What the scan's fast path (``pickles.fast_scan``) takes for granted to call fewer things
from C, each held to its reference: the rules give no finding for any call of a global
whose calls share one result, and always one for a call that ends the run; the remembered
verdicts (``rules.judged_clean``) are the rules' own; SETITEMS, which C runs as one BUILD,
scans as the Python machine scans it on every kind of target; the byte search for nested
payloads (``hooks.may_hold_payload``) finds what its regular expression finds; and a scan
leaves no records for the garbage collector."""

from __future__ import annotations

import gc
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelport.pickles import fast_scan, hooks, judging, policy, rules
from modelport.pickles.interface import Limits, Step
from modelport.pickles.symbols import Made, Symbol, Usage
from tests.test_pickle_fast_scan import CHECKPOINT, MODULE, NUMPY, STATE_DICT, assert_same

_AT = Step(3, "REDUCE", None)  # type: ignore[arg-type]  # the rules read no cursor
_RECORDED = judging.ScanResolver.calls_only_recorded


def _symbol(key: tuple[str, str], calls: int = 0, news: tuple[Any, ...] = ()) -> Symbol:
    symbol = Symbol(*key, _AT)
    symbol.calls += [(_AT, (1,))] * calls
    symbol.news += [(_AT, args) for args in news]
    return symbol


def test_a_call_shares_a_result_only_where_the_rules_look_at_no_call() -> None:
    kinds = fast_scan._kinds(_RECORDED)
    shared = [key for key, kind in kinds.items() if kind in _SHARING]
    assert len(shared) > 10
    for key in shared:
        for torchscript in (False, True):
            assert rules.judge_symbol(_symbol(key, calls=2), torchscript) == [], key
            assert rules.judge_symbol(_symbol(key, news=((), (1,))), torchscript) == [], key


def test_a_call_ends_the_run_only_where_the_rules_report_it() -> None:
    kinds = fast_scan._kinds(_RECORDED)
    ending = [key for key, kind in kinds.items() if kind is fast_scan._UncalledLiveSymbol]
    assert len(ending) > 10
    for key in ending:
        for torchscript in (False, True):
            assert rules.judge_symbol(_symbol(key, calls=1), torchscript), key


_SHARING = (fast_scan._PlainLiveSymbol, fast_scan._PassingLiveSymbol)
_SOME_KEYS = [
    *sorted(policy.SAFE_CALLS)[:40],
    *sorted(policy.SAFE_VALUES)[:20],
    *sorted(policy.SAFE_CLASSES)[:20],
    *sorted(policy.PASSED_ON),
    ("torch.storage", "_load_from_bytes"),
    ("os", "system"),
    ("mypkg.layers", "Block"),
    ("torch", "serialization.os.system"),
]


@pytest.mark.parametrize("torchscript", [False, True])
def test_the_remembered_verdicts_are_the_rules_own(torchscript: bool) -> None:
    uses: list[dict[str, Any]] = [
        {},
        {"calls": 1},
        {"news": ((),)},
        {"news": ((), (1,))},
        {"calls": 1, "news": ((),)},
    ]
    for key in _SOME_KEYS:
        for use in uses:
            for passed in ((), (Usage.INSTANTIATED,), (Usage.CALLED,)):
                for _ in range(2):  # the second asks the remembered answer
                    symbol = _symbol(key, **use)
                    symbol.passed_on += [(_AT, usage, "via") for usage in passed]
                    expected = not rules.judge_symbol(symbol, torchscript)
                    assert rules.judged_clean(symbol, torchscript) is expected, (key, use)
        patched = _symbol(key)
        patched.patched.append(_AT)
        assert rules.judged_clean(patched, torchscript) is False


# SETITEMS onto each kind of target C may hold: a dict, a list, a call's result, a global,
# nothing; with no items, an odd count, a tuple key, a key of tuples shared through the memo.
_SETITEMS = [
    b"\x80\x02}(K\x01K\x02X\x01\x00\x00\x00aNu.",
    b"\x80\x02}(u.",
    b"\x80\x02}(K\x01u.",
    b"\x80\x02}(K\x01K\x02\x86K\x03u.",
    b"\x80\x02](K\x01K\x02u.",
    b"\x80\x02](u.",
    b"\x80\x02N(K\x01K\x02u.",
    b"\x80\x02ccollections\nOrderedDict\n)R(K\x01K\x02u.",
    b"\x80\x02ccollections\nOrderedDict\n)R(K\x01u.",
    b"\x80\x02ccollections\nOrderedDict\n(K\x01K\x02u.",
    b"\x80\x02ccollections\nOrderedDict\n)R(X\x08\x00\x00\x00__call__K\x01ub.",
    b"\x80\x02ccollections\nOrderedDict\n)R}(X\x08\x00\x00\x00__call__K\x01ub.",
    b"\x80\x02}(K\x01K\x02u(K\x03K\x04u}b.",
    b"\x80\x02}q\x00(h\x00K\x01u.",
    b"\x80\x02K\x01\x85q\x00h\x00h\x00\x86q\x01h\x01h\x01\x86q\x02}(h\x02K\x00u.",
]


@pytest.mark.parametrize("index", range(len(_SETITEMS)))
def test_setitems_scans_as_the_machine_alone(index: int) -> None:
    assert_same(_SETITEMS[index], (Limits(),))


# The expression the byte search replaces: a bytes or text opcode and its length, then a
# payload's first bytes as that opcode spells them.
_PAYLOAD_CONSTANT = re.compile(
    rb"(?:C.|B....|[\x8e\x96].{8}|U.|T....)(?:\x80[\x02-\x05]|PK\x03\x04|\x93NUMPY)"
    rb"|(?:\x8c.|X....|\x8d.{8})(?:\xc2\x80[\x02-\x05]|PK\x03\x04|\xc2\x93NUMPY)",
    re.DOTALL,
)
_PIECES = [
    b"C",
    b"B",
    b"U",
    b"T",
    b"X",
    b"\x8c",
    b"\x8d",
    b"\x8e",
    b"\x96",
    b"\x80",
    b"\x02",
    b"\x05",
    b"\x06",
    b"\xc2",
    b"PK\x03\x04",
    b"\x93NUMPY",
    b"\x93NUMP",
    b"\x00",
    b"\x00\x00\x00",
]


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.sampled_from(_PIECES), max_size=14))
def test_the_payload_search_finds_what_its_expression_finds(pieces: list[bytes]) -> None:
    program = b"".join(pieces)
    expected = _PAYLOAD_CONSTANT.search(program) is not None
    assert hooks.may_hold_payload(program) is expected


@pytest.mark.parametrize(
    "program",
    [
        b"C\x05\x80\x02abc",
        b"xB\x07\x00\x00\x00PK\x03\x04",
        b"\x8e" + bytes(8) + b"\x93NUMPY",
        b"\x8c\x03\xc2\x80\x04",
        b"X\x09\x00\x00\x00\xc2\x93NUMPY",
        b"\x8d" + bytes(8) + b"PK\x03\x04",
        b"\x8c\x03\x80\x04",  # text without the UTF-8 lead byte: no payload
        b"C\x05\x80\x06",  # no pickle protocol
        STATE_DICT,
        NUMPY,
    ],
)
def test_the_payload_search_on_known_bytes(program: bytes) -> None:
    assert hooks.may_hold_payload(program) is (_PAYLOAD_CONSTANT.search(program) is not None)


def test_a_clean_scan_leaves_no_records_for_the_collector() -> None:
    """Run with the collector off, the scans' garbage is all in the youngest generation,
    where a collection of it alone finds whatever only the collector could free. (The
    Python machine's records still name the machine through their steps.)"""
    enabled = gc.isenabled()
    gc.collect(0)
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for data in (STATE_DICT, CHECKPOINT, NUMPY, MODULE):
            assert judging.scan_pickle(data, expect_persistent_ids=True).findings == []
        gc.collect(0)
        left = [item for item in gc.garbage if isinstance(item, (Symbol, Made))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    assert left == []


@pytest.mark.skipif(not fast_scan.ENABLED, reason="the fast path is off on this Python")
def test_setitems_reaches_a_dict_once_for_all_its_items(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs: list[int] = []
    original = fast_scan._CheckedDict.__setstate__

    def counted(self: Any, state: Any) -> None:
        pairs.append(len(state) // 2)
        original(self, state)

    monkeypatch.setattr(fast_scan._CheckedDict, "__setstate__", counted)
    assert judging.scan_pickle(MODULE, expect_persistent_ids=True).findings == []
    assert len(pairs) < sum(pairs) / 4  # module attribute dicts: dozens of items each
