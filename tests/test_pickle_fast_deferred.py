"""What the scan's fast path (``pickles.fast_scan``) judges once C's run is over instead of
as C goes, each held to the per-opcode judgement it replaces: the states C's BUILDs
append to a record (``judge_records``: a state the resolver reports, SETITEMS after a
state, a second BUILD), their quick checks (``_reported_state``, ``_plain_tuples``), and
the arguments each reconstructor handed on (``rules.passes_computed`` against
``rules.pass_on``, call by call); and the walk's note of constants that open like a
payload, without which a pickle is not searched for payloads (``fast_walk``)."""

from __future__ import annotations

import pickle
import struct
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelport.pickles import fast_scan, fast_walk, hooks, policy, rules
from modelport.pickles.interface import Limits, Step
from modelport.pickles.symbols import Made, Symbol
from tests.test_pickle_fast_scan import _slow, assert_same, fast_verdict

_AT = Step(7, "BUILD", None)  # type: ignore[arg-type]  # nothing here reads a cursor
_SET_ITEMS = fast_scan._SET_ITEMS

_NAMES = ["training", "_parameters", "__call__", "__dict__", "__X__", "a\n__init__", "__", "_x"]
_ORIGINS = [
    ("collections", "OrderedDict"),  # a plain mapping: items after a state are fine
    ("numpy._core.multiarray", "_reconstruct"),  # plain: a second BUILD is its own
    ("torch.nn.modules.linear", "Linear"),  # a class: a second BUILD is reported
    ("builtins", "getattr"),
]


def _symbol(key: tuple[str, str]) -> Symbol:
    return Symbol(*key, _AT)


def _made(key: tuple[str, str]) -> fast_scan.LiveMade:
    return fast_scan.LiveMade(_symbol(key), _AT)


def _dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    found = fast_scan._CheckedDict()
    for key, value in pairs:
        found[key] = value
    return found


_ATOMS = st.one_of(
    st.integers(-2, 2),
    st.booleans(),
    st.none(),
    st.sampled_from(_NAMES),
    st.binary(max_size=3),
    st.sampled_from(_ORIGINS).map(_symbol),
    st.sampled_from(_ORIGINS).map(_made),
)
_KEYS = st.one_of(st.sampled_from(_NAMES), st.integers(0, 3), st.tuples(st.integers(0, 3)))
_VALUES = st.recursive(
    _ATOMS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.lists(inner, max_size=2),
        st.lists(st.tuples(_KEYS, inner), max_size=3).map(_dict),
    ),
    max_leaves=6,
)
_SETITEMS = st.lists(st.tuples(_KEYS, _VALUES), max_size=2).map(
    lambda pairs: (*(part for pair in pairs for part in pair), _SET_ITEMS)
)
_ODD_SETITEMS = st.just((1, _SET_ITEMS, _SET_ITEMS)[1:])  # an even length: C's count was odd


def _reference_state(state: Any) -> bool:
    return bool(rules.special_names(state)) or hooks.opaque_state(state)


@settings(max_examples=40, deadline=None)
@given(state=_VALUES)
def test_the_quick_state_check_is_the_resolvers(state: Any) -> None:
    assert fast_scan._reported_state(state) is _reference_state(state)


@pytest.mark.parametrize(
    "keys",
    [
        ["training", "__call__"],
        ["__init__"],
        ["a\n__init__", "b"],  # a key holding the separator: looked at one by one
        ["x__call__", "_parameters"],
        [1, "__reduce__"],  # keys not all text
        [("__call__",), "_x"],
        ["__X__"],  # an application's field, not Python's
    ],
)
def test_the_joined_keys_miss_no_special_name(keys: list[Any]) -> None:
    state = _dict([(key, None) for key in keys])
    assert fast_scan._special_keys(state) is bool(rules.special_names(state))
    assert fast_scan._reported_state((1, state, None)) is _reference_state((1, state, None))


def _reference_builds(made: Made, handed: list[Any]) -> bool:
    """The judgement C's BUILDs got one at a time before the run judged them after: whether
    any of them ends the run."""
    for state in handed:
        if fast_scan._is_set_items(state):
            if len(state) % 2 == 0 or hooks.item_hook(made, True) is not None:
                return True
            continue
        made.states.append(state)
        if _reference_state(state) or hooks.repeated_build(made):
            return True
    return False


