"""Hugging Face model directories; the oracle is safetensors.safe_open / torch.load on the
files transformers wrote, and the model's own state_dict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file, save_model

import modelport
from modelport.errors import CorruptFileError, ModelportError
from tests.conftest import torch_digest
from tests.mutation import assert_typed_error_or_whole

TINY = {"vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0}


@pytest.fixture(scope="module")
def gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **TINY)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def bert() -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        vocab_size=100,
        pad_token_id=0,
    )
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def gpt2_dirs(gpt2: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    gpt2.save_pretrained(root / "sharded", max_shard_size="50KB")
    gpt2.save_pretrained(root / "single")
    return {"sharded": root / "sharded", "single": root / "single"}


def oracle(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file, read by the safetensors library."""
    found: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                found[name] = handle.get_tensor(name)
    return found


def check(directory: Path, expected: dict[str, torch.Tensor]) -> modelport.ModelFile:
    model = modelport.open(directory)
    assert model.format == "hf-dir"
    assert sorted(model.tensors) == sorted(expected)
    for name, tensor in expected.items():
        ref = model.tensors[name]
        assert ref.dtype == str(tensor.dtype).removeprefix("torch.")
        assert ref.shape == tuple(tensor.shape)
        assert torch_digest(ref.torch()) == torch_digest(tensor), name
    return model


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_gpt2_matches_safetensors_and_state_dict(
    gpt2: Any, gpt2_dirs: dict[str, Path], layout: str
) -> None:
    directory = gpt2_dirs[layout]
    expected = oracle(directory)
    with check(directory, expected) as model:
        state = gpt2.state_dict()
        assert "lm_head.weight" in state and "lm_head.weight" not in model.tensors  # tied
        for name, ref in model.tensors.items():
            assert torch.equal(ref.torch(), state[name])
        assert model.details["model_type"] == "gpt2"
        assert model.details["architectures"] == ["GPT2LMHeadModel"]
        assert not model.warnings
        if layout == "sharded":
            index = json.loads((directory / "model.safetensors.index.json").read_text())
            assert list(model.tensors) == list(index["weight_map"])
            assert len(model.details["files"]) > 1
            assert model.metadata["total_size"] == sum(t.nbytes for t in model.tensors.values())
        else:
            assert model.details["files"] == ["model.safetensors"]
            assert model.metadata == {"format": "pt"}
        for ref in model.tensors.values():  # every tensor a byte range of its shard
            assert ref.byte_range() is not None


def test_inspect_json(gpt2_dirs: dict[str, Path]) -> None:
    report = modelport.inspect(gpt2_dirs["sharded"]).to_json()
    assert report["format"] == "hf-dir"
    tensors = {t["name"]: t for t in report["tensors"]}
    assert tensors["transformer.wte.weight"] == {
        "name": "transformer.wte.weight",
        "dtype": "float32",
        "shape": [100, 32],
        "nbytes": 12800,
    }
    assert report["parameters"] == report["metadata"]["total_parameters"]
    assert report["details"]["index"] == "model.safetensors.index.json"
    assert report["size_bytes"] > report["metadata"]["total_size"]


def test_bert_sharded(bert: Any, tmp_path: Path) -> None:
    bert.save_pretrained(tmp_path / "bert", max_shard_size="50KB")
    with check(tmp_path / "bert", oracle(tmp_path / "bert")) as model:
        assert model.details["model_type"] == "bert"
        state = bert.state_dict()
        assert set(model.tensors) <= set(state)
    loaded = modelport.load(tmp_path / "bert")
    assert torch.equal(
        loaded["embeddings.word_embeddings.weight"], state["embeddings.word_embeddings.weight"]
    )


def bin_dir(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """A sharded pytorch_model.bin directory written by hand, as older transformers did."""
    directory.mkdir()
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map: dict[str, str] = {}
    for i, part in enumerate(halves, start=1):
        file = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps({"model_type": "toy", "dtype": "float32"}))


