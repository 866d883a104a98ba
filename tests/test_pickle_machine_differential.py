"""The fast pickle machine against the machine it replaced (``tests/reference_machine``):
over every pickle this suite builds (the attack catalogue, torch, numpy and joblib files,
plain data in protocols 0-5, and those bytes mutated and cut), the scanner's findings, the
reader's trees and every error are the same, under the default limits and under limits
small enough that each is reached."""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelport import dtypes
from modelport.errors import CorruptFileError, UnparsedPickleError
from modelport.formats import pickle_file
from modelport.pickles import judging, reading
from modelport.pickles.interface import Limits, Value
from modelport.pickles.machine import run
from modelport.pickles.records import ByteSpan
from modelport.pickles.torch_types import StorageType, TypedStorage
from modelport.tensors import Storage
from tests.conftest import attack_pickles, benign_twins, mutated
from tests.models import TiedLM, TinyResNet, trained_checkpoint
from tests.reference_machine import judging as old_judging
from tests.reference_machine import reading as old_reading
from tests.reference_machine.machine import run as old_run

LIMITS = (
    Limits(),
    Limits(max_stack=3),
    Limits(max_stack=40),
    Limits(max_memo=2),
    Limits(max_memo=30),
    Limits(max_marks=1),
    Limits(max_marks=5),
    Limits(max_opcodes=9),
    Limits(max_opcodes=150),
    Limits(inline_bytes=4),
)


def _torch_pickles(obj: Any, *, legacy: bool = True) -> list[bytes]:
    """The data.pkl of a torch zip, and the whole legacy stream (five pickles in a row)."""
    zipped, stream = io.BytesIO(), io.BytesIO()
    torch.save(obj, zipped)
    with zipfile.ZipFile(zipped) as archive:
        found = [archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))]
    if legacy:  # (a whole module's legacy save reads its source: slow, and no new opcodes)
        torch.save(obj, stream, _use_new_zipfile_serialization=False)
        found.append(stream.getvalue())
    return found


def _plain(protocol: int) -> bytes:
    shared = [1, "two"]
    looped: list[Any] = [shared]
    looped.append(looped)
    value = {
        "ints": [0, 1, 255, 256, 65535, 65536, -1, -(2**31), 2**31, 2**64, -(2**200)],
        "floats": [0.5, -1e300, float("inf")],
        "text": ["", "x" * 300, "snow \u2603", "\udcff"],
        "bytes": [b"", b"\x00" * 70, b"\xff" * 70_000, bytearray(b"ab")],
        "sets": [{1, 2}, frozenset({"a"}), set()],
        "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
        "shared": (shared, shared, looped),
        "flags": (None, True, False),
        2: {3: 4},
        "complex": 1 + 2j,
    }
    return pickle.dumps(value, protocol=protocol)


def _joblib(value: Any) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(value, buffer)
    return buffer.getvalue()


def _build() -> list[bytes]:
    torch.manual_seed(0)
    model = TinyResNet()
    found = [*attack_pickles(Path("M")).values(), *benign_twins().values()]
    for obj in (
        model.state_dict(),
        trained_checkpoint(model, torch.ones(1, 3, 8, 8)),
        TiedLM().state_dict(),
    ):
        found += _torch_pickles(obj)
    found += _torch_pickles(model, legacy=False)
    arrays = [np.arange(6.0).reshape(2, 3), np.array(["a", None], dtype=object)]
    arrays.append(np.zeros(2, dtype=[("x", "<f4"), ("y", "<i8")]))
    runs = [list(range(100)), [f"k{i}" for i in range(60)], [(i, [i]) for i in range(30)]]
    for protocol in range(6):
        found.append(_plain(protocol))
        found.append(pickle.dumps(runs, protocol=protocol))
        found.append(pickle.dumps(arrays, protocol=protocol))
    # opcode runs that reach each limit inside the machine's inline path
    found.append(b"\x80\x02K\x01" + b"".join(b"q" + bytes([i]) for i in range(40)) + b".")
    found.append(b"\x80\x02" + b"(" * 40 + b"K\x01" * 60 + b"\x85" * 3 + b".")
    # SETITEM(S) on a dict with a key it cannot hold, inside the inline path and at the end
    pad = b"N0" * 10
    for body in (b"}(]K\x01u", b"}(K\x02K\x03]\x85K\x01u", b"}]K\x01s", b"}(K\x01K\x02K\x03u"):
        found += [b"\x80\x02" + pad + body + pad + b".", b"\x80\x02" + body + b"."]
    found.append(b"\x80\x02" + pad + b"M\x01\x02G?\xf0\x00\x00\x00\x00\x00\x00\x86" + pad + b".")
    found.append(_joblib({"w": arrays[0], "objects": arrays[1], "n": 3}))
    found.append(_joblib([np.ones(5, np.float32), arrays[2]]))
    return found