@settings(max_examples=40, deadline=None)
@given(
    origin=st.sampled_from(_ORIGINS),
    handed=st.lists(st.one_of(_VALUES, _SETITEMS, _ODD_SETITEMS), max_size=4),
)
def test_builds_judged_after_the_run_end_it_as_they_would_have(
    origin: tuple[str, str], handed: list[Any]
) -> None:
    expected = _reference_builds(_made(origin), handed)
    made = _made(origin)
    for state in handed:
        made.__setstate__(state)  # as C's BUILD calls it
    try:
        fast_scan._judge_states(made)
    except fast_scan._Unsure:
        ended = True
    else:
        ended = False
        assert made.states == [s for s in handed if not fast_scan._is_set_items(s)]
    assert ended is expected


def test_numpy_states_take_the_quick_way_and_others_do_not() -> None:
    dtype = _made(("numpy", "dtype"))
    arrays = [(1, (2, 3), dtype, False, b"\x00" * 8)] * 3
    assert fast_scan._plain_tuples(arrays)
    assert not fast_scan._plain_tuples([*arrays, (1, _dict([("__call__", 1)]))])
    assert not fast_scan._plain_tuples([*arrays, (None, {})])  # a pair: may be opaque
    assert not fast_scan._plain_tuples([*arrays, (1, 2, _SET_ITEMS)])
    assert not fast_scan._plain_tuples([*arrays, _dict([])])


_PASSING = sorted(policy.PASSED_ON)
_TARGETS = [
    *(("symbol", key) for key in [("numpy", "ndarray"), policy.NO_BASE, ("os", "system")]),
    ("made", ("collections", "OrderedDict")),
    ("value", 3),
]


def _argument(kind: str, what: Any, fresh: dict[Any, Any]) -> Any:
    if kind == "value":
        return what
    if what not in fresh:
        fresh[what] = _symbol(what) if kind == "symbol" else _made(what)
    return fresh[what]


def _passed(symbols: dict[Any, Any]) -> dict[Any, Counter[Any]]:
    return {
        key: Counter((step.offset, usage, via) for step, usage, via in value.passed_on)
        for key, value in symbols.items()
        if isinstance(value, Symbol)
    }


@settings(max_examples=40, deadline=None)
@given(
    key=st.sampled_from(_PASSING),
    calls=st.lists(
        st.lists(st.sampled_from(_TARGETS), max_size=4).map(tuple), min_size=1, max_size=4
    ),
)
def test_arguments_noted_after_the_run_are_those_noted_call_by_call(
    key: tuple[str, str], calls: list[tuple[tuple[str, Any], ...]]
) -> None:
    one, batch = {}, {}  # type: ignore[var-annotated]
    by_one = [
        (Step(i, "REDUCE", None), tuple(_argument(*part, one) for part in args))  # type: ignore[arg-type]
        for i, args in enumerate(calls)
    ]
    by_batch = [
        (Step(i, "REDUCE", None), tuple(_argument(*part, batch) for part in args))  # type: ignore[arg-type]
        for i, args in enumerate(calls)
    ]
    computed = [bool(rules.pass_on(key, args, at)) for at, args in by_one]
    assert rules.passes_computed(key, by_batch) is any(computed)
    if not any(computed):
        assert _passed(batch) == _passed(one)


_LINEAR = b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81"  # an instance of a class
_ORDERED = b"\x80\x02ccollections\nOrderedDict\nq\x00)R"  # calls sharing one result
_AGAIN = b"h\x00)R"
_TUPLE = b"(K\x01K\x02K\x03t"
_SPECIAL = b"(K\x01}(X\x08\x00\x00\x00__call__K\x01uK\x02t"  # (1, {"__call__": 1}, 2)
# What is judged after the run: several BUILDs on one record, the arguments handed on;
# (pickle, the machine's one rule).
_BUILDS = {
    "second_build": (_LINEAR + _TUPLE + b"b" + _TUPLE + b"b.", "repeated-build"),
    "items_after_state": (_LINEAR + _TUPLE + b"b(K\x01K\x02u.", "item-hook"),
    "special_in_a_part": (
        _ORDERED + _TUPLE + b"b" + _AGAIN + _SPECIAL + b"b.",
        "attribute-smuggling",
    ),
    "plain_mapping_items": (_ORDERED + _TUPLE + b"b" + _AGAIN + _TUPLE + b"b(K\x01K\x02u.", None),
    "plain_builds": (_ORDERED + _TUPLE + b"b" + _AGAIN + _TUPLE + b"b.", None),
    # numpy's reconstructor instantiates its first argument: here a call's result
    "computed_handed_on": (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nK\x00\x85C\x01b"
        b"\x87Rh\x01ccollections\nOrderedDict\n)RK\x00\x85C\x01b\x87R\x86.",
        "computed-call",
    ),
}