def toy_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return {
        "embed.weight": torch.randn(10, 4),
        "layer.weight": torch.randn(4, 4, dtype=torch.bfloat16),
        "layer.bias": torch.randn(4, dtype=torch.float16),
        "counts": torch.arange(3, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "scale": torch.tensor(0.5),
        "empty": torch.zeros(0, 4),
    }


def test_bin_shards(tmp_path: Path) -> None:
    state = toy_state()
    bin_dir(tmp_path / "bin", state)
    expected: dict[str, torch.Tensor] = {}
    for file in sorted((tmp_path / "bin").glob("*.bin")):
        expected.update(torch.load(file, weights_only=True))
    with check(tmp_path / "bin", expected) as model:
        assert list(model.tensors) == list(state)
        assert model.details["shard_formats"] == ["torch-zip"]
        assert model.metadata["total_size"] == sum(t.nbytes for t in model.tensors.values())
        assert not model.warnings


def test_prefers_safetensors_over_bin(tmp_path: Path) -> None:
    state = toy_state()
    bin_dir(tmp_path / "both", state)
    save_file({"only.weight": torch.ones(2)}, tmp_path / "both" / "model.safetensors")
    with modelport.open(tmp_path / "both") as model:
        assert list(model.tensors) == ["only.weight"]
        assert model.details["ignored_weights"] == ["pytorch_model.bin.index.json"]


def test_index_without_config(tmp_path: Path) -> None:
    directory = tmp_path / "noconfig"
    directory.mkdir()
    save_file({"a": torch.ones(2)}, directory / "part-1.safetensors")
    save_file({"b": torch.zeros(3, dtype=torch.int8)}, directory / "part-2.safetensors")
    index = {"weight_map": {"b": "part-2.safetensors", "a": "part-1.safetensors"}}
    (directory / "weights.safetensors.index.json").write_text(json.dumps(index))
    with check(directory, oracle(directory)) as model:
        assert list(model.tensors) == ["b", "a"]  # weight_map order
        assert model.metadata == {}


def test_aliases_from_save_model(gpt2: Any, tmp_path: Path) -> None:
    directory = tmp_path / "aliased"
    directory.mkdir()
    save_model(gpt2, str(directory / "model.safetensors"))
    gpt2.config.to_json_file(directory / "config.json")
    with modelport.open(directory) as model:
        with safe_open(directory / "model.safetensors", "pt") as handle:
            recorded = {k: v for k, v in handle.metadata().items() if k != "format"}
        assert len(recorded) == 1  # save_model drops one of the tied pair and records it
        assert model.details["aliases"] == recorded
        removed, kept = next(iter(recorded.items()))
        assert {removed, kept} == {"lm_head.weight", "transformer.wte.weight"}
        assert model.tensors[removed] is model.tensors[kept]  # restored as shared on read
        assert removed not in model.metadata


def test_mismatched_total_size_and_dtype(tmp_path: Path) -> None:
    bin_dir(tmp_path / "bin", toy_state())
    index_path = tmp_path / "bin" / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 4
    index_path.write_text(json.dumps(index))
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"torch_dtype": "float64"}))
    with modelport.open(tmp_path / "bin") as model:
        assert any("total_size" in w for w in model.warnings)
        assert any("float64" in w for w in model.warnings)


def sharded_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target / "model.safetensors.index.json"


def edit_index(index_path: Path, change: Any) -> None:
    index = json.loads(index_path.read_text())
    change(index["weight_map"])
    index_path.write_text(json.dumps(index))


def test_weight_map_outside_the_directory(gpt2_dirs: dict[str, Path], tmp_path: Path) -> None:
    index_path = sharded_copy(gpt2_dirs["sharded"], tmp_path / "inner" / "model")
    shutil.copy(
        gpt2_dirs["single"] / "model.safetensors", tmp_path / "inner" / "outside.safetensors"
    )

    def escape(weight_map: dict[str, str]) -> None:
        weight_map["transformer.wte.weight"] = "../outside.safetensors"

    edit_index(index_path, escape)
    with pytest.raises(CorruptFileError, match="outside the directory"):
        modelport.open(index_path.parent)

    def absolute(weight_map: dict[str, str]) -> None:
        weight_map["transformer.wte.weight"] = str(tmp_path / "inner" / "outside.safetensors")

    edit_index(index_path, absolute)
    with pytest.raises(CorruptFileError, match="outside the directory"):
        modelport.open(index_path.parent)
    link = index_path.parent / "link.safetensors"
    link.symlink_to(tmp_path / "inner" / "outside.safetensors")

    def through_link(weight_map: dict[str, str]) -> None:
        weight_map["transformer.wte.weight"] = "link.safetensors"

    edit_index(index_path, through_link)
    with pytest.raises(CorruptFileError, match="outside the directory"):
        modelport.open(index_path.parent)

    def nul_byte(weight_map: dict[str, str]) -> None:
        weight_map["transformer.wte.weight"] = "model-00001\x00.safetensors"

    edit_index(index_path, nul_byte)
    with pytest.raises(ValueError, match="null byte"):
        Path("model-00001\x00.safetensors").stat()  # what os calls make of such a name
    with pytest.raises(CorruptFileError, match="NUL byte"):
        modelport.open(index_path.parent)


