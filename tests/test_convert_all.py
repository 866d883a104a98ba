"""``convert --all``: a whole training checkpoint through safetensors and back.

The oracle is ``torch.load(weights_only=True)`` of the original checkpoint: after
``pt -> safetensors -> pt`` the object must be equal with every type exact (dict vs
OrderedDict, tuple vs list, int vs float vs bool, int keys, bytes, nan payloads, -0.0) and
every tensor bit for bit; the safetensors in the middle must stay readable by the
reference library with every tensor present."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pickle
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import modelport
from modelport import limits
from modelport.cli.main import main
from modelport.conversion.converting import convert
from modelport.conversion.options import ConvertOptions
from modelport.errors import (
    ConversionError,
    CorruptFileError,
    ModelportError,
    UnsupportedVersionError,
    UsageError,
)
from modelport.pickles.torch_types import TorchDevice, TorchDType
from modelport.tensors import TensorRef
from modelport.transfer.write_plan import OutputTensor
from modelport.tree import typed_json, typed_json_decoding
from tests.conftest import torch_digest
from tests.models import TiedLM, TinyResNet, trained_checkpoint

ALL = ConvertOptions(take_all=True)


def checkpoint() -> dict[str, Any]:
    torch.manual_seed(0)
    ckpt = trained_checkpoint(TinyResNet(width=4), torch.randn(2, 3, 8, 8))
    ckpt.update(
        {
            "betas_like": (0.9, 0.999),
            "by_step": {0: "warmup", 10: [1.5, 2], -3: None},
            "nan": float("nan"),
            "payload_nan": struct.unpack(">d", bytes.fromhex("7ff8000000000abc"))[0],
            "inf": float("inf"),
            "minus_inf": float("-inf"),
            "minus_zero": -0.0,
            "raw": b"\x00\xffbytes\x80",
            "nothing": None,
            "done": False,
            "nested": [[1, [2.0, [True, "x"]]], [], ((),)],
            "big": 2**100,
            "negative_big": -(2**70),
            "odd_text": "caf\u00e9 \ud800 \U0001f600",
            "tuple_keys": {(1, "a"): 1.0, 2.5: "float key", b"k": "bytes key"},
            "mixed_list": [1, 1.0, True, "1", b"1", None],
            "dtype": torch.bfloat16,
            "device": torch.device("cuda:1"),
            "classes": {3, 1, 2},
            "phase": 1 + 2j,
            "buffer": bytearray(b"abc"),
            "many": list(range(2500)),  # past one APPENDS / SETITEMS batch
            "many_keys": {i: float(i) for i in range(1200)},
        }
    )
    return ckpt


def assert_same(a: Any, b: Any, path: str = "root") -> None:
    """Equal with exact types: tensors by dtype, shape and bits; floats by their bits.
    (modelport's readers give an ``OrderedDict`` as its subclass ``PickledDict``.)"""
    kind_a, kind_b = (OrderedDict if isinstance(x, OrderedDict) else type(x) for x in (a, b))
    assert kind_a is kind_b, f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) and torch_digest(a) == torch_digest(b), path
        assert a.requires_grad == b.requires_grad, path
    elif isinstance(a, dict):
        assert len(a) == len(b), f"{path}: {list(a)} != {list(b)}"
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb, f"{path} key {ka!r}")
            assert_same(va, vb, f"{path}.{ka}")
        if isinstance(a, OrderedDict):  # a state_dict's _metadata
            assert_same(vars(a), vars(b), f"{path}.__dict__")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float):
        assert struct.pack(">d", a) == struct.pack(">d", b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, complex):
        assert_same(a.real, b.real, path)
        assert_same(a.imag, b.imag, path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".gguf"])
def test_pt_through_a_tensor_format_and_back_is_exact(tmp_path: Path, suffix: str) -> None:
    source, middle, back = tmp_path / "ckpt.pt", tmp_path / f"ckpt{suffix}", tmp_path / "b.pt"
    torch.save(checkpoint(), source)
    first = convert(source, middle, ALL)
    assert "typed JSON" in first.selection and first.verified
    second = convert(middle, back, ALL)
    assert second.verified and len(second.tensors) == len(first.tensors)
    original = torch.load(source, weights_only=True)
    assert_same(torch.load(back, weights_only=True), original)
    assert_same(torch.load(back, weights_only=True, mmap=True), original)
    assert isinstance(original["optimizer_state_dict"]["state"][0]["step"], torch.Tensor)
    assert "modelport.tree" not in modelport.open(back).metadata  # pickled, not repeated


