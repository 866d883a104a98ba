"""modelport convert --to hf: sharded Hugging Face directories that ``from_pretrained`` loads.

Oracles: transformers loading the output (no missing or unexpected keys, every tensor equal
bit for bit to the model that was saved), huggingface_hub's own shard split and size parser,
and safetensors reading each shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import modelport
from modelport.errors import ConversionError, UsageError
from modelport.formats import _hf_writer
from modelport.transfer import streaming
from tests.conftest import Cli, torch_digest

INDEX = "model.safetensors.index.json"
SMALL = "40KB"


def gpt2_model() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def bert_model() -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """The model, its save_pretrained folder, and torch.save(state_dict) beside a config."""
    model = gpt2_model()
    root = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(root / "saved")
    (root / "plain").mkdir()
    model.config.save_pretrained(root / "plain")
    torch.save(model.state_dict(), root / "plain" / "weights.pt")
    return model, root / "saved", root / "plain" / "weights.pt"


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """The model, its folder (tokenizer, model card, a training pickle, a subfolder), and a
    plain torch.save(state_dict) file with no config anywhere near it."""
    from transformers import BertTokenizer

    model = bert_model()
    root = tmp_path_factory.mktemp("bert")
    saved = root / "saved"
    model.save_pretrained(saved)
    vocab = root / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(saved)
    (saved / "README.md").write_text("# tiny bert\n")
    torch.save({"learning_rate": 1e-3}, saved / "training_args.bin")
    (saved / "onnx").mkdir()
    plain = root / "plain.bin"
    torch.save(model.state_dict(), plain)
    return model, saved, plain


def assert_same_weights(loaded: Any, original: Any) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch_digest(got[name]) == torch_digest(tensor), name


def read_index(out: Path) -> dict[str, Any]:
    index = json.loads((out / INDEX).read_text())
    assert isinstance(index, dict)
    return index


def check_index(out: Path, order: list[str], limit: int) -> dict[str, Any]:
    """The index as transformers writes it, shards cut as huggingface_hub cuts them, and
    every weight_map entry present in its shard."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open

    index = read_index(out)
    assert set(index) == {"metadata", "weight_map"}
    text = (out / INDEX).read_text()
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    count = len(shards)
    assert count > 1
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert not (out / "model.safetensors").exists()
    stored: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as handle:
            keys = set(handle.keys())
            assert keys == {k for k, v in weight_map.items() if v == shard}
            stored.update({k: handle.get_tensor(k) for k in keys})
    assert sorted(stored) == sorted(order)
    split = split_torch_state_dict_into_shards(
        {name: stored[name] for name in order},
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=limit,
    )
    assert split.tensor_to_filename == weight_map
    assert index["metadata"]["total_size"] == split.metadata["total_size"]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in stored.values())
    return index


def plan_order(report: modelport.ConvertReport) -> list[str]:
    return [name for name, *_ in report.tensors]


