"""transformers 4.x ``tf_model.h5`` files converted to the PyTorch names and layouts.

The files are written with h5py exactly as transformers 4.x TF models saved them (Keras 2
``save_weights``): root ``layer_names`` / ``backend`` / ``keras_version`` and every
``weight_names`` as h5py stores a list of ``bytes`` (variable-length ASCII strings), one group
per top layer listing its variables in creation order, datasets at ``<layer>/<model scope>/
<variable>:0``, and the empty ``top_level_model_weights`` group newer Keras 2 releases add.
The weights are a tiny torch model's state_dict put into TF's names and layouts.
benchmarks/check_tf_h5_real.py compares these files with ones transformers 4.51 and tf-keras
write, structure and attribute types included. The oracle is torch: the output loads with
``load_state_dict(strict=True)`` and every value equals the model's own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from modelport.conversion.options import ConvertOptions, Relayout
from modelport.conversion.selecting import relaid
from modelport.errors import ConversionError
from modelport.tensors import Storage, TensorRef
from modelport.torch_models import tf_names
from tests.conftest import Cli

TINY_BERT = {
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 24,
    "max_position_embeddings": 32,
}
TINY_GPT2 = {"vocab_size": 50, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32}


def tf_name_of(model: nn.Module, name: str, weight_leaves: dict[str, str]) -> tuple[str, bool]:
    """The TF variable name (without scope) transformers' TF twin gives ``name``, and whether
    its value is the transposed PyTorch one (Dense kernels)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    transpose = False
    if isinstance(module, nn.LayerNorm):
        leaf = {"weight": "gamma", "bias": "beta"}[leaf]
    elif isinstance(module, nn.Embedding):
        leaf = weight_leaves.get(owner.rpartition(".")[2], "embeddings")
    elif isinstance(module, nn.Linear) and leaf == "weight":
        leaf, transpose = "kernel", True
    path = re.sub(r"/(\d+)(?=/|$)", r"_._\1", owner.replace(".", "/"))
    return f"{path}/{leaf}", transpose


def tf_variables(
    model: nn.Module,
    *,
    scope: str,
    layer: str,
    weight_leaves: dict[str, str],
    created_first: tuple[str, ...] = (),
) -> dict[str, np.ndarray[Any, Any]]:
    """``model``'s weights under their TF variable names (``tf_bert_model/bert/...:0``), in
    the order the TF twin creates them (``created_first``, then the state_dict's), laid out
    as it holds them: Dense kernels transposed, Conv1D (GPT-2) weights as they are and its
    biases (1, n)."""
    state = model.state_dict()
    order = [*created_first, *(name for name in state if name not in created_first)]
    variables: dict[str, np.ndarray[Any, Any]] = {}
    for name in order:
        tf_name, transpose = tf_name_of(model, name, weight_leaves)
        value = state[name].numpy()
        if transpose:
            value = value.T
        elif isinstance(model.get_submodule(name.rpartition(".")[0]), transformers.Conv1D):
            value = value.reshape(1, -1) if value.ndim == 1 else value
        variables[f"{scope}/{layer}/{tf_name}:0"] = np.ascontiguousarray(value)
    return variables


def write_tf_h5(
    path: Path,
    model: nn.Module,
    *,
    extra: dict[str, dict[str, np.ndarray[Any, Any]]] | None = None,
    **layout: Any,
) -> None:
    """``model``'s weights as a transformers 4.x TF model's ``save_weights`` wrote them;
    ``extra`` adds layer groups (group name -> variable name -> value). Keras passes lists
    of ``bytes`` to ``attrs``, which h5py stores as variable-length ASCII strings (an empty
    list as an empty float64 array)."""
    groups = {layout["layer"]: tf_variables(model, **layout), **(extra or {})}
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [name.encode("utf8") for name in groups]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        for group_name, variables in sorted(groups.items()):
            group = f.create_group(group_name)
            group.attrs["weight_names"] = [name.encode("utf8") for name in variables]
            for name, value in variables.items():
                dataset = group.create_dataset(name, value.shape, dtype=value.dtype)
                dataset[...] = value
        f.create_group("top_level_model_weights").attrs["weight_names"] = []


def tf_folder(tmp_path: Path, model: Any, **layout: Any) -> Path:
    folder = tmp_path / "tf"
    folder.mkdir()
    model.config.save_pretrained(folder)
    write_tf_h5(folder / "tf_model.h5", model, **layout)
    return folder


def bert() -> Any:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**TINY_BERT)).eval()


def gpt2() -> Any:
    torch.manual_seed(0)
    return transformers.GPT2Model(transformers.GPT2Config(**TINY_GPT2)).eval()


