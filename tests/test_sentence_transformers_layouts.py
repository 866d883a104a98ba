"""sentence-transformers folders: ``modules.json`` and a folder per module read as one model
(the Transformer module at the top keeps its names, the others are ``<folder>/<name>``), and
``convert --to hf`` / ``--to hf-bin`` keep the layout ``SentenceTransformer(path)`` loads.

Oracles: sentence-transformers itself (a tiny random BertModel from transformers, then
Pooling, Dense and Normalize, saved with ``model.save``, safetensors and
``safe_serialization=False``; every output loaded with ``SentenceTransformer(out)`` and its
``encode()`` compared with the original's bit for bit), safetensors' ``load_file`` and
``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import modelport
from modelport.errors import UsageError
from tests.conftest import digest, torch_digest

SENTENCES = ["hello world", "a b w3 w7", "w1"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "a", "b"] + [
    f"w{i}" for i in range(24)
]
MODULE_FOLDERS = ["1_Pooling", "2_Dense", "3_Normalize"]
heavy = pytest.mark.heavy  # importing sentence-transformers takes seconds


@dataclass(frozen=True)
class Built:
    root: Path
    encoded: np.ndarray[Any, Any]  # the original model's encode(SENTENCES)

    def path(self, name: str) -> Path:
        return self.root / name


def tiny_sentence_transformer(root: Path) -> Any:
    """A tiny random BERT as the Transformer module, mean Pooling, a Dense layer with Tanh,
    Normalize: the layout of all-MiniLM-style models with a projection."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    bert = root / "bert"
    BertModel(
        BertConfig(
            vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32,
        )
    ).save_pretrained(bert)  # fmt: skip
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(bert)
    modules = [
        models.Transformer(str(bert)),
        models.Pooling(16, "mean"),
        models.Dense(16, 8, activation_function=torch.nn.Tanh()),
        models.Normalize(),
    ]
    return SentenceTransformer(modules=modules, device="cpu")


def encode(path: Path) -> np.ndarray[Any, Any]:
    from sentence_transformers import SentenceTransformer

    encoded = SentenceTransformer(str(path), device="cpu").encode(SENTENCES)
    assert isinstance(encoded, np.ndarray)
    return encoded


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("sentence-transformers")
    model = tiny_sentence_transformer(root)
    model.save(str(root / "st"))
    model.save(str(root / "st-bin"), safe_serialization=False)
    encoded = model.encode(SENTENCES)
    assert isinstance(encoded, np.ndarray)
    return Built(root, encoded)


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """What the folder's own weight file holds, by safetensors or torch.load."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    loaded = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert isinstance(loaded, dict)
    return loaded


def oracle(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's tensors under the names modelport gives them: the top module's
    bare, the Dense module's under ``2_Dense/``."""
    dense = {f"2_Dense/{k}": v for k, v in weights_of(path / "2_Dense").items()}
    return {**weights_of(path), **dense}


