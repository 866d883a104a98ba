"""Hugging Face folders converted into GGUF files llama.cpp can run.

Oracles: gguf-py's own reader (architecture, hyperparameters, names, vocabulary, the typed
metadata modelport's writer writes); transformers loading the GGUF file back (it maps
llama.cpp's names back and undoes the Llama q/k permutation and GPT-2's transposes) with its
logits compared with the source model's (heavy); llama.cpp's converter's numpy permutation
(written here); transformers' llama3 RoPE frequencies; the sentencepiece library's pieces.
An architecture modelport does not map still gets its tensors, with a note."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import modelport
from modelport.conversion.gguf_arch import llama3_rope_factors, permuted_heads, transposed
from modelport.conversion.gguf_vocab import CHECK_TEXT
from modelport.errors import ConversionError
from modelport.formats.gguf.writer import write_gguf
from modelport.tensors import Storage, TensorRef, byte_array
from modelport.transfer.write_plan import OutputTensor, TypedMetadata, WritePlan

gguf = pytest.importorskip("gguf")


def _fields(path: Path) -> dict[str, Any]:
    """Every key/value gguf-py reads from ``path``, arrays as lists."""
    reader = gguf.GGUFReader(path)
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")  # the reader's own entries for the file header
    }


def _ref(array: np.ndarray[Any, Any]) -> TensorRef:
    data = np.ascontiguousarray(array)
    storage = Storage(None, 0, data.nbytes, reader=lambda: byte_array(data.tobytes()))
    return TensorRef(str(data.dtype), data.shape, storage)


# -- the writer's typed metadata, read by gguf-py -----------------------------------------------
def test_typed_metadata_read_back_by_gguf_py(tmp_path: Path) -> None:
    typed = (
        TypedMetadata("general.architecture", "string", "llama"),
        TypedMetadata("llama.block_count", "uint32", 2),
        TypedMetadata("llama.rope.freq_base", "float32", 10000.0),
        TypedMetadata("x.flag", "bool", True),
        TypedMetadata("x.offset", "int64", -5),
        TypedMetadata("tokenizer.ggml.tokens", "string", ("a", "b c", "é")),
        TypedMetadata("tokenizer.ggml.token_type", "int32", (1, 3, 4)),
        TypedMetadata("tokenizer.ggml.scores", "float32", (0.5, -1.0, 2.0)),
    )
    tensor = OutputTensor("w", "float32", _ref(np.arange(6, dtype=np.float32).reshape(2, 3)))
    plan = WritePlan((tensor,), {"llama.block_count": "shadowed", "note": "kept"}, None, typed)
    path = tmp_path / "t.gguf"
    with open(path, "wb") as handle:
        write_gguf(handle, plan)
    fields = _fields(path)
    assert list(fields)[:2] == ["general.architecture", "general.alignment"]
    assert fields["llama.block_count"] == 2
    assert fields["llama.rope.freq_base"] == 10000.0
    assert fields["x.flag"] is True and fields["x.offset"] == -5
    assert fields["tokenizer.ggml.tokens"] == ["a", "b c", "é"]
    assert fields["tokenizer.ggml.token_type"] == [1, 3, 4]
    assert fields["tokenizer.ggml.scores"] == [0.5, -1.0, 2.0]
    assert fields["note"] == "kept"
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.token_type"].types == [
        gguf.GGUFValueType.ARRAY,
        gguf.GGUFValueType.INT32,
    ]
    assert np.array_equal(reader.tensors[0].data, np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize(
    "entry",
    [
        TypedMetadata("k", "uint32", -1),
        TypedMetadata("k", "uint8", 256),
        TypedMetadata("k", "uint32", 1.5),
        TypedMetadata("k", "bool", 1),
        TypedMetadata("k", "string", ("a", 2)),
        TypedMetadata("general.alignment", "uint32", 64),
    ],
)
def test_typed_metadata_refused(tmp_path: Path, entry: TypedMetadata) -> None:
    plan = WritePlan((), {}, None, (entry,))
    with open(tmp_path / "t.gguf", "wb") as handle, pytest.raises(ConversionError):
        write_gguf(handle, plan)


# -- the views, against llama.cpp's converter's reshapes -----------------------------------------
def _llama_cpp_permute(weights: np.ndarray[Any, Any], heads: int) -> np.ndarray[Any, Any]:
    """convert_hf_to_gguf's ``permute``: numpy reshapes, the reference for the view."""
    rows = weights.shape[0]
    split = weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


