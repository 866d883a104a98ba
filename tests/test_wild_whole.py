"""``convert --all`` keeps whole what files in the wild hold around their arrays.

Files made by scikit-learn, gensim, joblib, numpy and Lightning-style training code hold
third-party objects (estimators, models, config nodes that point back at their parents)
and numpy object arrays. Their arrays go into the target as tensors and their inert
structure (class paths and state) into its typed JSON, so modelport reads back the same
tree. The oracle is each tool's own loader on a file the test wrote itself."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import torch
from safetensors import safe_open

import modelport
from modelport.conversion.converting import convert
from modelport.conversion.options import ConvertOptions
from modelport.errors import ConversionError, CorruptFileError
from modelport.pickles.numpy_types import NumpyArray
from modelport.pickles.records import GlobalRef, ObjectRecord
from modelport.tree import typed_json, typed_json_decoding
from modelport.tree.names import tensors_of

ALL = ConvertOptions(take_all=True)


def _whole(source: Path, target: Path) -> Any:
    """``convert --all`` into ``target``; the tree read back, checked to be nested (not
    the flat fallback) and to hold every tensor ``inspect`` lists in the source."""
    convert(source, target, ALL)
    listed = {t.name for t in modelport.inspect(source).tensors}
    with modelport.open(target) as model:
        assert "tree" in model.details, model.warnings
        assert set(tensors_of(model.tree)) == listed
        return model.tree


def _array(tensor: Any) -> np.ndarray:
    return np.asarray(tensor.numpy())


def _class_path(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def test_a_scikit_learn_estimator_survives_with_its_class_and_state(tmp_path: Path) -> None:
    svm = pytest.importorskip("sklearn.svm")
    calibration = pytest.importorskip("sklearn.calibration")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 3)), np.arange(40) % 2
    fitted = calibration.CalibratedClassifierCV(svm.LinearSVC(), cv=2).fit(x, y)
    source, target = tmp_path / "clf.joblib", tmp_path / "clf.safetensors"
    joblib.dump(fitted, source)
    reference = joblib.load(source)  # the test's own file: its loader is the oracle
    tree = _whole(source, target)
    assert isinstance(tree, ObjectRecord) and tree.class_path == _class_path(reference)
    state = tree.attributes()
    assert state["cv"] == 2 and state["n_features_in_"] == 3
    assert np.array_equal(_array(state["classes_"]), reference.classes_)
    inner = state["calibrated_classifiers_"][0].attributes()["estimator"]
    assert inner.class_path == _class_path(reference.calibrated_classifiers_[0].estimator)
    coef = _array(inner.attributes()["coef_"])
    assert np.array_equal(coef, reference.calibrated_classifiers_[0].estimator.coef_)
    with safe_open(str(target), "np") as written:  # the reference reader sees every array
        assert len(list(written.keys())) == len(tensors_of(tree))
    assert modelport.scan(target).verdict == "safe"


def test_a_gensim_model_survives_with_its_vectors_and_vocabulary(tmp_path: Path) -> None:
    word2vec = pytest.importorskip("gensim.models.word2vec")
    sentences = [["tensor", "model", "file"], ["model", "weights", "file"]] * 5
    trained = word2vec.Word2Vec(sentences, vector_size=4, min_count=1, seed=1, workers=1)
    source, target = tmp_path / "w2v.model", tmp_path / "w2v.safetensors"
    trained.save(str(source))  # gensim's own pickle, arrays inside it at this size
    reference = word2vec.Word2Vec.load(str(source))
    tree = _whole(source, target)
    assert tree.class_path == "gensim.models.word2vec.Word2Vec"
    vectors = tree.attributes()["wv"].attributes()
    assert np.array_equal(_array(vectors["vectors"]), reference.wv.vectors)
    assert vectors["key_to_index"] == reference.wv.key_to_index
    assert vectors["index_to_key"] == reference.wv.index_to_key


def test_numpy_object_arrays_survive_as_arrays_of_their_items(tmp_path: Path) -> None:
    items = np.empty(3, dtype=object)
    items[:] = [{"w": np.arange(4.0), "name": "layer"}, "text", np.eye(2, dtype=np.float32)]
    source, target = tmp_path / "objects.npy", tmp_path / "objects.safetensors"
    np.save(source, items, allow_pickle=True)
    reference = np.load(source, allow_pickle=True)
    tree = _whole(source, target)
    array = next(iter(tree.values())) if isinstance(tree, dict) else tree
    assert isinstance(array, NumpyArray) and array.shape == reference.shape
    first, text, eye = array.objects or []
    assert first["name"] == "layer" and text == "text"
    assert np.array_equal(_array(first["w"]), reference[0]["w"])
    assert np.array_equal(_array(eye), reference[2])


def test_an_old_joblib_side_file_holding_objects_is_read_and_kept(tmp_path: Path) -> None:
    """joblib < 0.10 pickled each array as an ``NDArrayWrapper`` naming a ``.npy`` side
    file; an object array's side file is itself a pickle. joblib still loads these."""
    compat = pytest.importorskip("joblib.numpy_pickle_compat")
    objects = np.empty(2, dtype=object)
    objects[:] = ["a", {"b": 1.5}]
    weights = np.linspace(0, 1, 6).reshape(2, 3)
    source = tmp_path / "old.pkl"
    np.save(tmp_path / "old.pkl_01.npy", weights)
    np.save(tmp_path / "old.pkl_02.npy", objects, allow_pickle=True)
    wrapped = [
        compat.NDArrayWrapper("old.pkl_01.npy", np.ndarray, allow_mmap=False),
        compat.NDArrayWrapper("old.pkl_02.npy", np.ndarray, allow_mmap=False),
    ]
    source.write_bytes(pickle.dumps({"weights": wrapped[0], "labels": wrapped[1]}, protocol=2))
    with pytest.warns(DeprecationWarning, match="less than 0.10"):
        reference = joblib.load(source)
    tree = _whole(source, tmp_path / "old.safetensors")
    assert np.array_equal(_array(tree["weights"]), reference["weights"])
    assert isinstance(tree["labels"], NumpyArray)
    assert tree["labels"].objects == list(reference["labels"])
    # joblib's own array wrapper is data to the scanner, like its NumpyArrayWrapper
    assert modelport.scan(source).verdict == "safe"