BERT_LAYOUT = {
    "scope": "tf_bert_model",
    "layer": "bert",
    "weight_leaves": {"word_embeddings": "weight"},
    "created_first": (
        "embeddings.word_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
    ),
}
GPT2_LAYOUT = {"scope": "tfgpt2_model", "layer": "transformer", "weight_leaves": {}}


def assert_loads_strictly(model: Any, weights: Path) -> None:
    state = load_file(weights)
    fresh = type(model)(model.config)
    fresh.load_state_dict(state, strict=True)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


@pytest.mark.parametrize(("build", "layout"), [(bert, BERT_LAYOUT), (gpt2, GPT2_LAYOUT)])
def test_tf_model_h5_converts_to_pytorch_names(
    build: Any, layout: dict[str, Any], tmp_path: Path, cli: Cli
) -> None:
    model = build()
    folder = tf_folder(tmp_path, model, **layout)
    out = tmp_path / "model.safetensors"
    result = cli("convert", folder, out)
    assert result.code == 0, result.err
    assert "renamed" in result.out
    assert_loads_strictly(model, out)


def test_from_pretrained_loads_the_hf_folder(tmp_path: Path, cli: Cli) -> None:
    model = bert()
    folder = tf_folder(tmp_path, model, **BERT_LAYOUT)
    result = cli("convert", folder / "tf_model.h5", tmp_path / "out", "--to", "hf")
    assert result.code == 0, result.err
    loaded, info = transformers.BertModel.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_unplaced_tf_weights_are_refused_then_excluded(tmp_path: Path, cli: Cli) -> None:
    model = bert()
    head = "nsp___cls/tf_bert_for_pre_training/nsp___cls/seq_relationship/kernel:0"
    extra = {"nsp___cls": {head: np.zeros((16, 2), np.float32)}}
    folder = tf_folder(tmp_path, model, **BERT_LAYOUT, extra=extra)
    with pytest.raises(ConversionError, match=r"no place in BertModel: .*seq_relationship"):
        tf_names.pytorch_layout(folder / "tf_model.h5")
    out = tmp_path / "model.safetensors"
    result = cli("convert", folder, out, "--exclude", "nsp___cls/*")
    assert result.code == 0, result.err
    assert_loads_strictly(model, out)


def test_missing_and_misshapen_weights_are_listed() -> None:
    target = tf_names.TorchTarget(
        "Toy", {"dense.weight": (3, 2), "dense.bias": (3,), "norm.weight": (3,)}, "", ()
    )
    with pytest.raises(ConversionError) as caught:
        tf_names.relayouts({"l/toy/dense/kernel:0": (3, 2), "l/toy/dense/bias:0": (3,)}, target)
    assert "dense/kernel:0 [3, 2] -> dense.weight [3, 2]" in str(caught.value)
    assert "Toy weights no TensorFlow weight fills: dense.weight, norm.weight" in str(caught.value)


def test_weights_the_user_leaves_out_may_stay_unfilled() -> None:
    target = tf_names.TorchTarget("Toy", {"dense.weight": (3, 2), "norm.weight": (3,)}, "", ())
    tf_shapes = {"l/toy/dense/kernel:0": (2, 3)}
    with pytest.raises(ConversionError, match=r"no TensorFlow weight fills: norm\.weight"):
        tf_names.relayouts(tf_shapes, target)
    moves = tf_names.relayouts(tf_shapes, target, left_out=["l/toy/norm/gamma:0"])
    assert moves == (Relayout("l/toy/dense/kernel:0", "dense.weight", (1, 0), None),)


def test_keep_tf_names_with_from_tf_off(tmp_path: Path, cli: Cli) -> None:
    folder = tf_folder(tmp_path, bert(), **BERT_LAYOUT)
    out = tmp_path / "model.safetensors"
    result = cli("convert", folder / "tf_model.h5", out, "--from-tf", "off")
    assert result.code == 0, result.err
    assert "bert/tf_bert_model/bert/pooler/dense/kernel:0" in load_file(out)


def test_relaid_tensor_is_a_strided_view() -> None:
    values = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    storage = Storage(None, 0, values.nbytes, reader=lambda: values.reshape(-1).view(np.uint8))
    source = TensorRef("float32", (1, 3, 4), storage)
    moves = (Relayout("k", "w", (2, 1, 0), (4, 3)),)
    placed, notes = relaid({"k": source, "other": source}, moves)
    assert np.array_equal(placed["w"].numpy(), values[0].T)
    assert placed["w"].strides == (1, 4)
    assert "left out 1 tensors" in notes[1]
    assert ConvertOptions(name_map=moves).name_map == moves
