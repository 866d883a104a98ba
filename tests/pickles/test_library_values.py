"""Values real model pickles hold that run nothing: builtins and numpy scalar types kept as
settings (gensim's ``hashfxn=hash``, scikit-learn's ``dtype=np.float64``) and numpy's own
legacy RandomState constructor. Each is safe where it is only data, and still judged when
a pickle calls what is only a value."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import modelport
from modelport.pickles.reading import read_pickle
from modelport.pickles.records import CallRecord, GlobalRef


def test_builtins_and_numpy_types_kept_as_settings_are_safe(tmp_path: Path) -> None:
    settings = {"hashfxn": hash, "kind": int, "dtype": np.float64, "flag": np.bool_, "s": str}
    path = tmp_path / "settings.pkl"
    path.write_bytes(pickle.dumps(settings, 2))

    report = modelport.scan(path)
    tree = read_pickle(path.read_bytes()).value

    assert report.verdict == "safe", report.to_json()
    assert pickle.loads(path.read_bytes()) == settings
    paths = {key: value.path for key, value in tree.items() if isinstance(value, GlobalRef)}
    assert paths == {
        "hashfxn": "builtins.hash",
        "kind": "builtins.int",
        "dtype": "numpy.float64",
        "flag": "numpy.bool",
        "s": "builtins.str",
    }


def test_calling_a_value_is_still_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "call.pkl"
    path.write_bytes(b"\x80\x02cbuiltins\nhash\nX\x01\x00\x00\x00a\x85R.")
    assert modelport.scan(path).verdict == "unsafe"


def _legacy_random_state(state: tuple[object, ...]) -> bytes:
    """What numpy < 1.17 wrote for a RandomState: its ctor called with no arguments, then
    BUILD with the legacy state tuple (spliced in from a protocol-2 pickle of the tuple)."""
    body = pickle.dumps(state, 2)[2:-1]
    return b"\x80\x02cnumpy.random\n__RandomState_ctor\n)R" + body + b"b."


def test_legacy_numpy_random_state_is_safe_and_its_key_is_kept(tmp_path: Path) -> None:
    state = np.random.RandomState(7).get_state()
    path = tmp_path / "rng.pkl"
    path.write_bytes(_legacy_random_state(state))
    oracle = pickle.loads(path.read_bytes()).get_state()

    report = modelport.scan(path)
    tree = read_pickle(path.read_bytes()).value
    listed = modelport.inspect(path).tensors
    modelport.convert(path, tmp_path / "rng.safetensors", modelport.ConvertOptions(take_all=True))

    assert report.verdict == "safe", report.to_json()
    assert isinstance(tree, CallRecord) and tree.custom_state()[0] == oracle[0] == "MT19937"
    assert [t.name for t in listed] == ["__state__.1"]
    written = load_file(tmp_path / "rng.safetensors")
    np.testing.assert_array_equal(written["__state__.1"], oracle[1])