def test_a_config_that_points_back_at_its_parent_keeps_the_reference(tmp_path: Path) -> None:
    """Lightning's hyper_parameters: omegaconf nodes whose ``_parent`` is the node holding
    them, a cycle torch.load rebuilds by reference."""
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create({"encoder": {"layers": [8, 16]}, "lr": 0.1})
    source, target = tmp_path / "run.ckpt", tmp_path / "run.safetensors"
    torch.save({"state_dict": {"w": torch.ones(2, 2)}, "hyper_parameters": config}, source)
    reference = torch.load(source, weights_only=False)["hyper_parameters"]  # our own file
    assert reference.encoder._get_parent() is reference
    tree = _whole(source, target)
    config_record = tree["hyper_parameters"]
    assert config_record.class_path == "omegaconf.dictconfig.DictConfig"
    content = config_record.attributes()["_content"]
    encoder = content["encoder"]
    assert encoder.attributes()["_parent"] is config_record
    assert content["lr"].attributes()["_val"] == reference.lr


def test_a_torch_target_still_takes_plain_data_only(tmp_path: Path) -> None:
    source = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, source)
    with pytest.raises(ConversionError, match=r"args \(argparse\.Namespace object"):
        convert(source, tmp_path / "out.pt", ALL)
    for suffix in (".safetensors", ".npz", ".gguf"):  # the targets that store typed JSON
        tree = _whole(source, tmp_path / f"out{suffix}")
        assert tree["args"].class_path == "argparse.Namespace"
        assert tree["args"].attributes() == {"lr": 0.1}


