"""Key bombs: pickles whose dict keys or set items are tuples that cost far more to hash
than the pickle cost to read. CPython hashes a tuple through every item, recursively and
without a cache, so a tuple shared through the memo at each of 60 levels unfolds to 2**60
tuples in about 300 bytes, and ``pickle.loads`` never returns (the oracle tests below);
deep nesting overflows the C stack. The scan's fast path (the C unpickler) must never be
handed one: each must end in seconds with the verdict the Python machine alone gives."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest

from modelport.errors import LimitExceededError
from modelport.pickles import fast_scan, fast_walk, judging
from tests.test_pickle_fast_scan import fast_verdict

LEVELS = 60  # 2**60 tuples unfolded: no hash of it ever ends


def _pair_with_get(level: int) -> bytes:
    return b"h%c\x86q%c" % (level - 1, level)  # (t, t): BINGET, TUPLE2, BINPUT


def _triple(level: int) -> bytes:
    return b"h%cN\x87q%c" % (level - 1, level)  # (t, t, None): TUPLE3


def _dup(level: int) -> bytes:
    return b"2\x86"  # (t, t) with DUP, no memo at all


def _marked(level: int) -> bytes:
    return b"(h%ch%ct\x86q%c" % (level - 1, level - 1, level)  # (t, (t, t)) with TUPLE


def _memoized(level: int) -> bytes:
    return b"h%c\x86\x94" % (level - 1)  # protocol 4's MEMOIZE


def shared_key(level_bytes: Callable[[int], bytes] = _pair_with_get) -> bytes:
    """The key bomb's key: the empty tuple, then a tuple of the tuple before it, twice."""
    first = b")\x94" if level_bytes is _memoized else b")q\x00"
    return first + b"".join(level_bytes(level) for level in range(1, LEVELS + 1))


def deep_key(depth: int) -> bytes:
    return b"N" + b"\x85" * depth  # TUPLE1 of TUPLE1 of ... None


def setitem(key: bytes) -> bytes:
    return b"\x80\x02}" + key + b"Ns."


HASHED_BY: dict[str, Callable[[bytes], bytes]] = {
    "setitem": setitem,
    "setitems": lambda key: b"\x80\x02}(" + key + b"Nu.",
    "dict": lambda key: b"\x80\x02(" + key + b"Nd.",
    "additems": lambda key: b"\x80\x04\x8f(" + key + b"\x90.",
    "frozenset": lambda key: b"\x80\x04(" + key + b"\x91.",
    "inside_a_key": lambda key: b"\x80\x02}" + key + b"\x85Ns.",
    "build_state": lambda key: b"\x80\x02ccollections\nOrderedDict\n)R}" + key + b"Nsb.",
}
BOMBS = {
    **{f"shared_{name}": build(shared_key()) for name, build in HASHED_BY.items()},
    "shared_tuple3": setitem(shared_key(_triple)),
    "shared_dup": setitem(shared_key(_dup)),
    "shared_marked": setitem(shared_key(_marked)),
    "shared_memoize": b"\x80\x04}" + shared_key(_memoized) + b"Ns.",
    "deep_200000": setitem(deep_key(200_000)),
    "deep_90000": setitem(deep_key(90_000)),
    "deep_300": setitem(deep_key(300)),  # hashes at once, but past the machine's key depth
}


# C hashes what these opcodes make before any check: the walk refuses them.
REFUSED_BY_THE_WALK = ("shared_dict", "shared_additems", "shared_frozenset")


def _machine_alone(data: bytes) -> judging.PickleScan:
    with mock.patch.object(fast_scan, "clean_run", lambda *args: None):
        return judging.scan_pickle(data)


@pytest.mark.parametrize("walk_after", [0, 1 << 62], ids=["by_runs", "by_opcode"])
@pytest.mark.parametrize("name", REFUSED_BY_THE_WALK)
def test_the_walk_refuses_opcodes_that_hash_in_c(
    name: str, walk_after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast_walk, "_EXPRESSIONS", fast_walk._Expressions(walk_after))
    assert fast_walk.admit(memoryview(BOMBS[name]), 0, 99_999) is None