def test_index_lies(gpt2_dirs: dict[str, Path], tmp_path: Path) -> None:
    index_path = sharded_copy(gpt2_dirs["sharded"], tmp_path / "model")
    original = index_path.read_text()

    def phantom(weight_map: dict[str, str]) -> None:
        weight_map["not.a.tensor"] = next(iter(weight_map.values()))

    edit_index(index_path, phantom)
    with pytest.raises(CorruptFileError, match="does not hold"):
        modelport.open(index_path.parent)
    index_path.write_text(original)

    def missing_file(weight_map: dict[str, str]) -> None:
        weight_map["transformer.wte.weight"] = "model-00009-of-00009.safetensors"

    edit_index(index_path, missing_file)
    with pytest.raises(CorruptFileError, match="missing"):
        modelport.open(index_path.parent)
    index_path.write_text(original)
    shards = sorted(index_path.parent.glob("model-*.safetensors"))
    with safe_open(shards[0], "pt") as handle:
        name = next(iter(handle.keys()))
        duplicate = {name: handle.get_tensor(name)}
    with safe_open(shards[1], "pt") as handle:
        duplicate |= {n: handle.get_tensor(n) for n in handle.keys()}  # noqa: SIM118
    save_file(duplicate, shards[1])
    with pytest.raises(CorruptFileError, match="stored in both"):
        modelport.open(index_path.parent)


@pytest.mark.parametrize(
    "text", ["{", "[]", '{"weight_map": []}', '{"weight_map": {"a": 3}}', "\xff\xfe"]
)
def test_malformed_index(tmp_path: Path, text: str) -> None:
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / "model.safetensors.index.json").write_text(text, errors="surrogateescape")
    (directory / "config.json").write_text("{}")
    with pytest.raises(ModelportError):
        modelport.open(directory)


def test_truncated_shard(gpt2_dirs: dict[str, Path], tmp_path: Path) -> None:
    index_path = sharded_copy(gpt2_dirs["sharded"], tmp_path / "model")
    shard = sorted(index_path.parent.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    for cut in (4, 100, len(data) - 1):
        shard.write_bytes(data[:cut])
        with pytest.raises(ModelportError):
            modelport.open(index_path.parent)


def test_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelportError):
        modelport.open(tmp_path)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(["index", "shard", "config"]),
    cut=st.integers(min_value=0, max_value=5000),
    flips=st.lists(st.tuples(st.integers(0, 50_000), st.integers(0, 255)), max_size=4),
)
def test_mutations_only_raise_modelport_errors(
    gpt2_dirs: dict[str, Path], tmp_path: Path, which: str, cut: int, flips: list[tuple[int, int]]
) -> None:
    directory = tmp_path / "mutated"
    if not directory.exists():
        shutil.copytree(gpt2_dirs["sharded"], directory)
    names = {
        "index": "model.safetensors.index.json",
        "shard": "model-00002-of-00003.safetensors",
        "config": "config.json",
    }
    target = directory / names[which]
    original = (gpt2_dirs["sharded"] / names[which]).read_bytes()
    data = bytearray(original)
    for position, value in flips:
        data[position % len(data)] = value
    target.write_bytes(bytes(data[: max(1, len(data) - cut % len(data))]))
    try:
        assert_typed_error_or_whole(directory)
    finally:  # the next example starts from the undamaged directory
        target.write_bytes(original)