@pytest.mark.parametrize(("shape", "heads"), [((32, 12), 4), ((32, 12), 2), ((16,), 2)])
def test_permuted_heads_is_llama_cpp_permute(shape: tuple[int, ...], heads: int) -> None:
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    view = permuted_heads(_ref(values), heads)
    assert np.array_equal(view.numpy().reshape(shape), _llama_cpp_permute(values, heads))


def test_permuted_heads_of_a_transposed_view() -> None:
    values = np.arange(12 * 16, dtype=np.float32).reshape(12, 16)
    view = permuted_heads(transposed(_ref(values)), 4)
    assert np.array_equal(view.numpy().reshape(16, 12), _llama_cpp_permute(values.T, 4))


# -- whole folders ------------------------------------------------------------------------------
def _tokenizer_json(folder: Path, size: int, normalized: bool = False) -> None:
    """A byte-level BPE tokenizer of ``size - 1`` tokens and one special token, saved by the
    tokenizers library; ``normalized``: with an NFC normalizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    letters = [chr(c) for c in range(ord("!"), ord("!") + size - 4)]
    vocab = {token: i for i, token in enumerate(letters)}
    merges = [("!", '"'), ('!"', "#")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(["<|end|>"])
    if normalized:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.save(str(folder / "tokenizer.json"))


def _llama_folder(tmp_path: Path) -> tuple[Path, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # attention far from uniform, so a wrong q/k layout shows
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    _tokenizer_json(folder, 128)
    return folder, model


def _gpt2_folder(tmp_path: Path) -> tuple[Path, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=96,
        bos_token_id=0,
        eos_token_id=94,
        initializer_range=0.2,
    )
    model = GPT2LMHeadModel(config).eval()
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    _tokenizer_json(folder, 96)
    return folder, model


FOLDERS = {"llama": _llama_folder, "gpt2": _gpt2_folder}
# the largest logit difference allowed, as a share of the largest logit: measured 0 (f32),
# 2e-3 (f16) and 0.09 (q8_0: the wide initialisation amplifies its error) against 1.17 with
# Llama's q/k rows left in Hugging Face's order
TOLERANCES = {"f32": 1e-5, "f16": 1e-2, "q8_0": 0.25}


def _converted(tmp_path: Path, arch: str, gguf_type: str) -> tuple[Path, Any, Any]:
    folder, model = FOLDERS[arch](tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = modelport.convert(
        folder, out_dir / "m.gguf", modelport.ConvertOptions(gguf_type=gguf_type)
    )
    return out_dir, model, report


@pytest.mark.heavy
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_runs_the_gguf_like_the_source(
    tmp_path: Path, arch: str, gguf_type: str
) -> None:
    from transformers import AutoModelForCausalLM

    out_dir, source, report = _converted(tmp_path, arch, gguf_type)
    assert report.verified
    assert any(f"as a {arch} model" in note for note in report.notes)
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file="m.gguf").eval()
    assert type(loaded) is type(source)
    torch.manual_seed(1)
    vocab = source.config.vocab_size
    for length in (1, 5, 17):
        ids = torch.randint(0, vocab, (2, length))
        with torch.no_grad():
            expected = source(ids).logits
            got = loaded(ids).logits.float()
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= TOLERANCES[gguf_type] * scale


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _llama_weights() -> dict[str, torch.Tensor]:
    """A Llama state_dict under transformers' names, shaped by ``LLAMA_CONFIG``."""
    torch.manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (128, 64),
        "model.norm.weight": (64,),
        "lm_head.weight": (128, 64),
    }
    for block in range(2):
        prefix = f"model.layers.{block}"
        shapes |= {
            f"{prefix}.self_attn.q_proj.weight": (64, 64),
            f"{prefix}.self_attn.k_proj.weight": (32, 64),
            f"{prefix}.self_attn.v_proj.weight": (32, 64),
            f"{prefix}.self_attn.o_proj.weight": (64, 64),
            f"{prefix}.mlp.gate_proj.weight": (128, 64),
            f"{prefix}.mlp.up_proj.weight": (128, 64),
            f"{prefix}.mlp.down_proj.weight": (64, 128),
            f"{prefix}.input_layernorm.weight": (64,),
            f"{prefix}.post_attention_layernorm.weight": (64,),
        }
    return {name: torch.randn(shape) for name, shape in shapes.items()}


