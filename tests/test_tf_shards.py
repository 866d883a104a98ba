"""Sharded ``tf_model.h5`` folders (``tf_model-00001-of-00002.h5`` + ``tf_model.h5.index.json``).

The folder is written with h5py exactly as transformers 4.x's ``TFPreTrainedModel.
save_pretrained`` wrote a sharded TF checkpoint (``tf_shard_checkpoint`` and the h5py loop
after it): variables split in ``model.weights`` order; each shard holds its variables sorted
by name at their name less the model scope (``bert/embeddings/...:0``), with a root
``layer_names`` attribute listing those paths (a list of ``bytes``: variable-length ASCII
strings); the index is ``json.dumps({"metadata": {"total_size"}, "weight_map": {full
variable name: shard}}, indent=2, sort_keys=True) + "\n"``. benchmarks/check_tf_h5_real.py
compares these folders with ones transformers 4.51 writes. The oracle is torch: the converted
output loads into the PyTorch model with ``load_state_dict(strict=True)``, values equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import transformers

import modelport
from modelport.torch_models import tf_names
from tests.conftest import Cli
from tests.test_tf_h5_names import (
    BERT_LAYOUT,
    GPT2_LAYOUT,
    assert_loads_strictly,
    bert,
    gpt2,
    tf_variables,
)


def write_tf_shards(folder: Path, variables: dict[str, np.ndarray], max_bytes: int) -> list[str]:
    blocks: list[list[str]] = [[]]
    size = 0
    for name, value in variables.items():
        if size + value.nbytes > max_bytes and blocks[-1]:
            blocks.append([])
            size = 0
        blocks[-1].append(name)
        size += value.nbytes
    weight_map: dict[str, str] = {}
    files = []
    for index, block in enumerate(blocks):
        shard = f"tf_model-{index + 1:05d}-of-{len(blocks):05d}.h5"
        files.append(shard)
        with h5py.File(folder / shard, "w") as f:
            layers = []
            for name in sorted(block):
                whole = "model." in name or "/" not in name
                stored = name if whole else name.split("/", 1)[1]
                dataset = f.create_dataset(stored, variables[name].shape, variables[name].dtype)
                dataset[:] = variables[name]
                layers.append(stored.encode("utf8"))
            f.attrs["layer_names"] = layers
            weight_map.update({name: shard for name in block})
    total = sum(v.nbytes for v in variables.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (folder / "tf_model.h5.index.json").write_text(text, encoding="utf-8")
    return files


def sharded_folder(tmp_path: Path, model: Any, layout: dict[str, Any]) -> tuple[Path, list[str]]:
    folder = tmp_path / "tf"
    folder.mkdir()
    model.config.save_pretrained(folder)
    return folder, write_tf_shards(folder, tf_variables(model, **layout), max_bytes=8_000)


def test_the_shards_read_as_one_model(tmp_path: Path) -> None:
    model = bert()
    folder, files = sharded_folder(tmp_path, model, BERT_LAYOUT)
    assert len(files) >= 3
    variables = tf_variables(model, **BERT_LAYOUT)
    with modelport.open(folder) as opened:
        assert opened.format.value == "hf-dir"
        assert opened.details["files"] == files
        assert opened.warnings == []
        assert len(opened.tensors) == len(variables)
        for name, value in variables.items():
            stored = opened.tensors[name.split("/", 1)[1]]
            assert np.array_equal(stored.numpy(), value), name


def test_a_sharded_folder_is_what_from_tf_maps(tmp_path: Path) -> None:
    folder, _ = sharded_folder(tmp_path, bert(), BERT_LAYOUT)
    assert tf_names.tf_weights_file(folder) == folder
    (folder / "pytorch_model.bin").write_bytes(b"")
    assert tf_names.tf_weights_file(folder) is None  # other weights: the user chooses


@pytest.mark.parametrize(("build", "layout"), [(bert, BERT_LAYOUT), (gpt2, GPT2_LAYOUT)])
def test_sharded_tf_model_converts_to_pytorch_names(
    build: Any, layout: dict[str, Any], tmp_path: Path, cli: Cli
) -> None:
    model = build()
    folder, _ = sharded_folder(tmp_path, model, layout)
    out = tmp_path / "model.safetensors"
    result = cli("convert", folder, out)
    assert result.code == 0, result.err
    assert "renamed" in result.out
    assert_loads_strictly(model, out)


def test_sharded_tf_model_loads_with_from_pretrained(tmp_path: Path, cli: Cli) -> None:
    model = bert()
    folder, _ = sharded_folder(tmp_path, model, BERT_LAYOUT)
    result = cli("convert", folder, tmp_path / "out", "--to", "hf")
    assert result.code == 0, result.err
    loaded, info = transformers.BertModel.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)
