"""The calls a run in CPython's C unpickler hands the scan's resolver (``fast_scan``): each
REDUCE a call and each NEWOBJ an instantiation with its argument tuple, counted against
``pickletools``' reading of the same bytes; a NEWOBJ whose arguments are no tuple, which
the C run leaves to the Python machine; and a global named by a list, reported."""

from __future__ import annotations

import pickle
import pickletools
from collections import Counter

import pytest

from modelport.pickles import fast_scan, judging
from modelport.pickles.interface import Limits
from tests.test_pickle_fast_scan import (
    CHECKPOINT,
    MODULE,
    NUMPY,
    STATE_DICT,
    assert_same,
    live_resolver,
)

pytestmark = pytest.mark.skipif(not fast_scan.ENABLED, reason="the fast path is off here")


@pytest.mark.parametrize(
    "data", [STATE_DICT, CHECKPOINT, NUMPY, MODULE], ids=["state", "adam", "numpy", "module"]
)
def test_each_call_and_instantiation_reaches_the_resolver(data: bytes) -> None:
    resolver = live_resolver(data, True)
    assert fast_scan.clean_run(memoryview(data), 0, resolver, Limits()) == len(data)
    opcodes = Counter(op.name for op, _, _ in pickletools.genops(data))
    calls = [args for symbol in resolver.symbols for _, args in symbol.calls]
    news = [args for symbol in resolver.symbols for _, args in symbol.news]
    assert len(calls) == opcodes["REDUCE"] + opcodes["OBJ"]
    assert news == [()] * opcodes["NEWOBJ"]  # pickle writes an object as cls.__new__(cls)


def test_the_module_pickle_instantiates_its_layers() -> None:
    assert Counter(op.name for op, _, _ in pickletools.genops(MODULE))["NEWOBJ"] > 0
    resolver = live_resolver(MODULE, True)
    fast_scan.clean_run(memoryview(MODULE), 0, resolver, Limits())
    instantiated = {symbol.name for symbol in resolver.symbols if symbol.news}
    assert {"Conv2d", "Linear"} <= instantiated
    assert not any(symbol.calls for symbol in resolver.symbols if symbol.name == "Linear")


@pytest.mark.parametrize(
    "arguments", [b"K\x01", b"N", b"]", b"\x8c\x01a"], ids=["int", "none", "list", "str"]
)
def test_a_newobj_of_no_tuple_is_left_to_the_machine(arguments: bytes) -> None:
    data = b"\x80\x02ctorch.nn.modules.linear\nLinear\n" + arguments + b"\x81."
    assert fast_scan.clean_run(memoryview(data), 0, live_resolver(data, True), Limits()) is None
    assert_same(data, (Limits(),))


def test_a_global_named_by_a_list_is_reported_not_a_crash() -> None:
    """STACK_GLOBAL of a list as the name, called, its result BUILT: the name is hidden."""
    data = b"\x80\x04\x8c\x01m]\x93)R}b."
    with pytest.raises(pickle.UnpicklingError, match="STACK_GLOBAL requires str"):
        pickle.loads(data)  # CPython's loader stops there: what a scan reports is the attempt
    rules = {finding.rule for finding in judging.scan_pickle(data).findings}
    assert "dynamic-global" in rules