PICKLES = _build()


def canonical(value: Any, seen: dict[int, int] | None = None) -> Any:
    """A tree as plain nested tuples: types, values and which objects are shared."""
    seen = {} if seen is None else seen
    if value is None or isinstance(value, (bool, int, str, bytes, complex)):
        return (type(value).__name__, value)
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, ByteSpan):  # a reading's FileBytes: its span, located in the file
        return ("ByteSpan", value.offset, value.length)
    if id(value) in seen:
        return ("same as", seen[id(value)])
    seen[id(value)] = len(seen)
    kind = type(value).__qualname__
    if isinstance(value, (list, tuple)):
        return (kind, [canonical(v, seen) for v in value])
    if isinstance(value, (set, frozenset)):
        return (kind, sorted(repr(canonical(v, seen)) for v in value))
    if isinstance(value, dict):
        items = [(canonical(k, seen), canonical(v, seen)) for k, v in value.items()]
        return (kind, items, canonical(getattr(value, "pickle_state", None), seen))
    if isinstance(value, (bytearray, memoryview)):
        return (kind, bytes(value))
    if isinstance(value, np.ndarray):
        return (kind, value.dtype.str, value.shape, value.tobytes())
    if is_dataclass(value):
        return (kind, [(f.name, canonical(getattr(value, f.name), seen)) for f in fields(value)])
    if isinstance(value, Value):  # slotted, as a frozen dataclass's fields: every slot
        return (kind, [(k, canonical(v, seen)) for k, v in value.__getstate__().items()])
    if callable(value):
        return (kind,)
    attributes = vars(value) if hasattr(value, "__dict__") else {}
    return (kind, sorted((k, repr(canonical(v, seen))) for k, v in attributes.items()))


def _storages() -> Any:
    """A torch zip's storage loader, without the zip: one storage per key, shared."""
    made: dict[str, TypedStorage] = {}

    def load(pid: Any) -> TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptFileError(f"unexpected persistent id {pid!r:.80}")
        _, kind, key, location, numel = pid
        if not isinstance(kind, StorageType) or not isinstance(numel, int):
            raise CorruptFileError("malformed storage id")
        if str(key) not in made:
            nbytes = numel * dtypes.dtype(kind.dtype).itemsize
            storage = Storage(None, 0, nbytes, str(key))
            made[str(key)] = TypedStorage(storage, kind.dtype, numel, str(location))
        return made[str(key)]

    return load


def outcome(action: Any) -> Any:
    """What an action returned, or the exception it raised (type, message, findings)."""
    try:
        return ("returned", action())
    except UnparsedPickleError as exc:
        return ("raised", type(exc).__name__, str(exc), exc.findings, exc.truncated)
    except Exception as exc:  # the reference's verdict may be any exception: compare it too
        return ("raised", type(exc).__name__, str(exc))


