"""Keras 3 variables under the names Keras gives them (``dense/kernel``), not ``vars/<i>``.

The oracle is Keras itself (heavy tests): a small functional model with nested layers is
saved as ``.keras`` and ``.weights.h5``, and every name and value modelport reads equals a
``Variable.path`` and its value. The default tests write the layout by h5py the way Keras 3's
``H5IOStore`` writes it (``layers/<snake_case class>[_<n>]/vars/<i>``, with and without the
``name`` attribute newer releases set), to cover config-driven and count-driven naming.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import modelport
from modelport.formats import _keras_names
from modelport.formats._hdf5_attrs import AttributeReader
from modelport.formats._hdf5_raw import find_superblock, read_superblock
from modelport.formats.hdf5 import file_reader


def _layer(class_name: str, name: str, **config: Any) -> dict[str, Any]:
    return {
        "module": "keras.layers",
        "class_name": class_name,
        "config": {"name": name, **config},
        "registered_name": None,
    }


def _write_weights(
    path: Path, groups: dict[str, tuple[str, list[tuple[int, ...]]]], named: bool
) -> None:
    """Keras 3's H5IOStore layout: a ``vars`` group per saveable (its ``name`` attribute when
    ``named``), datasets ``0``, ``1``, ... in it."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        root = f.create_group("vars")
        if named:
            root.attrs["name"] = "functional"
        for group, (name, shapes) in groups.items():
            variables = f.require_group(group).create_group("vars")
            if named:
                variables.attrs["name"] = name
            for index, shape in enumerate(shapes):
                variables[str(index)] = rng.standard_normal(shape).astype(np.float32)
        f.create_group("optimizer").create_group("vars")["0"] = np.array(3, np.int64)


GROUPS = {
    "layers/dense": ("dense", [(4, 3), (3,)]),
    "layers/batch_normalization": ("batch_normalization", [(3,), (3,), (3,)]),  # center=False
    "layers/dense_1": ("dense_1", [(3, 2)]),  # use_bias=False
    "layers/layer_normalization": ("layer_normalization", [(2,), (2,)]),
    "layers/multi_head_attention": ("multi_head_attention", []),
    "layers/multi_head_attention/query_dense": ("query", [(2, 1, 2), (1, 2)]),
    "layers/lstm": ("lstm", []),
    "layers/lstm/cell": ("lstm_cell", [(2, 4), (1, 4), (4,)]),
    "layers/mystery": ("mystery", [(2,)]),
}
CONFIG = {
    "module": "keras",
    "class_name": "Functional",
    "config": {
        "name": "functional",
        "layers": [
            _layer("InputLayer", "input_layer"),
            _layer("Dense", "dense", use_bias=True),
            _layer("BatchNormalization", "batch_normalization", center=False, scale=True),
            _layer("Dense", "dense_1", use_bias=False),
            _layer("LayerNormalization", "layer_normalization"),
            _layer("MultiHeadAttention", "multi_head_attention"),
            _layer("LSTM", "lstm"),
        ],
    },
}