def _hand_llama(
    tmp_path: Path, gguf_type: str, normalized: bool = False
) -> tuple[Path, dict[str, torch.Tensor], Any]:
    """A Llama folder whose config.json is written here and weights by safetensors (fast:
    no transformers), converted."""
    from safetensors.torch import save_file

    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    weights = _llama_weights()
    save_file(weights, str(folder / "model.safetensors"))
    _tokenizer_json(folder, 128, normalized)
    out = tmp_path / "m.gguf"
    report = modelport.convert(folder, out, modelport.ConvertOptions(gguf_type=gguf_type))
    return out, weights, report


def test_llama_metadata_names_and_vocabulary(tmp_path: Path) -> None:
    path, _, report = _hand_llama(tmp_path, "q8_0")
    assert report.verified
    assert any("as a llama model" in note for note in report.notes)
    fields = _fields(path)
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "llama.vocab_size": 128,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.block_count": 2,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["llama.rope.freq_base"] == 500000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # no known hash, but GPT-2's split
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 128 and tokens[:2] == ["!", '"'] and tokens[124] == '!"'
    assert tokens[126] == "<|end|>" and tokens[127] == "[PAD127]"
    types = fields["tokenizer.ggml.token_type"]
    assert (types[0], types[126], types[127]) == (1, 3, 5)
    assert fields["tokenizer.ggml.merges"] == ['! "', '!" #']
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    reader = gguf.GGUFReader(path)
    types_by_name = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types_by_name["blk.0.attn_q.weight"] == "Q8_0"
    assert types_by_name["blk.0.attn_norm.weight"] == "F32"
    arch = gguf.MODEL_ARCH.LLAMA
    allowed = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[arch] for b in (0, 1)}
    assert {n.rsplit(".", 1)[0] for n in types_by_name} <= allowed
    assert len(types_by_name) == 21 and "output.weight" in types_by_name


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_llama_q_and_k_rows_are_permuted(tmp_path: Path, gguf_type: str) -> None:
    path, weights, report = _hand_llama(tmp_path, gguf_type)
    assert report.verified
    reader = gguf.GGUFReader(path)
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = {k: v.numpy().astype(gguf_type.replace("f", "float")) for k, v in weights.items()}
    layer = "model.layers.1.self_attn"
    assert np.array_equal(
        stored["blk.1.attn_q.weight"], _llama_cpp_permute(state[f"{layer}.q_proj.weight"], 4)
    )
    assert np.array_equal(
        stored["blk.1.attn_k.weight"], _llama_cpp_permute(state[f"{layer}.k_proj.weight"], 2)
    )
    assert np.array_equal(stored["blk.1.attn_v.weight"], state[f"{layer}.v_proj.weight"])
    assert stored["blk.1.ffn_norm.weight"].dtype == np.float32


# llama.cpp's "gpt-2" pre-tokenizer (llama-vocab.cpp); text it leaves unmatched is a piece
LLAMA_CPP_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


@pytest.mark.parametrize("text", ["Hi !! $333333, 3333.", "a  b\tc \n\n d's", CHECK_TEXT])
def test_byte_level_splits_as_llama_cpp_s_gpt2(text: str) -> None:
    """What lets modelport name a tokenizer ``gpt-2`` without knowing its hash."""
    import regex
    from tokenizers import pre_tokenizers

    expected, end = [], 0
    for match in regex.finditer(LLAMA_CPP_GPT2_SPLIT, text):
        expected += [text[end : match.start()]] if match.start() > end else []
        expected.append(match.group())
        end = match.end()
    expected += [text[end:]] if end < len(text) else []
    split = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    assert [text[start:stop] for _, (start, stop) in split] == expected


def test_unknown_tokenizer_that_does_not_split_as_gpt2_is_default(tmp_path: Path) -> None:
    path, _, report = _hand_llama(tmp_path, "f16", normalized=True)
    assert _fields(path)["tokenizer.ggml.pre"] == "default"
    assert any("may split text" in note for note in report.notes)