# Rules the scan gained after the reference machine was frozen, each for a reading of the
# bytes the machine itself does not change (a joblib wrapper's BUILD that ends before its
# FRAME does): set aside on the new side, so the machines are compared on the rest.
RULES_SINCE_REFERENCE = frozenset({"joblib-frame-split"})


def _older(findings: Any) -> tuple[Any, ...]:
    return tuple(f for f in findings if f.rule not in RULES_SINCE_REFERENCE)


def scanned(scan: Any, data: bytes, limits: Limits, persistent: bool) -> Any:
    def action() -> Any:
        result = scan(data, expect_persistent_ids=persistent, limits=limits)
        nested = [(n.offset, canonical(n.payload)) for n in result.nested]
        return _older(result.findings), nested, result.end

    found = outcome(action)
    if found[:2] == ("raised", UnparsedPickleError.__name__):
        return (*found[:3], _older(found[3]), *found[4:])
    return found


def read(reader: Any, data: bytes, limits: Limits, start: int = 0) -> Any:
    def action() -> Any:
        result = reader(data, start=start, storage_loader=_storages(), limits=limits)
        return canonical(result.value), result.end, result.protocol, result.opcodes

    return outcome(action)


def read_joblib(machine: Any, data: bytes, limits: Limits, monkeypatch: Any) -> Any:
    """Through ``formats.pickle_file``'s resolver, whose arrays read the bytes after BUILD
    through the machine's cursor (and whose object arrays run a nested machine)."""
    monkeypatch.setattr(pickle_file, "run", machine)
    view = memoryview(data)
    resolver = pickle_file.PickleFileResolver(path=None, data=view, directory=None, limits=limits)
    return outcome(lambda: canonical(machine(view, resolver, limits=limits).value))


def assert_same(data: bytes, monkeypatch: Any) -> None:
    for limits in LIMITS:
        for persistent in (False, True):
            expected = scanned(old_judging.scan_pickle, data, limits, persistent)
            assert scanned(judging.scan_pickle, data, limits, persistent) == expected, limits
        assert read(reading.read_pickle, data, limits) == read(
            old_reading.read_pickle, data, limits
        )
        expected = read_joblib(old_run, data, limits, monkeypatch)
        assert read_joblib(run, data, limits, monkeypatch) == expected, limits


@pytest.mark.parametrize("index", range(len(PICKLES)))
def test_every_built_pickle_reads_and_scans_as_before(
    index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_same(PICKLES[index], monkeypatch)


def test_each_pickle_of_a_stream_reads_as_before() -> None:
    stream = b"".join(PICKLES[:3]) + _plain(0) + _plain(5)
    start, ends = 0, []
    while start < len(stream):
        expected = read(old_reading.read_pickle, stream, Limits(), start)
        assert read(reading.read_pickle, stream, Limits(), start) == expected
        assert expected[0] == "returned"
        start = expected[1][1]
        ends.append(start)
    assert len(ends) == 5


def test_the_corpus_reaches_every_limit() -> None:
    """The small limits above are reached by the corpus, so the comparison covers them."""
    reached = set()
    for data in PICKLES:
        for limits in LIMITS[1:]:
            result = scanned(judging.scan_pickle, data, limits, True)
            if result[0] == "raised" and result[1] == "LimitExceededError":
                reached.add(limits)
    assert reached == set(LIMITS[1:-1])


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_and_cut_pickles_read_and_scan_as_before(
    data: st.DataObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = data.draw(st.sampled_from(PICKLES))
    assert_same(mutated(data, raw, flips=3), monkeypatch)


@settings(max_examples=150, deadline=None)
@given(blob=st.binary(min_size=1, max_size=64))
def test_random_bytes_fail_as_before(blob: bytes) -> None:
    for persistent in (False, True):
        expected = scanned(old_judging.scan_pickle, blob, Limits(), persistent)
        assert scanned(judging.scan_pickle, blob, Limits(), persistent) == expected
