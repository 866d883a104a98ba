"""modelport convert --to hf-bin: transformers folders of ``pytorch_model.bin`` (torch zip
archives, sharded with ``pytorch_model.bin.index.json``) for tools that still want them.

Oracles: transformers ``from_pretrained`` of the output (tiny BERT and GPT-2, random init,
every tensor compared bit for bit), ``torch.load(weights_only=True)`` on every shard, and
huggingface_hub's shard split with torch's storage ids (tied tensors share a shard)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import modelport
from modelport.errors import ConversionError
from tests.conftest import Cli, torch_digest

INDEX = "pytorch_model.bin.index.json"


def bert_model() -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(config).eval()


def gpt2_model() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path, Path]:
    root = tmp_path_factory.mktemp("bin")
    bert, gpt2 = bert_model(), gpt2_model()
    bert.save_pretrained(root / "bert")
    gpt2.save_pretrained(root / "gpt2")
    return bert, gpt2, root / "bert", root / "gpt2"


def assert_same_weights(loaded: Any, original: Any) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch_digest(got[name]) == torch_digest(tensor), name


def test_bert_to_one_pytorch_model_bin(saved: tuple[Any, Any, Path, Path], tmp_path: Path) -> None:
    from transformers import BertModel

    bert, _, folder, _ = saved
    out = tmp_path / "bert-bin"
    report = modelport.convert(folder, out, modelport.ConvertOptions(to="hf-bin"))
    assert report.verified
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert list(state) == [name for name, *_ in report.tensors]
    assert_same_weights(BertModel.from_pretrained(out), bert)


def test_sharded_like_transformers(saved: tuple[Any, Any, Path, Path], tmp_path: Path) -> None:
    """Shard names and index as transformers 4 wrote them, the cut huggingface_hub makes
    (tied tensors in the shard of the name they tie to, counted once), shared storage
    kept inside a shard; from_pretrained loads it."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import GPT2LMHeadModel

    _, gpt2, _, gpt2_folder = saved
    source = tmp_path / "gpt2.pt"
    torch.save(gpt2.state_dict(), source)  # transformer.wte.weight and lm_head.weight tied
    (tmp_path / "config.json").write_bytes((gpt2_folder / "config.json").read_bytes())
    out = tmp_path / "gpt2-bin"
    options = modelport.ConvertOptions(to="hf-bin", shard_size="20KB")
    report = modelport.convert(source, out, options)
    index = json.loads((out / INDEX).read_text())
    assert (out / INDEX).read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
    shards = sorted(set(index["weight_map"].values()))
    count = len(shards)
    assert count > 1
    assert shards == [f"pytorch_model-{i:05d}-of-{count:05d}.bin" for i in range(1, count + 1)]
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = torch.load(out / shard, weights_only=True)
        assert set(part) == {k for k, v in index["weight_map"].items() if v == shard}
        loaded.update(part)
    wte, head = loaded["transformer.wte.weight"], loaded["lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    state = gpt2.state_dict()
    split = split_torch_state_dict_into_shards(
        {name: state[name] for name, *_ in report.tensors},
        filename_pattern="pytorch_model{suffix}.bin",
        max_shard_size=20_000,
    )
    assert split.tensor_to_filename == index["weight_map"]
    assert index["metadata"]["total_size"] == split.metadata["total_size"]
    assert_same_weights(GPT2LMHeadModel.from_pretrained(out), gpt2)
    with modelport.open(out) as model:  # read back as one model, sizes as the index says
        assert model.warnings == []
        assert set(model.tensors) == set(state)


def test_bin_and_back(saved: tuple[Any, Any, Path, Path], tmp_path: Path) -> None:
    """pytorch_model.bin shards back to model.safetensors: the same model."""
    from transformers import BertModel

    bert, _, folder, _ = saved
    bins = tmp_path / "bins"
    modelport.convert(folder, bins, modelport.ConvertOptions(to="hf-bin", shard_size="30KB"))
    back = tmp_path / "back"
    modelport.convert(bins, back, modelport.ConvertOptions(to="hf"))
    assert sorted(p.name for p in back.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_weights(BertModel.from_pretrained(back), bert)


def test_bin_beside_safetensors_keeps_them(
    saved: tuple[Any, Any, Path, Path], tmp_path: Path, cli: Cli
) -> None:
    """Into a folder holding model.safetensors, --to hf-bin adds pytorch_model.bin beside it
    (another scheme: never removed), says that from_pretrained prefers the safetensors, and
    refuses a second run without --overwrite."""
    from transformers import BertModel

    bert, _, folder, _ = saved
    out = tmp_path / "repo"
    out.mkdir()
    (out / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    result = cli("convert", folder, out, "--to", "hf-bin", "--json")
    assert result.code == 0, result.err
    notes = result.json["notes"]
    assert any("which from_pretrained prefers" in note for note in notes)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "pytorch_model.bin",
    ]  # fmt: skip
    assert_same_weights(BertModel.from_pretrained(out, use_safetensors=False), bert)
    with pytest.raises(ConversionError, match=r"already holds pytorch_model\.bin"):
        modelport.convert(folder, out, modelport.ConvertOptions(to="hf-bin"))