def _write_keras(path: Path, weights: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        zf.writestr("config.json", json.dumps(CONFIG))
        zf.write(weights, "model.weights.h5")


@pytest.mark.parametrize("named", [True, False], ids=["name-attributes", "no-name-attributes"])
def test_keras_archive_names_follow_the_config(tmp_path: Path, named: bool) -> None:
    weights = tmp_path / "model.weights.h5"
    _write_weights(weights, GROUPS, named)
    path = tmp_path / "model.keras"
    _write_keras(path, weights)
    with modelport.open(path) as model:
        names = list(model.tensors)
        with h5py.File(weights, "r") as f:
            stored = f["layers/batch_normalization/vars/2"][()]
            assert np.array_equal(
                model.tensors["batch_normalization/moving_variance"].numpy(), stored
            )
    # without the name attributes, a held layer is named by the attribute holding it
    cell, query = ("lstm_cell", "query") if named else ("cell", "query_dense")
    assert names == [
        "batch_normalization/gamma",
        "batch_normalization/moving_mean",
        "batch_normalization/moving_variance",
        "dense/kernel",
        "dense/bias",
        "dense_1/kernel",
        "layer_normalization/gamma",
        "layer_normalization/beta",
        *(f"lstm/{cell}/{v}" for v in ("kernel", "recurrent_kernel", "bias")),
        f"multi_head_attention/{query}/kernel",
        f"multi_head_attention/{query}/bias",
        "layers/mystery/vars/0",  # a class the config does not list: left as stored
        "optimizer/vars/0",
    ]


def _weights_h5_names(path: Path) -> dict[str, str]:
    """The renames of a ``.weights.h5`` (no config): what the HDF5 reader's hook applies."""
    head = path.read_bytes()[:4096]
    offset = find_superblock(head, path.stat().st_size, path)
    assert offset is not None
    block = head[offset : offset + 128]
    guard = read_superblock(block, offset, path.stat().st_size, path).heap_guard(
        file_reader(path), path.stat().st_size
    )
    with h5py.File(path, "r") as handle:
        names: list[str] = []
        handle.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        return _keras_names.readable_names(AttributeReader(h5py, guard), handle, names)


def test_weights_file_without_config_names_what_the_count_decides(tmp_path: Path) -> None:
    path = tmp_path / "model.weights.h5"
    _write_weights(path, GROUPS, named=True)
    renamed = _weights_h5_names(path)
    assert renamed["layers/dense/vars/0"] == "dense/kernel"
    assert renamed["layers/dense/vars/1"] == "dense/bias"
    assert renamed["layers/dense_1/vars/0"] == "dense_1/kernel"
    assert renamed["layers/layer_normalization/vars/1"] == "layer_normalization/beta"
    assert renamed["layers/multi_head_attention/query_dense/vars/1"] == (
        "multi_head_attention/query/bias"
    )
    assert renamed["layers/lstm/cell/vars/1"] == "lstm/lstm_cell/recurrent_kernel"
    # three of BatchNormalization's four: which optional one is missing, only a config says
    assert not any(name.startswith("layers/batch_normalization/") for name in renamed)
    assert "optimizer/vars/0" not in renamed
    assert "layers/mystery/vars/0" not in renamed


def test_a_rename_onto_an_existing_name_is_not_made(tmp_path: Path) -> None:
    path = tmp_path / "model.weights.h5"
    _write_weights(path, {"layers/embedding": ("embedding", [(4, 2)])}, named=True)
    with h5py.File(path, "a") as f:
        f["embedding/embeddings"] = np.zeros(1, np.float32)
    renamed = _weights_h5_names(path)
    assert "layers/embedding/vars/0" not in renamed


# -- Keras itself as the oracle ------------------------------------------------------------


def _keras_model() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    layers = keras.layers
    tokens = keras.Input((6,), dtype="int32")
    x = layers.Embedding(20, 8)(tokens)
    x = layers.MultiHeadAttention(2, 4)(x, x)
    x = layers.LSTM(5)(x)
    block = keras.Sequential(
        [
            layers.Dense(4, name="inner_dense"),
            layers.BatchNormalization(center=False),
            layers.LayerNormalization(scale=False),
        ],
        name="block",
    )
    x = block(x)
    x = layers.Reshape((2, 2, 1))(x)
    x = layers.Conv2D(3, 1, name="conv")(x)
    x = layers.SeparableConv2D(2, 1)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(2, use_bias=False)(x)
    return keras.Model(tokens, x)


@pytest.mark.heavy
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TensorFlow's own, on numpy 2
def test_names_and_values_equal_keras_variable_paths(tmp_path: Path) -> None:
    model = _keras_model()
    expected = {v.path: np.asarray(v.numpy()) for v in model.weights}
    archive = tmp_path / "model.keras"
    model.save(archive)
    with modelport.open(archive) as opened:
        assert sorted(opened.tensors) == sorted(expected)
        for name, value in expected.items():
            assert np.array_equal(opened.tensors[name].numpy(), value), name
    weights = tmp_path / "model.weights.h5"
    model.save_weights(weights)
    with h5py.File(weights, "r") as f:
        stored = {n: np.asarray(f[n][()]) for n in _weights_h5_names(weights)}
    renamed = _weights_h5_names(weights)
    # without a config, BatchNormalization(center=False) (three of four variables) and
    # LayerNormalization(scale=False) (one of two) are ambiguous: left as stored
    ambiguous = ("block/batch_normalization/", "block/layer_normalization/")
    assert set(renamed.values()) == {n for n in expected if not n.startswith(ambiguous)}
    for old, new in renamed.items():
        assert np.array_equal(stored[old], expected[new]), new