def _naming(module: str, name: str, stack_global: bool) -> bytes:
    if stack_global:
        return b"\x80\x04\x8c%c%s\x8c%c%s\x93." % (
            len(module),
            module.encode(),
            len(name),
            name.encode(),
        )
    return b"\x80\x02c%s\n%s\n." % (module.encode(), name.encode())


@pytest.mark.parametrize(
    "data",
    [
        _naming(*names, stack_global)
        for names in (fast_walk.CHECKED_DICT, fast_walk.NEW_MARKER)
        for stack_global in (True, False)
    ],
    ids=["dict_stack_global", "dict_global", "new_stack_global", "new_global"],
)
def test_a_pickle_naming_the_checked_dict_is_not_run_by_c(data: bytes) -> None:
    """C answers those names with a dict or the NEWOBJ marker; the Python machine reports
    each as a global."""
    assert fast_walk.admit(memoryview(data), 0, 99_999) is None
    assert judging.scan_pickle(data).findings == _machine_alone(data).findings != []


@pytest.mark.parametrize("name", sorted(set(BOMBS) - {"deep_200000"}))  # 2 s; scanned below
def test_the_python_machine_refuses_each_key_bomb(name: str) -> None:
    """The verdict the fast path must not change (the machine alone never hashes them)."""
    with pytest.raises(LimitExceededError):
        _machine_alone(BOMBS[name])


# Run in a child, so that a hang fails the test (by its timeout) instead of blocking it:
# for each bomb, with each walk, whether the fast path vouched for it and the scan's verdict.
_SCAN_ALL = """
import sys
from modelport.errors import ModelportError
from modelport.pickles import fast_scan, fast_walk, judging
from modelport.pickles.interface import Limits
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    for after in (0, 1 << 62):
        fast_walk._EXPRESSIONS = fast_walk._Expressions(after)
        resolver = judging.ScanResolver(
            expect_persistent_ids=True, data=memoryview(data),
            symbol_type=fast_scan.LiveSymbol, made_type=fast_scan.LiveMade,
        )
        taken = fast_scan.clean_run(memoryview(data), 0, resolver, Limits()) is not None
        try:
            judging.scan_pickle(data)
            verdict = "clean"
        except ModelportError as exc:
            verdict = type(exc).__name__
        print(taken, verdict)
"""


def test_the_fast_path_never_vouches_for_a_key_bomb(tmp_path: Path) -> None:
    paths = []
    for name, data in sorted(BOMBS.items()):
        paths.append(tmp_path / f"{name}.pkl")
        paths[-1].write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _SCAN_ALL, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["False", "LimitExceededError"] * 2 * len(BOMBS)


def test_modelport_scan_of_a_key_bomb_ends_in_seconds(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pkl"
    path.write_bytes(BOMBS["shared_setitem"])
    done = subprocess.run(
        [sys.executable, "-m", "modelport", "scan", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "SAFE" not in done.stdout
    assert "tuples in one pickled key" in done.stdout, done.stdout


@pytest.mark.skipif(not fast_scan.ENABLED, reason="the fast path is off on this Python")
def test_ordinary_tuple_keys_still_take_the_fast_path() -> None:
    shape = (3, 4)
    data = pickle.dumps({("layer", 1): shape, ("layer", 2): (shape, shape), (1, (2, 3)): 0}, 2)
    assert fast_verdict(data) == (True, [])


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["shared_setitem", "shared_frozenset", "shared_dup"])
def test_pickle_loads_never_returns_on_a_key_bomb(name: str) -> None:
    """The oracle: the natural loader really hangs (killed after a few seconds)."""
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
            input=BOMBS[name],
            capture_output=True,
            timeout=3,
        )