def test_npz_middle_is_plain_npz(tmp_path: Path) -> None:
    source, middle = tmp_path / "ckpt.pt", tmp_path / "ckpt.npz"
    ckpt = checkpoint()
    torch.save(ckpt, source)
    convert(source, middle, ALL)
    with np.load(middle) as arrays:
        assert arrays["optimizer_state_dict.state.0.step"].shape == ()
        json.loads(arrays["__modelport_tree__"].tobytes())
    with modelport.open(middle) as model:
        assert model.tree["by_step"] == {0: "warmup", 10: [1.5, 2], -3: None}
        assert "__modelport_tree__" not in model.tensors


def test_pt_to_pt_keeps_the_tree(tmp_path: Path) -> None:
    source, out = tmp_path / "ckpt.pt", tmp_path / "copy.pt"
    torch.save(checkpoint(), source)
    report = convert(source, out, ALL)
    assert report.verified is True
    original = torch.load(source, weights_only=True)  # the oracle: torch reads both files
    copied = torch.load(out, weights_only=True)
    assert list(copied) == list(original)

    def weights(ckpt: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.dtype, v.shape, torch_digest(v)) for k, v in ckpt["model_state_dict"].items()}

    assert weights(copied) == weights(original)
    assert type(copied["model_state_dict"]) is OrderedDict
    assert copied["by_step"] == {0: "warmup", 10: [1.5, 2], -3: None}
    assert copied["tuple_keys"] == original["tuple_keys"]
    groups = copied["optimizer_state_dict"]["param_groups"]
    assert groups == original["optimizer_state_dict"]["param_groups"]
    assert_same(copied, original)  # and everything else, with exact types and float bits


def test_values_torch_itself_cannot_reload_come_back_loadable(tmp_path: Path) -> None:
    """torch.save pickles b"" as builtins.bytes(), which weights_only refuses; modelport
    writes it as torch writes other bytes."""
    source, middle, out = tmp_path / "ckpt.pt", tmp_path / "mid.safetensors", tmp_path / "out.pt"
    torch.save({"empty": b"", "w": torch.arange(3)}, source)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(source, weights_only=True)  # the premise: torch refuses its own file
    convert(source, middle, ALL)
    with safe_open(str(middle), framework="pt") as handle:  # the middle, read by safetensors
        assert list(handle.keys()) == ["w"]
        assert torch.equal(handle.get_tensor("w"), torch.arange(3))
    convert(middle, out, ALL)
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == ["empty", "w"]
    assert type(loaded["empty"]) is bytes and loaded["empty"] == b""
    assert loaded["w"].dtype == torch.int64 and torch.equal(loaded["w"], torch.arange(3))
    assert_same(loaded, torch.load(source, weights_only=False))