def test_gpt2_context_length_is_the_position_rows(tmp_path: Path) -> None:
    """llama.cpp reads position_embd as (embedding, context_length): n_positions, not n_ctx."""
    from safetensors.torch import save_file

    folder, w = tmp_path / "gpt2", 32
    folder.mkdir()
    config = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_embd": w, "n_layer": 1}
    config |= {"n_head": 2, "n_ctx": 16, "n_positions": 48}
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"wte": (64, w), "wpe": (48, w), "ln_f": (w,), "h.0.ln_1": (w,), "h.0.ln_2": (w,)}
    shapes |= {"h.0.attn.c_attn": (w, 3 * w), "h.0.attn.c_proj": (w, w), "h.0.mlp.c_fc": (w, 4 * w)}
    shapes |= {"h.0.mlp.c_proj": (4 * w, w)}
    weights = {f"transformer.{name}.weight": torch.randn(shape) for name, shape in shapes.items()}
    save_file(weights, str(folder / "model.safetensors"))
    out = tmp_path / "m.gguf"
    modelport.convert(folder, out)
    positions = next(t for t in gguf.GGUFReader(out).tensors if t.name == "position_embd.weight")
    assert _fields(out)["gpt2.context_length"] == 48 == int(positions.shape[1])


def test_unknown_architecture_writes_tensors_only(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "folder"
    folder.mkdir()
    config = {"architectures": ["FooForCausalLM"], "model_type": "foo", "vocab_size": 8}
    (folder / "config.json").write_text(json.dumps(config))
    weights = {"foo.embed.weight": torch.randn(8, 4), "foo.norm.weight": torch.ones(4)}
    save_file(weights, str(folder / "model.safetensors"))
    out = tmp_path / "m.gguf"
    report = modelport.convert(folder, out)
    assert report.verified
    assert any(
        "llama.cpp will not run" in note and "FooForCausalLM" in note for note in report.notes
    )
    fields = _fields(out)
    assert "general.architecture" not in fields
    assert not any(key.startswith("tokenizer.") for key in fields)
    reader = gguf.GGUFReader(out)
    assert {t.name for t in reader.tensors} == set(weights)
    embed = next(t for t in reader.tensors if t.name == "foo.embed.weight")
    assert np.array_equal(np.asarray(embed.data), weights["foo.embed.weight"].numpy())


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.heavy
def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        intermediate_size=128,
        num_hidden_layers=1,
        max_position_embeddings=131072,
        rope_parameters=LLAMA3_ROPE,
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128)
    factors = llama3_rope_factors(config.to_dict()).numpy()
    assert factors.shape == (64,) and factors.dtype == np.float32
    assert factors.min() == 1.0 and factors.max() == 8.0
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-5)


def test_llama3_rope_written_as_rope_freqs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "llama3"
    folder.mkdir()
    config = {**LLAMA_CONFIG, "rope_parameters": LLAMA3_ROPE}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(_llama_weights(), str(folder / "model.safetensors"))
    out = tmp_path / "m.gguf"
    report = modelport.convert(folder, out)
    assert report.verified
    reader = gguf.GGUFReader(out)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    values = np.asarray(freqs.data)
    assert freqs.tensor_type.name == "F32" and values.shape == (8,)
    np.testing.assert_array_equal(values, llama3_rope_factors(config).numpy())
    assert values[0] == 1.0 and values[-1] == 8.0
    assert any("no vocabulary written" in note for note in report.notes)


def test_sentencepiece_vocabulary_as_llama_cpp_writes_it(tmp_path: Path) -> None:
    import io

    spm = pytest.importorskip("sentencepiece")
    from safetensors.torch import save_file

    folder = tmp_path / "llama2"
    folder.mkdir()
    model = io.BytesIO()
    corpus = [f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(200)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=60,
        model_type="bpe",
        byte_fallback=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    save_file(_llama_weights(), str(folder / "model.safetensors"))
    out = tmp_path / "m.gguf"
    report = modelport.convert(folder, out)
    assert report.verified
    fields = _fields(out)
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    pieces = processor.vocab_size()
    assert fields["tokenizer.ggml.model"] == "llama"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 128
    assert tokens[:pieces] == [processor.id_to_piece(i) for i in range(pieces)]
    assert tokens[pieces:] == [f"[PAD{i}]" for i in range(pieces, 128)]
    scores = fields["tokenizer.ggml.scores"]
    assert scores[:pieces] == [processor.get_score(i) for i in range(pieces)]
    assert scores[-1] == -10000.0
    types = fields["tokenizer.ggml.token_type"]
    assert types[processor.unk_id()] == gguf.TokenType.UNKNOWN
    assert types[processor.bos_id()] == gguf.TokenType.CONTROL
    assert types[pieces - 1] == gguf.TokenType.NORMAL and types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.unknown_token_id"] == processor.unk_id()