def assert_same_tensors(mine: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    assert set(mine) == set(want)
    for name, tensor in want.items():
        assert digest(mine[name].numpy()) == torch_digest(tensor), name


def assert_same_torch(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch_digest(got[name]) == torch_digest(tensor), name


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- reading -------------------------------------------------------------------------------


@heavy
@pytest.mark.parametrize("saved", ["st", "st-bin"])
def test_every_module_reads_as_one_model(built: Built, saved: str) -> None:
    """The Transformer module's tensors and the Dense module's (``2_Dense/linear.weight``),
    bit for bit what safetensors and torch.load give; every module listed with its type."""
    path = built.path(saved)
    want = oracle(path)
    assert {"2_Dense/linear.weight", "2_Dense/linear.bias"} <= set(want)
    with modelport.open(path) as model:
        assert model.format.value == "hf-dir"
        assert_same_tensors(dict(model.tensors), want)
        details = model.details
    assert details["layout"] == "sentence-transformers"
    assert details["model_type"] == "SentenceTransformer"
    listed = {m["path"]: m for m in details["module_folders"]}
    assert list(listed) == ["", *MODULE_FOLDERS]
    assert listed["2_Dense"]["tensors"] == 2
    dense_file = "model.safetensors" if saved == "st" else "pytorch_model.bin"
    assert listed["2_Dense"]["files"] == [dense_file]
    assert listed["1_Pooling"]["files"] == ["config.json"]
    assert listed[""]["type"].endswith(".Transformer")
    report = modelport.inspect(path)
    assert report.parameters == sum(t.numel() for t in want.values())
    assert not report.warnings


@heavy
def test_weights_modules_json_does_not_name_are_set_aside(built: Built, tmp_path: Path) -> None:
    """An export's subfolder (``onnx/`` on the Hub) is no module: a warning, not tensors."""
    path = tmp_path / "st"
    shutil.copytree(built.path("st"), path)
    shutil.copytree(path / "2_Dense", path / "extra")
    with modelport.open(path) as model:
        assert not any(n.startswith("extra/") for n in model.tensors)
        assert any(
            "extra/ holds weights that modules.json does not name" in w for w in model.warnings
        )


# -- converting ----------------------------------------------------------------------------


@heavy
@pytest.mark.parametrize("saved", ["st", "st-bin"])
@pytest.mark.parametrize("to", ["hf", "hf-bin"])
def test_convert_keeps_the_modules_and_loads(
    built: Built, tmp_path: Path, saved: str, to: str
) -> None:
    """Every module folder keeps its files (configs byte for byte), weights in the target's
    layout; SentenceTransformer loads the output and encodes exactly as the original did."""
    source, out = built.path(saved), tmp_path / "out"
    report = modelport.convert(source, out, modelport.ConvertOptions(to=to))
    assert report.verified
    weights = "model.safetensors" if to == "hf" else "pytorch_model.bin"
    expected = [
        p
        for p in files_under(source)
        if Path(p).name not in ("model.safetensors", "pytorch_model.bin")
    ]
    assert files_under(out) == sorted([*expected, weights, f"2_Dense/{weights}"])
    for same in expected:
        assert (out / same).read_bytes() == (source / same).read_bytes(), same
    assert_same_torch(oracle(out), oracle(source))
    np.testing.assert_array_equal(encode(out), built.encoded)


@heavy
def test_sharded_top_module_and_single_file_modules(built: Built, tmp_path: Path) -> None:
    """With a small --shard-size the Transformer module is sharded with an index, as
    transformers loads it; the Dense module stays one file, which is all its loader reads."""
    out = tmp_path / "sharded"
    options = modelport.ConvertOptions(to="hf", shard_size="4KB")
    modelport.convert(built.path("st"), out, options)
    index_name = "model.safetensors.index.json"
    index = json.loads((out / index_name).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "2_Dense").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    np.testing.assert_array_equal(encode(out), built.encoded)


@heavy
def test_round_trip_through_bin(built: Built, tmp_path: Path) -> None:
    """safetensors to .bin (torch.load reads every module's file) and back: the same
    weights, the same encodings."""
    to_bin, back = tmp_path / "bin", tmp_path / "back"
    modelport.convert(built.path("st"), to_bin, modelport.ConvertOptions(to="hf-bin"))
    top = torch.load(to_bin / "pytorch_model.bin", weights_only=True)
    assert_same_torch(top, weights_of(built.path("st")))
    modelport.convert(to_bin, back, modelport.ConvertOptions(to="hf"))
    assert (back / "model.safetensors").is_file()
    assert_same_torch(oracle(back), oracle(built.path("st")))
    np.testing.assert_array_equal(encode(back), built.encoded)


@heavy
def test_a_cast_recasts_the_transformer_config(built: Built, tmp_path: Path) -> None:
    """--dtype float16: every module's weights are cast, the top config.json says so, and the
    model still loads and encodes close to the original."""
    out = tmp_path / "half"
    modelport.convert(built.path("st"), out, modelport.ConvertOptions(to="hf", dtype="float16"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert {t.dtype for t in oracle(out).values() if t.is_floating_point()} == {torch.float16}
    dense_config = "2_Dense/config.json"
    assert (out / dense_config).read_bytes() == (built.path("st") / dense_config).read_bytes()
    np.testing.assert_allclose(encode(out), built.encoded, atol=5e-3)


@heavy
def test_the_legacy_layout_with_every_module_in_a_folder(built: Built, tmp_path: Path) -> None:
    """sentence-transformers 2.x kept the Transformer module in ``0_Transformer/``: its
    tensors are named under that folder, and the conversion keeps it there."""
    legacy = tmp_path / "legacy"
    shutil.copytree(built.path("st"), legacy)
    inner = legacy / "0_Transformer"
    inner.mkdir()
    top_files = ["config.json", "model.safetensors", "sentence_bert_config.json"]
    top_files += ["tokenizer.json", "tokenizer_config.json"]
    for name in top_files:
        (legacy / name).rename(inner / name)
    modules = json.loads((legacy / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (legacy / "modules.json").write_text(json.dumps(modules))
    np.testing.assert_array_equal(encode(legacy), built.encoded)  # the library loads it
    with modelport.open(legacy) as model:
        names = set(model.tensors)
    assert "0_Transformer/embeddings.word_embeddings.weight" in names
    out = tmp_path / "out"
    modelport.convert(legacy, out, modelport.ConvertOptions(to="hf-bin"))
    assert (out / "0_Transformer" / "pytorch_model.bin").is_file()
    assert (out / "modules.json").read_bytes() == (legacy / "modules.json").read_bytes()
    np.testing.assert_array_equal(encode(out), built.encoded)


@heavy
def test_names_must_stay_in_their_modules(built: Built, tmp_path: Path) -> None:
    """A name no module folder owns is refused before anything is written; a selection of the
    top module writes it and says which module was left out."""
    source = built.path("st")
    with pytest.raises(UsageError, match="written per module"):
        modelport.convert(
            source, tmp_path / "a", modelport.ConvertOptions(to="hf", add_prefix="x/")
        )
    assert not (tmp_path / "a").exists()
    options = modelport.ConvertOptions(to="hf", exclude=("2_Dense/*",))
    report = modelport.convert(source, tmp_path / "b", options)
    assert (tmp_path / "b" / "model.safetensors").is_file()
    assert not (tmp_path / "b" / "2_Dense").exists()
    assert any("no tensors taken from 2_Dense:" in note for note in report.notes)


@heavy
def test_flattened_to_one_file_under_the_names_inspect_shows(built: Built, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "st.safetensors"
    modelport.convert(built.path("st"), out)
    assert_same_torch(load_file(out), oracle(built.path("st")))


@heavy
def test_code_a_module_names_is_reported(built: Built, tmp_path: Path) -> None:
    """A module type outside sentence_transformers (imported from the folder even without
    trust_remote_code) and a Dense activation outside torch (imported with it) are
    remote code; the saved model itself scans safe."""
    assert modelport.scan(built.path("st")).verdict == "safe"
    path = tmp_path / "st"
    shutil.copytree(built.path("st"), path)
    modules = json.loads((path / "modules.json").read_text())
    modules[2]["type"] = "my_layers.Dense"
    (path / "modules.json").write_text(json.dumps(modules))
    dense = json.loads((path / "2_Dense" / "config.json").read_text())
    (path / "2_Dense" / "config.json").write_text(
        json.dumps({**dense, "activation_function": "my_layers.Activation"})
    )
    report = modelport.scan(path)
    assert report.verdict == "suspicious"
    found = {(f.rule, f.member): f.message for file in report.files for f in file.findings}
    assert "my_layers.Dense" in found["remote-code", "modules.json"]
    assert "my_layers.Activation" in found["remote-code", "config.json"]


@heavy
def test_cross_and_sparse_encoders_convert_and_load(built: Built, tmp_path: Path) -> None:
    """A CrossEncoder (one module, at the top) and a SparseEncoder (a SparseAutoEncoder
    module with weights) keep their layouts through --to hf-bin and load with their own
    classes: the same scores, the same weights."""
    from sentence_transformers import CrossEncoder, SparseEncoder

    pairs = [("hello world", "a b"), ("w1 w2", "w3")]
    cross = CrossEncoder(str(built.path("bert")), num_labels=1, device="cpu")
    cross.save(str(tmp_path / "ce"))
    modelport.convert(tmp_path / "ce", tmp_path / "ce-bin", modelport.ConvertOptions(to="hf-bin"))
    assert (tmp_path / "ce-bin" / "pytorch_model.bin").is_file()
    loaded = CrossEncoder(str(tmp_path / "ce-bin"), device="cpu")
    np.testing.assert_array_equal(loaded.predict(pairs), cross.predict(pairs))
    SparseEncoder(str(built.path("bert")), device="cpu").save(str(tmp_path / "se"))
    modelport.convert(tmp_path / "se", tmp_path / "se-bin", modelport.ConvertOptions(to="hf-bin"))
    with modelport.open(tmp_path / "se") as model:
        assert "2_SparseAutoEncoder/pre_bias" in model.tensors
    sparse = tmp_path / "se-bin" / "2_SparseAutoEncoder" / "pytorch_model.bin"
    assert sparse.is_file()
    want = SparseEncoder(str(tmp_path / "se"), device="cpu").state_dict()
    assert_same_torch(SparseEncoder(str(tmp_path / "se-bin"), device="cpu").state_dict(), want)


def test_a_layout_written_by_hand_reads_and_converts(tmp_path: Path) -> None:
    """The layout without the library (safetensors' save_file, JSON): the top module's names
    bare, Dense's under ``2_Dense/``; ``--to hf-bin`` puts each module's weights in its own
    folder, as torch.load reads them, and carries every other file byte for byte; the top
    module's file alone converts with a note that the other modules stay behind."""
    from safetensors.torch import save_file

    source = tmp_path / "st"
    torch.manual_seed(3)
    top = {"embeddings.weight": torch.randn(6, 4), "encoder.bias": torch.randn(4)}
    dense = {"linear.weight": torch.randn(2, 4), "linear.bias": torch.randn(2)}
    for folder in MODULE_FOLDERS:
        (source / folder).mkdir(parents=True)
    save_file(top, source / "model.safetensors")
    save_file(dense, source / "2_Dense" / "model.safetensors")
    types = ["Transformer", "Pooling", "Dense", "Normalize"]
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(zip(["", *MODULE_FOLDERS], types, strict=True))
    ]
    configs = {
        "modules.json": modules,
        "config.json": {"model_type": "bert", "dtype": "float32"},
        "1_Pooling/config.json": {"word_embedding_dimension": 4, "pooling_mode_mean_tokens": True},
        "2_Dense/config.json": {"in_features": 4, "out_features": 2, "bias": True},
    }
    for name, document in configs.items():
        (source / name).write_text(json.dumps(document))
    with modelport.open(source) as model:
        assert sorted(model.tensors) == sorted([*top, *(f"2_Dense/{n}" for n in dense)])
        assert model.details["layout"] == "sentence-transformers"
    out = tmp_path / "out"
    modelport.convert(source, out, modelport.ConvertOptions(to="hf-bin"))
    assert files_under(out) == sorted([*configs, "pytorch_model.bin", "2_Dense/pytorch_model.bin"])
    assert (out / "3_Normalize").is_dir()
    for name in configs:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert_same_torch(torch.load(out / "pytorch_model.bin", weights_only=True), top)
    assert_same_torch(torch.load(out / "2_Dense" / "pytorch_model.bin", weights_only=True), dense)
    one = modelport.convert(
        source / "model.safetensors", tmp_path / "one", modelport.ConvertOptions(to="hf")
    )
    assert any("holds one module of the sentence-transformers model" in n for n in one.notes)


CARD_RUN = """
import json, sys, numpy as np
namespace = {}
exec(sys.argv[1], namespace)
np.save(sys.argv[2], namespace["model"].encode(json.loads(sys.argv[3])))
"""


@heavy
def test_the_card_loads_the_folder_with_sentence_transformers(built: Built, tmp_path: Path) -> None:
    """``modelport card`` of the folder: the hub's front matter names the library and the
    task, and its loading code, run as written from the folder, encodes as the original."""
    from huggingface_hub import ModelCard

    from modelport.reporting.card import build_card

    folder = built.path("st")
    made = build_card(folder, relative_to=folder)
    data = ModelCard(made.text).data
    assert (data.library_name, data.pipeline_tag) == (
        "sentence-transformers",
        "sentence-similarity",
    )
    assert "bert" in data.tags
    code = made.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'SentenceTransformer(".")' in code
    out = tmp_path / "encoded.npy"
    subprocess.run(
        [sys.executable, "-c", CARD_RUN, code, str(out), json.dumps(SENTENCES)],
        cwd=folder,
        check=True,
        timeout=300,
    )
    assert np.array_equal(np.load(out), built.encoded)


# -- Router: modules of modules ---------------------------------------------------------------


def router_model(root: Path) -> Any:
    """A Router (sentence-transformers 5 and later) sending queries and documents to two
    StaticEmbedding modules of their own, then Normalize: an asymmetric encoder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models

    torch.manual_seed(5)
    tokenizer = Tokenizer(
        tokenizer_models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    query = models.StaticEmbedding(tokenizer, embedding_dim=8)
    document = models.StaticEmbedding(tokenizer, embedding_dim=8)
    router = models.Router.for_query_document(query_modules=[query], document_modules=[document])
    model = SentenceTransformer(modules=[router, models.Normalize()], device="cpu")
    model.save(str(root))
    return model


@heavy
def test_a_router_reads_its_routes_and_converts_to_what_loads(tmp_path: Path) -> None:
    """Each module a Router routes to is read from its own folder under ``<folder>/``, and
    ``--to hf-bin`` keeps the layout: the converted model encodes queries and documents as
    the original does, bit for bit."""
    from sentence_transformers import SentenceTransformer

    model = router_model(tmp_path / "st")
    routes = {"query": "query_0_StaticEmbedding", "document": "document_0_StaticEmbedding"}
    want = {
        f"{folder}/{name}": tensor
        for folder in routes.values()
        for name, tensor in weights_of(tmp_path / "st" / folder).items()
    }
    with modelport.open(tmp_path / "st") as read:
        assert_same_tensors(dict(read.tensors), want)
    modelport.convert(tmp_path / "st", tmp_path / "bin", modelport.ConvertOptions(to="hf-bin"))
    for folder in routes.values():
        assert (tmp_path / "bin" / folder / "pytorch_model.bin").is_file()
    loaded = SentenceTransformer(str(tmp_path / "bin"), device="cpu")
    np.testing.assert_array_equal(loaded.encode_query(SENTENCES), model.encode_query(SENTENCES))
    np.testing.assert_array_equal(
        loaded.encode_document(SENTENCES), model.encode_document(SENTENCES)
    )


def test_a_router_written_by_hand_reads_scans_and_names_its_code(tmp_path: Path) -> None:
    """The Router layout without the library: its routes' tensors under their folders, and a
    route whose class lies outside sentence_transformers is code the Router imports."""
    from safetensors.torch import save_file

    source = tmp_path / "st"
    torch.manual_seed(4)
    weights = {
        folder: {"embedding.weight": torch.randn(5, 3)}
        for folder in ("query_0_StaticEmbedding", "document_0_StaticEmbedding")
    }
    for folder, tensors in weights.items():
        (source / folder).mkdir(parents=True)
        save_file(tensors, source / folder / "model.safetensors")
    static = "sentence_transformers.sentence_transformer.modules.static_embedding.StaticEmbedding"
    router = {
        "types": {folder: static for folder in weights},
        "structure": {
            "query": ["query_0_StaticEmbedding"],
            "document": ["document_0_StaticEmbedding"],
        },
        "parameters": {"default_route": "document"},
    }
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Router"}]
    (source / "modules.json").write_text(json.dumps(modules))
    (source / "router_config.json").write_text(json.dumps(router))
    with modelport.open(source) as model:
        assert sorted(model.tensors) == sorted(f"{f}/embedding.weight" for f in weights)
        routed = {m["path"]: m.get("tensors") for m in model.details["module_folders"]}
        assert routed == {"": None, **{folder: 1 for folder in weights}}
    assert modelport.scan(source).verdict == "safe"
    router["types"]["query_0_StaticEmbedding"] = "my_layers.Static"
    (source / "router_config.json").write_text(json.dumps(router))
    report = modelport.scan(source)
    assert report.verdict == "suspicious"
    found = {(f.rule, f.member): f.message for file in report.files for f in file.findings}
    assert "my_layers.Static" in found["remote-code", "router_config.json"]