def test_safetensors_middle_is_plain_safetensors(tmp_path: Path) -> None:
    source, middle = tmp_path / "ckpt.pt", tmp_path / "ckpt.safetensors"
    ckpt = checkpoint()
    torch.save(ckpt, source)
    convert(source, middle, ALL)
    optimizer = ckpt["optimizer_state_dict"]
    expected = {f"model_state_dict.{k}": v for k, v in ckpt["model_state_dict"].items()}
    for index, state in optimizer["state"].items():
        expected.update({f"optimizer_state_dict.state.{index}.{k}": v for k, v in state.items()})
    with safe_open(str(middle), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(expected)
        for name, tensor in expected.items():
            assert_same(handle.get_tensor(name), tensor, name)
        document = json.loads(handle.metadata()[typed_json.KEY])
    assert document["version"] == typed_json.VERSION
    # no pickle anywhere: the structure is JSON data
    assert b"\x80\x02" not in middle.read_bytes()[: 8 + len(json.dumps(document)) + 4096]


def test_open_gives_the_nested_tree_and_load_the_weights(tmp_path: Path) -> None:
    source, middle = tmp_path / "ckpt.pt", tmp_path / "ckpt.safetensors"
    ckpt = checkpoint()
    torch.save(ckpt, source)
    convert(source, middle, ALL)
    with modelport.open(middle) as model:
        tree = model.tree
        assert tree["epoch"] == 3 and type(tree["loss"]) is float
        assert isinstance(tree["optimizer_state_dict"]["state"][0]["step"], TensorRef)
        assert tree["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)
        assert "tree" in model.details and typed_json.KEY not in model.metadata
        assert model.weights().source == "model_state_dict"
    weights = modelport.load(middle)
    assert list(weights) == list(ckpt["model_state_dict"])
    for name, tensor in ckpt["model_state_dict"].items():
        assert_same(weights[name], tensor, name)
    report = modelport.inspect(middle).to_json()
    assert report["extras"]["epoch"] == 3


@pytest.mark.parametrize("suffix", [".pt"])  # typed JSON targets keep it (test_wild_whole)
def test_namespace_is_refused_with_its_path_or_dropped(tmp_path: Path, suffix: str) -> None:
    source, middle = tmp_path / "ckpt.pt", tmp_path / f"out{suffix}"
    ckpt = checkpoint()
    ckpt["hparams"] = {"args": argparse.Namespace(lr=0.1, depth=4)}
    torch.save(ckpt, source)
    with pytest.raises(ConversionError, match=r"hparams\.args \(argparse\.Namespace object"):
        convert(source, middle, ALL)
    assert not middle.exists()
    dropping = ConvertOptions(take_all=True, drop_unrepresentable=True)
    report = convert(source, middle, dropping)
    assert any("hparams.args" in note and "Namespace" in note for note in report.notes)
    assert modelport.scan(middle).verdict == "safe"
    convert(middle, tmp_path / "back.pt", ALL)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back.pop("hparams") == {}
    del ckpt["hparams"]
    torch.save(ckpt, tmp_path / "plain.pt")
    assert_same(back, torch.load(tmp_path / "plain.pt", weights_only=True))


def test_cli_drop_unrepresentable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"  # a torch target: plain data only
    torch.save({"epoch": 1, "w": torch.ones(2), "args": argparse.Namespace(a=1)}, source)
    assert main(["convert", str(source), str(out), "--all"]) == 2
    assert "args" in capsys.readouterr().err
    code = main(["convert", str(source), str(out), "--all", "--drop-unrepresentable", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert any("args" in note for note in payload["notes"])
    with modelport.open(out) as model:
        assert list(model.tree) == ["epoch", "w"] and model.tree["epoch"] == 1


def test_tied_tensors_share_storage_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    source, middle, back = tmp_path / "lm.pt", tmp_path / "lm.safetensors", tmp_path / "b.pt"
    torch.save(trained_checkpoint(model, torch.tensor([[1, 2, 3]])), source)
    report = convert(source, middle, ALL)
    assert report.aliases == {"model_state_dict.head.weight": "model_state_dict.embed.weight"}
    convert(middle, back, ALL)
    loaded = torch.load(back, weights_only=True)
    state = loaded["model_state_dict"]
    assert state["head.weight"].data_ptr() == state["embed.weight"].data_ptr()
    assert_same(loaded, torch.load(source, weights_only=True))


def test_exclude_and_cast_keep_the_rest(tmp_path: Path) -> None:
    source, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save(checkpoint(), source)
    options = ConvertOptions(take_all=True, exclude=("optimizer_state_dict.state.*",))
    convert(source, tmp_path / "out.safetensors", options)
    convert(tmp_path / "out.safetensors", out, ALL)
    loaded = torch.load(out, weights_only=True)
    assert all(state == {} for state in loaded["optimizer_state_dict"]["state"].values())
    assert loaded["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)
    convert(source, tmp_path / "half.pt", ConvertOptions(take_all=True, dtype="bfloat16"))
    half = torch.load(tmp_path / "half.pt", weights_only=True)
    assert half["model_state_dict"]["fc.weight"].dtype == torch.bfloat16
    assert half["optimizer_state_dict"]["state"][0]["step"].dtype == torch.bfloat16
    assert half["epoch"] == 3


def test_renames_need_a_flat_file(tmp_path: Path) -> None:
    source = tmp_path / "ckpt.pt"
    torch.save(checkpoint(), source)
    with pytest.raises(UsageError, match="--rename"):
        convert(source, tmp_path / "o.safetensors", ConvertOptions(take_all=True, add_prefix="x."))
    flat = tmp_path / "flat.pt"
    torch.save({f"module.{k}": v for k, v in TinyResNet(width=4).state_dict().items()}, flat)
    options = ConvertOptions(take_all=True, strip_prefix="auto")
    report = convert(flat, tmp_path / "flat.safetensors", options)
    assert all(not name.startswith("module.") for name, *_ in report.tensors)
    with safe_open(str(tmp_path / "flat.safetensors"), framework="pt") as handle:
        assert typed_json.KEY not in (handle.metadata() or {})


def test_two_entries_of_one_name_are_refused(tmp_path: Path) -> None:
    source = tmp_path / "ckpt.pt"
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}, "epoch": 1}, source)
    with pytest.raises(ConversionError, match=r"both named 'a\.b'"):
        convert(source, tmp_path / "out.safetensors", ALL)


def test_pickled_module_is_kept_as_its_state_dict(tmp_path: Path) -> None:
    source, out = tmp_path / "whole.pt", tmp_path / "out.pt"
    torch.manual_seed(0)
    model = TinyResNet(width=4)
    torch.save({"model": model, "epoch": 2}, source)
    report = convert(source, out, ConvertOptions(take_all=True, allow_unsafe=True))
    assert any("kept as its state_dict" in note for note in report.notes)
    loaded = torch.load(out, weights_only=True)
    assert loaded["epoch"] == 2
    for name, tensor in model.state_dict().items():
        assert_same(loaded["model"][name], tensor.detach(), name)


def test_broken_tree_metadata_falls_back_to_flat_tensors(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    cases = [
        "not json",
        '{"version": 1, "root": {"$": "pickle", "data": "..."}}',
        '{"version": 1, "root": {"$": "tensor", "name": "a"}}',  # b is not placed
        '{"version": 1, "root": {"$": "tensor", "name": "missing"}}',
        '{"version": 9, "root": null}',
    ]
    for text in cases:
        save_file(tensors, str(path), metadata={typed_json.KEY: text})
        with modelport.open(path) as model:
            assert set(model.tree) == {"a", "b"}
            assert any(typed_json.KEY in warning for warning in model.warnings)


# -- typed JSON ----------------------------------------------------------------------------
HASHABLE = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5)
)
SCALARS = (
    HASHABLE
    | st.sampled_from(["\ud800", "a\udfffb", "\x00", "$", '{"$": "tensor"}'])
    | st.binary(max_size=8).map(bytearray)
    | st.complex_numbers()
    | st.sampled_from([TorchDType("bfloat16"), TorchDType("int64"), TorchDevice("cuda:0")])
)
KEYS = HASHABLE | st.tuples(HASHABLE, HASHABLE)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(KEYS, children, max_size=4)
        | st.dictionaries(KEYS, children, max_size=4).map(OrderedDict)
        | st.sets(st.integers() | st.text(max_size=3), max_size=4)
    )