def test_typed_json_round_trips_records_and_back_references() -> None:
    node: dict[str, Any] = {"width": 4}
    node["self"] = node
    loop: list[Any] = [1]
    loop.append(loop)
    record = ObjectRecord(GlobalRef("pkg.mod", "Model"), (1, "a"), {"k": 2}, {"x": node})
    record.list_items, record.dict_items = [loop], {"key": frozenset({1, 2})}
    array = NumpyArray(None, ["a", {"b": 1}], (2,), "O8")
    tree = {"model": record, "array": array, "cls": GlobalRef("builtins", "dict")}
    back = typed_json_decoding.decode(typed_json.encode(tree), {})
    model = back["model"]
    assert model.class_path == "pkg.mod.Model" and model.args == (1, "a")
    assert model.kwargs == {"k": 2} and model.dict_items == {"key": frozenset({1, 2})}
    assert model.state["x"]["self"] is model.state["x"]
    assert model.list_items[0][1] is model.list_items[0]
    assert back["array"].objects == ["a", {"b": 1}] and back["array"].shape == (2,)
    assert back["cls"].path == "builtins.dict"


@pytest.mark.parametrize(
    "root",
    [
        '{"$": "ref", "id": 1}',
        '{"$": "list", "id": 1, "items": [{"$": "ref", "id": 2}]}',
        '[{"$": "dict", "id": 1, "items": []}, {"$": "list", "id": 1, "items": []}]',
        '{"$": "object", "module": "os\\u0000", "name": "system"}',
        '{"$": "object", "module": "m", "name": "C", "code": "x"}',
        '{"$": "ndarray", "dtype": "O8", "shape": [-1], "items": []}',
        '{"$": "numpy.dtype", "spec": "f4", "byteorder": "?"}',
        '{"$": "dict", "items": [[{"$": "object", "module": "m", "name": "C"}, 1]]}',
    ],
)
def test_typed_json_records_decode_strictly(root: str) -> None:
    with pytest.raises(CorruptFileError):
        typed_json_decoding.decode(f'{{"version": 1, "root": {root}}}', {})


def _py2_int64(value: int) -> bytes:
    """``numpy.int64(value)`` as Python 2 pickled it: the scalar's bytes a ``str``."""
    raw = value.to_bytes(8, "little")
    return (
        b"cnumpy.core.multiarray\nscalar\n"
        + b"cnumpy\ndtype\n(U\x02i8K\x00K\x01tR"
        + b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"U\x08"
        + raw
        + b"\x86R"
    )


def test_python2_numpy_scalars_read_as_numpy_reads_them(tmp_path: Path) -> None:
    """gensim's old FastText pickles keyed ``hash2index`` by numpy ints whose bytes Python 2
    wrote as ``str``; numpy reads them with ``encoding="latin1"``."""
    data = b"\x80\x02}(" + _py2_int64(1050624) + b"X\x01\x00\x00\x00xu."
    source = tmp_path / "hash2index.pkl"
    source.write_bytes(data)
    reference = pickle.loads(data, encoding="latin1")  # only numpy's vocabulary: our own bytes
    assert list(reference) == [1050624] and type(next(iter(reference))).__name__ == "int64"
    with modelport.open(source) as model:
        assert model.tree == {1050624: "x"}
    with_tensor = tmp_path / "with_tensor.pkl"
    with_tensor.write_bytes(data[:-2] + b"X\x01\x00\x00\x00w" + _py2_array() + b"u.")
    tree = _whole(with_tensor, tmp_path / "out.safetensors")
    assert tree[1050624] == "x" and np.array_equal(_array(tree["w"]), np.arange(3.0))


def _py2_array() -> bytes:
    """``numpy.arange(3.0)`` as Python 2 pickled it (its data a ``str``)."""
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        + b"(K\x01K\x03\x85cnumpy\ndtype\n(U\x02f8K\x00K\x01tR(K\x03U\x01<NNNJ\xff\xff\xff\xff"
        + b"J\xff\xff\xff\xffK\x00tb\x89U\x18"
        + np.arange(3.0).tobytes()
        + b"tb"
    )
