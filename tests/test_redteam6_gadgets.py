"""Red-team round 6: calls a pickle makes through what the judge allowed. A joblib array
whose dtype state says it holds objects (joblib then unpickles its bytes); APPEND(S) and
ADDITEMS onto an object whose ``append``/``add`` a BUILD state planted; ``__setstate__``
planted through a state that is no literal dict and called by a second BUILD; a nested
pickle in bytes a class's own ``__setstate__`` loads; and gadgets the denylist named only
by their package. Each attack is checked against its real loader with a marker file; the
twins real libraries write keep their verdicts."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch

import modelport
from modelport.gadgets import gadget


def _scan(path: Path) -> tuple[str, set[str]]:
    (report,) = modelport.scan(path).files
    return report.verdict, {f.rule for f in report.findings}


# -- a tiny opcode assembler (protocol 4, no frames) -----------------------------------------


def _text(value: str) -> bytes:
    raw = value.encode()
    return (
        b"\x8c" + bytes([len(raw)]) + raw
        if len(raw) < 256
        else b"X" + struct.pack("<I", len(raw)) + raw
    )


def _bytes(value: bytes) -> bytes:
    return (
        b"C" + bytes([len(value)]) + value
        if len(value) < 256
        else b"B" + struct.pack("<I", len(value)) + value
    )


def _global(module: str, name: str) -> bytes:
    return _text(module) + _text(name) + b"\x93"


def _new(module: str, name: str) -> bytes:
    return _global(module, name) + b")\x81"


def _call1(func: bytes, arg: bytes) -> bytes:
    return func + arg + b"\x85R"


def _dict(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def _path(marker: Path) -> bytes:
    return _call1(_global("pathlib", "Path"), _text(str(marker)))


def _touching_pickle(marker: Path) -> bytes:
    """A plain pickle that touches the marker and returns a dict: the nested payload."""
    return _pickle(_call1(_global("pathlib", "Path.touch"), _path(marker)) + b"0}")


def _with_hook(cls: tuple[str, str], attribute: str, callee: bytes) -> bytes:
    """An allowlisted object whose BUILD state puts ``callee`` at ``attribute``."""
    return _new(*cls) + _dict((_text(attribute), callee)) + b"b"


_NAMESPACE = ("types", "SimpleNamespace")
_IDENTITY = ("torch.nn.modules.linear", "Identity")


def _torch_zip(data_pkl: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    return buffer.getvalue()


# -- case 2: APPEND, APPENDS and ADDITEMS through a planted method ------------------------------

_HOOKS = {
    "append": (_NAMESPACE, "append", b"a"),
    "appends-falls-back-to-append": (_NAMESPACE, "append", b"e"),
    "additems": (_NAMESPACE, "add", b"\x90"),
    "nn-module-append": (_IDENTITY, "append", b"a"),
}


def _hooked(kind: str, marker: Path) -> bytes:
    cls, attribute, opcode = _HOOKS[kind]
    items = _path(marker) if opcode == b"a" else b"(" + _path(marker)
    return _pickle(_with_hook(cls, attribute, _global("pathlib", "Path.touch")) + items + opcode)


@pytest.mark.parametrize("kind", sorted(_HOOKS))
def test_items_onto_an_object_call_the_method_its_state_planted(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = _hooked(kind, marker)
    pickle.loads(data)
    assert marker.exists()  # the loader called Path.touch through the planted method
    marker.unlink()
    (tmp_path / "hook.pkl").write_bytes(data)
    verdict, rules = _scan(tmp_path / "hook.pkl")
    assert verdict == "unsafe" and "item-hook" in rules


def test_the_hook_in_a_torch_zip_runs_under_torch_load(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "hook.pt"
    path.write_bytes(_torch_zip(_hooked("nn-module-append", marker)))
    torch.load(path, weights_only=False)
    assert marker.exists()
    verdict, rules = _scan(path)
    assert verdict == "unsafe" and "item-hook" in rules


# -- cases 3 and 7: __setstate__ through a computed state, called by a second BUILD -----------


def _odict_state(callee: bytes) -> bytes:
    pair = _text("__setstate__") + callee + b"\x86"
    return _global("collections", "OrderedDict") + b"(" + pair + b"l\x85R"


def test_a_computed_state_plants_setstate_for_a_second_build(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    state = _odict_state(_global("pathlib", "Path.touch"))
    data = _pickle(_new(*_NAMESPACE) + state + b"b" + _path(marker) + b"b")
    pickle.loads(data)
    assert marker.exists()
    (tmp_path / "odict.pkl").write_bytes(data)
    verdict, rules = _scan(tmp_path / "odict.pkl")
    assert verdict == "unsafe" and {"opaque-state", "repeated-build"} <= rules


def test_a_second_build_alone_is_reported(tmp_path: Path) -> None:
    """A literal state then a second BUILD: the smuggling rule names the first, and the
    second BUILD is the call."""
    marker = tmp_path / "marker"
    data = _pickle(
        _with_hook(_NAMESPACE, "__setstate__", _global("pathlib", "Path.touch"))
        + _path(marker)
        + b"b"
    )
    pickle.loads(data)
    assert marker.exists()
    (tmp_path / "twice.pkl").write_bytes(data)
    assert "repeated-build" in _scan(tmp_path / "twice.pkl")[1]


# -- cases 4 and 5: nested pickles in bytes; gadgets named inside their packages ---------------


def test_bytes_a_class_loads_in_its_setstate_are_scanned(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    state = _bytes(_touching_pickle(marker)) + b"\x89\x86"  # (payload, False)
    wrapper = ("torch.utils.data.datapipes.datapipe", "_DataPipeSerializationWrapper")
    data = _pickle(_new(*wrapper) + state + b"b")
    pickle.loads(data)
    assert marker.exists()
    (tmp_path / "datapipe.pkl").write_bytes(data)
    verdict, rules = _scan(tmp_path / "datapipe.pkl")
    # the nested pickle's own call is found, not only the wrapper's name
    assert verdict == "unsafe" and {"nested-payload", "stdlib-call"} <= rules


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_nested_pickle_handed_to_an_unknown_callee_is_scanned(
    protocol: int, tmp_path: Path
) -> None:
    """What ``torch._dynamo.config.load_config`` does with its bytes (``pickle.loads``): the
    nested pickle runs. Protocol 2 spells bytes as ``_codecs.encode(text, "latin1")``."""
    marker = tmp_path / "marker"
    nested = _touching_pickle(marker)
    pickle.loads(nested)
    assert marker.exists()
    spelled = (
        _bytes(nested)
        if protocol > 2
        else _global("_codecs", "encode")
        + _text(nested.decode("latin-1"))
        + _text("latin1")
        + b"\x86R"
    )
    assert pickle.loads(_pickle(spelled)) == nested
    hooked = _pickle(
        _with_hook(_NAMESPACE, "append", _global("torch._dynamo.config", "load_config"))
        + spelled
        + b"a"
    )
    (tmp_path / "hooked.pkl").write_bytes(hooked)
    verdict, rules = _scan(tmp_path / "hooked.pkl")
    assert verdict == "unsafe" and {"known-gadget", "nested-payload", "stdlib-call"} <= rules


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("joblib.numpy_pickle", "load"),
        ("torch.jit._serialization", "load"),
        ("torch._dynamo.config", "load_config"),
        ("torch._inductor.config", "load_config"),
        ("numpy.lib._npyio_impl", "load"),
        ("importlib._bootstrap", "_gcd_import"),
        ("importlib.util", "spec_from_file_location"),
        ("xmlrpc.client", "ServerProxy"),
        ("poplib", "POP3"),
        ("imaplib", "IMAP4"),
    ],
)
def test_gadgets_are_named_inside_their_packages(module: str, name: str) -> None:
    assert gadget(module, name) is not None


# -- case 1: a joblib dtype state whose flags say it holds objects ------------------------------


def _dtype(spec: str, flags: int) -> bytes:
    reduced = np.dtype(spec).__reduce__()
    version, order, _, _, _, elsize, alignment = reduced[2][:7]
    state = (
        b"(K"
        + bytes([version])
        + _text(order)
        + b"NNN"
        + b"J"
        + struct.pack("<i", elsize)
        + b"J"
        + struct.pack("<i", alignment)
        + b"K"
        + bytes([flags])
        + (b"N" if len(reduced[2]) == 9 else b"")
        + b"t"
    )
    return _global("numpy", "dtype") + _text(reduced[1][0]) + b"\x89\x88\x87R" + state + b"b"


def _wrapper(dtype: bytes, count: int) -> bytes:
    state = _dict(
        (_text("subclass"), _global("numpy", "ndarray")),
        (_text("shape"), b"J" + struct.pack("<i", count) + b"\x85"),
        (_text("order"), _text("C")),
        (_text("dtype"), dtype),
        (_text("allow_mmap"), b"\x89"),
    )
    return _new("joblib.numpy_pickle", "NumpyArrayWrapper") + state + b"b"


def _flagged_joblib(spec: str, flags: int, marker: Path) -> bytes:
    """A float array joblib reads as raw bytes (which stops pickle.load's reading), then a
    ``spec`` array whose dtype state has ``flags``, followed by a nested pickle."""
    nested = _pickle(_call1(_global("pathlib", "Path.touch"), _path(marker)) + b"0")
    nested = nested[:-1] + _global("numpy", "zeros") + b"K\x01\x85\x85R."
    pad = (-(len(nested) + 3)) % 8  # padded inside, before STOP, to whole elements
    nested = nested[:-1] + b"C" + bytes([pad]) + b"x" * pad + b"0."
    decoy = _wrapper(_dtype("f8", 0), 1) + b"\xff" * 8
    return b"\x80\x04(" + decoy + _wrapper(_dtype(spec, flags), len(nested) // 8) + nested + b"t."


@pytest.mark.parametrize("spec", ["V8", "S8"])
def test_a_dtype_flagged_as_holding_objects_is_not_read_as_raw_bytes(
    spec: str, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "flags.joblib"
    path.write_bytes(_flagged_joblib(spec, 1, marker))
    joblib.load(path)
    assert marker.exists()  # joblib unpickled the array's bytes
    verdict, _ = _scan(path)
    assert verdict == "error"  # the flags and the spelling disagree: not analysed, not safe


def test_raw_array_bytes_that_hold_a_pickle_are_judged(tmp_path: Path) -> None:
    """Without the flag joblib reads the bytes raw and runs nothing; pickle.load's reading
    stops at the float array before them. Bytes that open like a pickle are judged all the
    same, so no reading that stops early leaves them unjudged."""
    marker = tmp_path / "marker"
    path = tmp_path / "plain.joblib"
    path.write_bytes(_flagged_joblib("V8", 0, marker))
    joblib.load(path)
    assert not marker.exists()
    verdict, rules = _scan(path)
    assert verdict == "unsafe" and {"nested-payload", "stdlib-call"} <= rules


# -- twins: what real libraries write keeps its verdict ----------------------------------------


def _twins(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.ModuleList([torch.nn.ReLU()]), torch.nn.ModuleDict()
    )
    found: dict[str, Path] = {}

    def save(name: str, value: object, saver: object = torch.save) -> None:
        found[name] = tmp_path / name
        saver(value, found[name])  # type: ignore[operator]

    save("state_dict.pt", model.state_dict())
    save("two_state_dicts.pt", {"model": model.state_dict(), "ema": model.state_dict()})
    optimizer = {  # Adam's state_dict, without importing torch.optim (seconds)
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4, 3)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}],
    }
    save("checkpoint.pt", {"model": model.state_dict(), "optimizer": optimizer, "epoch": 3})
    save("whole_module.pt", model)
    save("odict.pt", OrderedDict(a=torch.ones(2), b=torch.zeros(3)))
    arrays = {
        "floats": np.arange(6.0).reshape(2, 3),
        "objects": np.array(["a", None, {"k": 1}], dtype=object),
        "records": np.zeros(2, dtype=[("x", "<f4"), ("o", "O")]),
        "text": np.array(["ab", "c"]),
        "times": np.array(["2020-01-01"], dtype="M8[s]"),
    }
    save("arrays.joblib", arrays, joblib.dump)
    found["arrays.pkl"] = tmp_path / "arrays.pkl"
    found["arrays.pkl"].write_bytes(pickle.dumps(arrays, protocol=2))
    return found


def test_real_files_keep_their_verdicts(tmp_path: Path) -> None:
    for name, path in _twins(tmp_path).items():
        verdict, rules = _scan(path)
        new_rules = {"item-hook", "opaque-state", "repeated-build", "nested-payload"}
        assert not rules & new_rules, (name, rules)
        assert verdict in ("safe", "suspicious"), (name, verdict, rules)
        if name != "whole_module.pt":
            assert verdict == "safe", (name, rules)