TREES = st.recursive(SCALARS, _containers, max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(TREES)
def test_typed_json_round_trip(tree: Any) -> None:
    text = typed_json.encode(tree)
    constants: list[str] = []  # json.loads hands NaN, Infinity and -Infinity tokens here
    document = json.loads(text, parse_constant=constants.append)
    assert constants == []  # standard JSON
    assert [c for c in text if 0xD800 <= ord(c) <= 0xDFFF] == []  # valid UTF-8 once encoded
    assert sorted(document) == ["root", "version"] and document["version"] == typed_json.VERSION
    decoded = typed_json_decoding.decode(text, {})
    assert_same(decoded, tree)


def test_typed_json_places_tensors_and_state() -> None:
    ref = TensorRef("float32", (2,), None)
    out = OutputTensor("w", "float32", ref)
    state = OrderedDict([("w", out)])
    state.pickle_state = {"_metadata": OrderedDict([("", {"version": 1})])}  # type: ignore[attr-defined]
    tree = {"model": state, "tied": [out, out]}
    decoded = typed_json_decoding.decode(typed_json.encode(tree), {"w": ref}, complete=True)
    assert decoded["model"]["w"] is ref and decoded["tied"][0] is decoded["tied"][1] is ref
    assert decoded["model"].pickle_state == {"_metadata": {"": {"version": 1}}}


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 1, "root": {"$": "exec", "code": "x"}}',
        '{"version": 1, "root": {"$": "tuple"}}',
        '{"version": 1, "root": {"$": "tuple", "items": [], "extra": 1}}',
        '{"version": 1, "root": {"$": "dict", "items": [[[1], 2]]}}',
        '{"version": 1, "root": {"$": "dict", "items": [[1, 2], [1, 3]]}}',
        '{"version": 1, "root": {"$": "dict", "items": [[1]]}}',
        '{"version": 1, "root": {"$": "set", "items": [{"$": "bytearray", "base64": ""}]}}',
        '{"version": 1, "root": {"$": "bytes", "base64": "!!"}}',
        '{"version": 1, "root": {"$": "float", "bits": "xyz"}}',
        '{"version": 1, "root": {"$": "int", "hex": "12g"}}',
        '{"version": 1, "root": {"$": "torch.dtype", "name": "os.system"}}',
        '{"version": 1, "root": {"$": "torch.device", "spec": "cpu; rm"}}',
        '{"version": 1, "root": {"$": "tensor", "name": "nope"}}',
        '{"version": 1, "root": {"no tag": 1}}',
        '{"version": 1, "root": NaN}',
        '{"version": 1, "version": 1, "root": 1}',
        '{"version": 1}',
        "[1, 2]",
        '{"version": 1, "root": '
        + "[" * (limits.MAX_DEPTH + 50)
        + "]" * (limits.MAX_DEPTH + 50)
        + "}",
        '{"version": 1, "root": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_typed_json_decode_is_strict(text: str) -> None:
    with pytest.raises(ModelportError):
        typed_json_decoding.decode(text, {})