@pytest.mark.parametrize("name", sorted(_BUILDS))
def test_what_is_judged_after_the_run_scans_as_the_machine_alone(name: str) -> None:
    data, rule = _BUILDS[name]
    machine = [finding.rule for finding in _slow(data, expect_persistent_ids=True).findings]
    assert machine == ([] if rule is None else [rule])
    if fast_scan.ENABLED:
        assert fast_verdict(data) == (rule is None, [])
    assert_same(data, (Limits(),))


# -- the walk's note of string constants that open like a payload (``fast_walk``) ----------
# A pickle whose walk notes none is not searched for payloads: each constant that opens
# like one (the reference: ``hooks.PAYLOAD_HEADS`` on its value, as ``hooks.payloads`` and
# ``hooks.encoded_payload`` read it) must be noted, by either walk, short or long.
_OPENINGS = [b"\x80\x02", b"\x80\x05", b"PK\x03\x04", b"\x93NUMPY", b"\x80\x06", b"P", b"\x93"]
_OPENINGS += [b"\xc2\x80\x02", b"ab", b""]


def _constant(kind: str, opening: bytes, filler: int) -> tuple[bytes, Any]:
    """The opcode of ``kind`` for a constant opening with ``opening``, and its value."""
    raw = opening + b"x" * filler
    if kind in "CU" and len(raw) < 256:
        return kind.encode() + bytes([len(raw)]) + raw, raw if kind == "C" else raw.decode(
            "latin-1"
        )
    if kind in "BT":
        return kind.encode() + struct.pack(
            "<I", len(raw)
        ) + raw, raw if kind == "B" else raw.decode("latin-1")
    text = raw.decode("utf-8", "replace")
    encoded = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(encoded)) + encoded, text


def _opens_like_payload(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value = value.encode("latin-1")
        except UnicodeEncodeError:
            return False
    return bool(value.startswith(hooks.PAYLOAD_HEADS))


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(
        st.tuples(st.sampled_from("CUBTX"), st.sampled_from(_OPENINGS), st.sampled_from([0, 70])),
        min_size=1,
        max_size=4,
    ),
    by_runs=st.booleans(),
)
def test_the_walk_notes_every_constant_opening_like_a_payload(
    parts: list[tuple[str, bytes, int]], by_runs: bool
) -> None:
    constants = [_constant(*part) for part in parts]
    data = b"\x80\x02" + b"".join(code for code, _ in constants) + b"."
    walk = fast_walk._Expressions(0 if by_runs else 1 << 62)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_walk, "_EXPRESSIONS", walk)
        admitted = fast_walk.admit(memoryview(data), 0, 1 << 20)
    assert admitted is not None
    if any(_opens_like_payload(value) for _, value in constants):
        assert admitted.opens_like_payload


_NESTED = pickle.dumps(1, protocol=2)
_HANDED = b"\x80\x02ccollections\nOrderedDict\n%s\x85R."  # a constant handed to a call
_WITH_PAYLOADS = [
    _HANDED % (b"C" + bytes([len(_NESTED)]) + _NESTED),  # short bytes: the expression's
    _HANDED % (b"B" + struct.pack("<I", 80) + _NESTED + b"x" * (80 - len(_NESTED))),
    b"\x80\x02c_codecs\nencode\nU\x06PK\x03\x04abU\x06latin1\x86R.",  # latin-1 text
    b"\x80\x02c_codecs\nencode\nX\x07\x00\x00\x00\xc2\x93NUMPYX\x06\x00\x00\x00latin1\x86R.",
]


@pytest.mark.parametrize("index", range(len(_WITH_PAYLOADS)))
@pytest.mark.parametrize("by_runs", [False, True])
def test_constants_opening_like_payloads_scan_as_the_machine_alone(
    index: int, by_runs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        fast_walk, "_EXPRESSIONS", fast_walk._Expressions(0 if by_runs else 1 << 62)
    )
    data = _WITH_PAYLOADS[index]
    assert _slow(data).nested != []
    assert_same(data, (Limits(),))