def test_gpt2_save_pretrained_to_shards(gpt2: tuple[Any, Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, saved, _ = gpt2
    out = tmp_path / "out"
    options = modelport.ConvertOptions(to="hf", shard_size=SMALL)
    report = modelport.convert(saved, out, options)
    assert report.verified and report.target_format == "hf-dir"
    assert report.aliases == {}  # save_pretrained already left lm_head.weight out
    check_index(out, plan_order(report), 40_000)
    assert {"config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert report.bytes_written == sum(p.stat().st_size for p in out.iterdir())
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_weights(loaded, model)
    inspected = modelport.inspect(out).to_json()
    assert inspected["format"] == "hf-dir" and not inspected["warnings"]
    assert modelport.scan(out).verdict == "safe"


def test_gpt2_state_dict_ties_recorded(gpt2: tuple[Any, Path, Path], tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, _, plain = gpt2
    out = tmp_path / "out"
    report = modelport.convert(plain, out, modelport.ConvertOptions(to="hf", shard_size=SMALL))
    alias = {"lm_head.weight": "transformer.wte.weight"}
    assert report.aliases == alias
    assert any("sidecars" in note and "config.json" in note for note in report.notes)
    index = check_index(out, plan_order(report), 40_000)
    assert "lm_head.weight" not in index["weight_map"]
    assert index["metadata"]["lm_head.weight"] == "transformer.wte.weight"
    for shard in set(index["weight_map"].values()):
        with safe_open(out / shard, "pt") as handle:
            assert handle.metadata()["lm_head.weight"] == "transformer.wte.weight"
            assert handle.metadata()["format"] == "pt"
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_weights(loaded, model)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    restored = modelport.load(out)  # modelport re-ties the alias from the metadata
    assert restored["lm_head.weight"].data_ptr() == restored["transformer.wte.weight"].data_ptr()
    assert not modelport.inspect(out).to_json()["warnings"]


def test_bert_with_tokenizer_and_sidecars(bert: tuple[Any, Path, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertModel

    model, saved, _ = bert
    out = tmp_path / "out"
    report = modelport.convert(saved, out, modelport.ConvertOptions(to="hf", shard_size=SMALL))
    check_index(out, plan_order(report), 40_000)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert "training_args.bin" not in names and "onnx" not in names  # a pickle; a subfolder
    assert any("onnx" in note for note in report.notes)
    loaded, info = BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_weights(loaded, model)
    text = "w1 w2 w3"
    assert (
        AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(saved)(text)["input_ids"]
    )


def test_bert_plain_file_without_config(bert: tuple[Any, Path, Path], tmp_path: Path) -> None:
    from transformers import BertModel

    model, _, plain = bert
    out = tmp_path / "out"
    report = modelport.convert(plain, out, modelport.ConvertOptions(to="hf", shard_size=SMALL))
    assert any("no config.json" in note for note in report.notes)
    check_index(out, plan_order(report), 40_000)
    loaded, info = BertModel.from_pretrained(out, config=model.config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_weights(loaded, model)


def test_single_shard_writes_model_safetensors(
    gpt2: tuple[Any, Path, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model, _, plain = gpt2
    out = tmp_path / "out"
    modelport.convert(plain, out, modelport.ConvertOptions(to="hf"))  # default 5GB
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_weights(loaded, model)


def test_cast_updates_config_dtype(gpt2: tuple[Any, Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, saved, _ = gpt2
    out = tmp_path / "out"
    options = modelport.ConvertOptions(to="hf", dtype="bfloat16", shard_size=SMALL)
    report = modelport.convert(saved, out, options)
    assert report.casts and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.bfloat16()), name


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {
        "a.weight": torch.randn(2500),  # 10 kB
        "big.weight": torch.randn(25000),  # 100 kB, over the limit
        "b.weight": torch.randn(2500),
        "c.weight": torch.randn(7500),  # 30 kB: with b it tips over 40 kB
        "d.count": torch.arange(3),
    }
    src = tmp_path / "w.safetensors"
    save_file(state, src)
    out = tmp_path / "out"
    report = modelport.convert(src, out, modelport.ConvertOptions(to="hf", shard_size=40_000))
    index = check_index(out, plan_order(report), 40_000)
    big = index["weight_map"]["big.weight"]
    assert [k for k, v in index["weight_map"].items() if v == big] == ["big.weight"]
    assert not any("config.json" in note and "sidecars" in note for note in report.notes)


def test_existing_directory_refused_then_overwritten(
    gpt2: tuple[Any, Path, Path], tmp_path: Path
) -> None:
    """--overwrite into a model repository replaces what modelport writes and the older files
    of the same weights scheme, and keeps everything else: .git, the README, notes, other
    formats' weights."""
    from transformers import AutoModelForCausalLM

    model, saved, _ = gpt2
    out = tmp_path / "out"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "README.md").write_text("# my model card\n")
    (out / "notes.txt").write_text("mine")
    (out / "pytorch_model.bin").write_bytes(b"older weights in another format")
    for stale in ("model-00001-of-00009.safetensors", "model-00009-of-00009.safetensors"):
        (out / stale).write_bytes(b"an older shard set")
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and "-of-" not in p.name}
    with pytest.raises(ConversionError, match="already holds model-00001-of-00009"):
        modelport.convert(saved, out, modelport.ConvertOptions(to="hf"))
    options = modelport.ConvertOptions(to="hf", shard_size=SMALL, overwrite=True)
    modelport.convert(saved, out, options)
    for name, data in kept.items():
        assert (out / name).read_bytes() == data, name
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert not (out / "model-00009-of-00009.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = {p.name for p in out.glob("model-*-of-*.safetensors")}
    assert shards == set(index["weight_map"].values())
    assert_same_weights(AutoModelForCausalLM.from_pretrained(out), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing aside left over


def test_a_folder_without_modelports_files_needs_no_overwrite(
    gpt2: tuple[Any, Path, Path], tmp_path: Path
) -> None:
    """A model repository that holds other files only: the weights are added beside them; a
    second run without --overwrite is refused before anything moves."""
    from transformers import AutoModelForCausalLM

    model, saved, _ = gpt2
    out = tmp_path / "repo"
    out.mkdir()
    (out / "README.md").write_text("# card\n")
    (out / "pytorch_model.bin").write_bytes(b"weights in another format")
    modelport.convert(saved, out, modelport.ConvertOptions(to="hf"))
    assert (out / "README.md").read_text() == "# card\n"
    assert (out / "pytorch_model.bin").read_bytes() == b"weights in another format"
    assert_same_weights(AutoModelForCausalLM.from_pretrained(out, use_safetensors=True), model)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConversionError, match=r"already holds model\.safetensors"):
        modelport.convert(saved, out, modelport.ConvertOptions(to="hf"))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_output_around_the_input_refused(gpt2: tuple[Any, Path, Path], tmp_path: Path) -> None:
    _, saved, _ = gpt2
    folder = tmp_path / "folder"
    shutil.copytree(saved, folder)
    options = modelport.ConvertOptions(to="hf", overwrite=True)
    with pytest.raises(ConversionError, match="delete the input"):
        modelport.convert(folder / "model.safetensors", folder, options)
    with pytest.raises(ConversionError, match="overwrite the input"):
        modelport.convert(folder, folder, options)
    assert (folder / "model.safetensors").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_nothing(
    gpt2: tuple[Any, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    from modelport.formats import safetensors_writer as st_format

    _, saved, _ = gpt2
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in parent.iterdir())
    real = streaming.write_tensor
    calls = []

    def interrupted(handle: Any, tensor: Any, **kwargs: Any) -> int:
        calls.append(tensor.name)
        if len(calls) == 12:  # midway through the second shard
            raise KeyboardInterrupt
        return real(handle, tensor, **kwargs)

    monkeypatch.setattr(st_format, "write_tensor", interrupted)
    options = modelport.ConvertOptions(to="hf", shard_size=SMALL, overwrite=existing)
    with pytest.raises(KeyboardInterrupt):
        modelport.convert(saved, out, options)
    assert sorted(p.name for p in parent.iterdir()) == before
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_shard_sizes_parse_like_huggingface_hub() -> None:
    from huggingface_hub.serialization._base import parse_size_to_int

    for text in ("5GB", "500MB", "50KB", "1TB", "1.5GB", "5gb"):
        assert _hf_writer.parse_size(text) == parse_size_to_int(text), text
    assert _hf_writer.parse_size(None) == 5 * 10**9
    assert _hf_writer.parse_size("2GiB") == 2 * 2**30
    assert _hf_writer.parse_size("1MiB") == 2**20
    assert _hf_writer.parse_size(4096) == _hf_writer.parse_size("4096") == 4096
    for bad in ("5XB", "GB", "-1GB", "0", "", "1e3KB"):
        with pytest.raises(UsageError):
            _hf_writer.parse_size(bad)


def test_shard_size_needs_hf_target(gpt2: tuple[Any, Path, Path], tmp_path: Path) -> None:
    _, saved, _ = gpt2
    with pytest.raises(UsageError, match="--to hf"):
        modelport.convert(
            saved, tmp_path / "x.safetensors", modelport.ConvertOptions(shard_size="1GB")
        )
    with pytest.raises(UsageError, match="shard size"):
        modelport.convert(saved, tmp_path / "x", modelport.ConvertOptions(to="hf", shard_size="x"))
    assert not list(tmp_path.iterdir())


def test_cli_to_hf(gpt2: tuple[Any, Path, Path], tmp_path: Path, cli: Cli) -> None:
    _, saved, _ = gpt2
    out = tmp_path / "out"
    result = cli("convert", saved, out, "--to", "hf", "--shard-size", SMALL, "--json")
    assert result.code == 0, result.err
    payload = result.json
    assert payload["target_format"] == "hf-dir" and payload["verified"] is True
    assert (out / INDEX).is_file()
    dry = tmp_path / "dry"
    assert cli("convert", saved, dry, "--to", "hf", "--dry-run").code == 0
    assert not dry.exists()