def test_typed_json_errors_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CorruptFileError, match="unknown type tag"):
        typed_json_decoding.decode('{"version": 1, "root": {"$": "pickle"}}', {})
    with pytest.raises(UnsupportedVersionError):
        typed_json_decoding.decode('{"version": 2, "root": null}', {})
    assert math.isnan(typed_json_decoding.decode(typed_json.encode(math.nan), {}))
    monkeypatch.setattr(limits, "MAX_TYPED_JSON_CHARS", 10)
    with pytest.raises(ModelportError, match="above the limit"):
        typed_json_decoding.decode('{"version": 1, "root": null}', {})


def test_a_checkpoint_whose_config_points_back_at_its_parent_reads(tmp_path: Path) -> None:
    """Lightning's hyper_parameters hold config nodes that refer to their parents: a cycle in
    the pickle, which torch.load follows by reference, not nesting without end."""
    node: dict[str, Any] = {"lr": 0.1, "children": []}
    node["children"].append({"parent": node, "width": 4})
    state = {"w": torch.randn(3, 2), "b": torch.randn(3)}
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": node, "epoch": 3}, path)
    reference = torch.load(path, weights_only=True)  # the oracle reads it
    assert reference["hyper_parameters"]["children"][0]["parent"] is reference["hyper_parameters"]
    loaded = modelport.load(path)
    assert sorted(loaded) == sorted(reference["state_dict"])
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(loaded[name], tensor)
    report = modelport.inspect(path)
    assert report.safety["verdict"] == "safe"
    extras = report.to_json()["extras"]
    assert extras["hyper_parameters"] == {
        "lr": 0.1,
        "children": [{"parent": "<cycle>", "width": 4}],
    }
    assert extras["epoch"] == 3


def test_torch_version_in_a_checkpoint_is_plain_text(tmp_path: Path) -> None:
    """torch.__version__ is pickled as torch's own str subclass (Lightning saves it): the
    scan calls it safe and the reader keeps its text."""
    path = tmp_path / "versioned.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "pytorch_version": torch.__version__}, path)
    reference = torch.load(path, weights_only=False)  # a file this test wrote itself
    assert type(reference["pytorch_version"]).__name__ == "TorchVersion"
    assert modelport.scan(path).verdict == "safe"
    assert modelport.inspect(path).to_json()["extras"] == {
        "pytorch_version": str(reference["pytorch_version"])
    }


def test_an_estimators_arrays_are_kept_under_inspects_names(tmp_path: Path) -> None:
    """A joblib file of a fitted scikit-learn estimator: with --drop-unrepresentable the
    object's state is kept as plain data, so its arrays reach the output instead of being
    dropped with it, named as inspect lists them."""
    linear_model = importlib.import_module("sklearn.linear_model")  # seconds: only here
    rng = np.random.default_rng(0)
    estimator = linear_model.LogisticRegression().fit(
        rng.standard_normal((20, 3)), np.arange(20) % 2
    )
    source = tmp_path / "clf.joblib"
    joblib.dump(estimator, source)
    listed = [t.name for t in modelport.inspect(source).tensors]
    assert {"coef_", "intercept_"} <= set(listed)
    target = tmp_path / "clf.safetensors"
    options = ConvertOptions(take_all=True, drop_unrepresentable=True, allow_unsafe=True)
    report = convert(source, target, options)
    assert any("kept the state of the sklearn" in note for note in report.notes)
    with safe_open(str(target), "np") as written:
        assert sorted(written.keys()) == sorted(listed)
        assert np.array_equal(written.get_tensor("coef_"), estimator.coef_)
        assert np.array_equal(written.get_tensor("intercept_"), estimator.intercept_)
