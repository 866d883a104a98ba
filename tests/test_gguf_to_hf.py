"""GGUF files converted back into Hugging Face folders (``convert --to hf``).

Oracles: GGUF files written by gguf-py's own ``GGUFWriter`` and quantizer, with llama.cpp's
converter's numpy permutation (written here) applied, read back into the Hugging Face layout
by safetensors; gguf-py's reference dequantizer; the ``tokenizers`` and ``sentencepiece``
libraries' own encodings; and (heavy) transformers: tiny models converted to GGUF and back,
loaded strictly with ``from_pretrained`` and compared with the source model and with
transformers' own GGUF loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelport
from modelport.conversion.gguf_arch import permuted_heads
from modelport.conversion.gguf_to_hf import unpermuted_heads
from modelport.errors import ConversionError
from modelport.tensors import Storage, TensorRef, byte_array
from tests.conftest import Cli

gguf = pytest.importorskip("gguf")


def _ref(array: np.ndarray[Any, Any]) -> TensorRef:
    data = np.ascontiguousarray(array)
    storage = Storage(None, 0, data.nbytes, reader=lambda: byte_array(data.tobytes()))
    return TensorRef(str(data.dtype), data.shape, storage)


def _llama_cpp_permute(weights: np.ndarray[Any, Any], heads: int) -> np.ndarray[Any, Any]:
    """convert_hf_to_gguf's ``LlamaModel.permute``, in numpy: the reference."""
    rows = weights.shape[0]
    split = weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


@pytest.mark.parametrize(("shape", "heads"), [((32, 12), 4), ((32, 12), 2), ((16,), 2)])
def test_unpermuted_heads_undoes_llama_cpp_permute(shape: tuple[int, ...], heads: int) -> None:
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    stored = _llama_cpp_permute(values, heads)
    view = unpermuted_heads(_ref(stored), heads)
    assert np.array_equal(view.numpy().reshape(shape), values)
    written = permuted_heads(_ref(values), heads).numpy().reshape(shape)  # gguf_arch's way
    there_and_back = unpermuted_heads(_ref(written), heads)
    assert np.array_equal(there_and_back.numpy().reshape(shape), values)


# -- GGUF files written by gguf-py ---------------------------------------------------------------
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, BLOCKS = 64, 128, 4, 2, 40, 2


def _llama_weights(tied: bool) -> dict[str, np.ndarray[Any, Any]]:
    """A Llama state_dict under transformers' names."""
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for block in range(BLOCKS):
        layer = f"model.layers.{block}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            f"{layer}.self_attn.k_proj.weight": (HIDDEN // 2, HIDDEN),
            f"{layer}.self_attn.v_proj.weight": (HIDDEN // 2, HIDDEN),
            f"{layer}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            f"{layer}.mlp.gate_proj.weight": (FFN, HIDDEN),
            f"{layer}.mlp.up_proj.weight": (FFN, HIDDEN),
            f"{layer}.mlp.down_proj.weight": (HIDDEN, FFN),
            f"{layer}.input_layernorm.weight": (HIDDEN,),
            f"{layer}.post_attention_layernorm.weight": (HIDDEN,),
        }
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def _llama_cpp_name(name: str) -> str:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, BLOCKS)
    found = names.get_name(name, try_suffixes=(".weight", ".bias"))
    assert found is not None
    return str(found)


def _write_llama_gguf(
    path: Path,
    weights: dict[str, np.ndarray[Any, Any]],
    quantized: bool = False,
    extra: dict[str, np.ndarray[Any, Any]] | None = None,
) -> dict[str, np.ndarray[Any, Any]]:
    """``weights`` as llama.cpp's converter writes them (names, q/k permuted, norms f32,
    matrices Q8_0 when ``quantized``), and ``extra`` under the names given; returns the
    values each stored tensor of ``weights`` holds."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    stored = {}
    for name, values in weights.items():
        if "q_proj" in name:
            values = _llama_cpp_permute(values, HEADS)
        elif "k_proj" in name:
            values = _llama_cpp_permute(values, KV_HEADS)
        if quantized and values.ndim == 2:
            blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                _llama_cpp_name(name), blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
            values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(_llama_cpp_name(name), values)
        stored[name] = values
    for name, values in (extra or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _hf_layout(name: str, values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A stored tensor's values with llama.cpp's q/k permutation undone, in numpy."""
    heads = HEADS if "q_proj" in name else KV_HEADS if "k_proj" in name else 0
    if not heads:
        return values
    rows = values.shape[0]
    return values.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(values.shape)


def _safetensors(folder: Path) -> dict[str, np.ndarray[Any, Any]]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("tied", [False, True])
def test_llama_gguf_back_to_hugging_face_names_and_layout(tmp_path: Path, tied: bool) -> None:
    weights = _llama_weights(tied)
    _write_llama_gguf(tmp_path / "m.gguf", weights)
    report = modelport.convert(
        tmp_path / "m.gguf", tmp_path / "out", modelport.ConvertOptions(to="hf")
    )
    assert report.verified
    assert any("LlamaForCausalLM" in note for note in report.notes)
    written = _safetensors(tmp_path / "out")
    assert set(written) == set(weights)
    for name, values in weights.items():
        assert written[name].dtype == np.float32
        assert np.array_equal(written[name], values), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": BLOCKS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tied,
        "dtype": "float32",
    }
    assert {key: config[key] for key in expected} == expected


def test_q8_0_dequantized_and_cast(tmp_path: Path) -> None:
    weights = _llama_weights(tied=False)
    stored = _write_llama_gguf(tmp_path / "m.gguf", weights, quantized=True)
    options = modelport.ConvertOptions(to="hf", dtype="float16")
    report = modelport.convert(tmp_path / "m.gguf", tmp_path / "out", options)
    assert report.verified
    assert any("dequantized 16 Q8_0 tensors to float16" in note for note in report.notes)
    written = _safetensors(tmp_path / "out")
    for name, values in stored.items():
        expected = _hf_layout(name, np.asarray(values, np.float32)).astype(np.float16)
        assert written[name].dtype == np.float16
        assert np.array_equal(written[name], expected), name
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    error = float(np.abs(written[q_proj].astype(np.float32) - weights[q_proj]).max())
    assert 0 < error < 0.05  # Q8_0 of unit normals, then float16
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float16"


def test_float16_gguf_stays_float16(tmp_path: Path) -> None:
    """llama.cpp's converter keeps norms in float32 beside float16 matrices: the folder is
    float16 throughout, the dtype the matrices have."""
    weights = {
        name: values.astype(np.float16) if values.ndim == 2 else values
        for name, values in _llama_weights(tied=True).items()
    }
    _write_llama_gguf(tmp_path / "m.gguf", weights)
    report = modelport.convert(
        tmp_path / "m.gguf", tmp_path / "out", modelport.ConvertOptions(to="hf")
    )
    assert report.verified
    written = _safetensors(tmp_path / "out")
    assert {v.dtype for v in written.values()} == {np.dtype(np.float16)}
    for name, values in weights.items():
        assert np.array_equal(written[name], values.astype(np.float16)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"


def test_unknown_architecture_refused_naming_it(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "mamba")
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="'mamba' architecture"):
        modelport.convert(tmp_path / "m.gguf", tmp_path / "out", modelport.ConvertOptions(to="hf"))
    assert not (tmp_path / "out").exists()


def test_tensor_without_a_transformers_name_refused(tmp_path: Path) -> None:
    experts = {"blk.0.ffn_gate_exps.weight": np.ones((2, 4, 4), np.float32)}
    _write_llama_gguf(tmp_path / "m.gguf", _llama_weights(tied=True), extra=experts)
    with pytest.raises(ConversionError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        modelport.convert(tmp_path / "m.gguf", tmp_path / "out", modelport.ConvertOptions(to="hf"))


# -- the vocabulary ------------------------------------------------------------------------------
SAMPLES = ['!"#$%', 'ab!"#<|end|>!" xyz', "  spaced  out\nlines\t", "héllo wörld ✓", ""]


def _byte_level_tokenizer() -> Any:
    """A byte-level BPE tokenizer saved by the tokenizers library: 256 byte tokens, a few
    merges, one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    merges = [("!", '"'), ('!"', "#"), ("a", "b"), ("Ġ", "x")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|end|>"])
    return tokenizer


def _vocabulary_gguf(path: Path, write_vocabulary: Any) -> None:
    """A one-tensor llama GGUF whose vocabulary ``write_vocabulary(writer)`` writes."""
    writer = gguf.GGUFWriter(path, "llama")
    vocab = write_vocabulary(writer)
    weights = _llama_weights(tied=True)
    weights["model.embed_tokens.weight"] = np.ones((vocab, HIDDEN), np.float32)
    for key, value in (
        ("block_count", BLOCKS),
        ("embedding_length", HIDDEN),
        ("feed_forward_length", FFN),
        ("attention.head_count", HEADS),
        ("context_length", 64),
    ):
        writer.add_uint32(f"llama.{key}", value)
    for name, values in weights.items():
        writer.add_tensor(_llama_cpp_name(name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_byte_level_vocabulary_becomes_the_same_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    source = _byte_level_tokenizer()
    size = source.get_vocab_size()
    tokens = [source.id_to_token(i) for i in range(size)]
    end = source.token_to_id("<|end|>")

    def vocabulary(writer: Any) -> int:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t == "<|end|>" else 1 for t in tokens])
        writer.add_token_merges(['! "', '!" #', "a b", "Ġ x"])
        writer.add_bos_token_id(end)
        writer.add_eos_token_id(end)
        writer.add_chat_template("{{ messages }}")
        return size

    _vocabulary_gguf(tmp_path / "m.gguf", vocabulary)
    report = modelport.convert(
        tmp_path / "m.gguf", tmp_path / "out", modelport.ConvertOptions(to="hf")
    )
    assert any("tokenizer.json rebuilt" in note for note in report.notes)
    rebuilt = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    for text in SAMPLES:
        expected = source.encode(text)
        assert rebuilt.encode(text).ids == expected.ids, text
        assert rebuilt.decode(expected.ids, skip_special_tokens=False) == text
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["bos_token"] == "<|end|>"
    assert config["add_bos_token"] is False
    assert config["chat_template"] == "{{ messages }}"
    assert config["model_max_length"] == 64


def _sentencepiece_model(tmp_path: Path) -> Any:
    """A small SentencePiece BPE model with byte fallback, trained by sentencepiece with
    Llama's settings."""
    import sentencepiece

    text = tmp_path / "corpus.txt"
    words = ["the quick brown fox", "jumps over the lazy dog", "hello world", "lorem ipsum"]
    text.write_text("\n".join(f"{a} {b}" for a in words for b in words) * 4)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "sp"),
        model_type="bpe",
        vocab_size=320,
        byte_fallback=True,
        normalization_rule_name="identity",  # as Llama's: spaces kept as they are
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))


def test_sentencepiece_vocabulary_encodes_as_sentencepiece(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    processor = _sentencepiece_model(tmp_path)
    size = processor.vocab_size()

    def kind(i: int) -> int:
        flags = (
            (processor.IsUnknown(i), 2),
            (processor.IsControl(i), 3),
            (processor.IsByte(i), 6),
        )
        return next((k for flag, k in flags if flag), 1)

    def vocabulary(writer: Any) -> int:
        writer.add_tokenizer_model("llama")
        writer.add_token_list([processor.IdToPiece(i) for i in range(size)])
        writer.add_token_scores([processor.GetScore(i) for i in range(size)])
        writer.add_token_types([kind(i) for i in range(size)])
        writer.add_unk_token_id(processor.unk_id())
        writer.add_bos_token_id(processor.bos_id())
        writer.add_eos_token_id(processor.eos_id())
        return size

    _vocabulary_gguf(tmp_path / "m.gguf", vocabulary)
    modelport.convert(tmp_path / "m.gguf", tmp_path / "out", modelport.ConvertOptions(to="hf"))
    rebuilt = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    texts = ["the lazy fox", "hello brown dog jumps", "Zebra ✓ quux", " two  spaces"]
    for text in texts:
        expected = [processor.bos_id(), *processor.encode(text)]  # llama.cpp adds BOS
        assert rebuilt.encode(text).ids == expected, text
        assert rebuilt.decode(expected, skip_special_tokens=True) == processor.decode(expected)


def test_no_vocabulary_noted(tmp_path: Path) -> None:
    _write_llama_gguf(tmp_path / "m.gguf", _llama_weights(tied=True))
    report = modelport.convert(
        tmp_path / "m.gguf", tmp_path / "out", modelport.ConvertOptions(to="hf")
    )
    assert any("no tokenizer written" in note for note in report.notes)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


# -- transformers models there and back (heavy) --------------------------------------------------
END = 260  # the id of _byte_level_tokenizer's <|end|>


def _tiny(arch: str) -> Any:
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    torch.manual_seed(0)
    if arch in ("llama", "mistral"):
        config = (LlamaConfig if arch == "llama" else MistralConfig)(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=261,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            initializer_range=0.2,  # attention far from uniform, so a wrong q/k order shows
            bos_token_id=END,
            eos_token_id=END,
        )
        return (LlamaForCausalLM if arch == "llama" else MistralForCausalLM)(config).eval()
    gpt2 = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=261,
        initializer_range=0.2,
        bos_token_id=END,
        eos_token_id=END,
    )
    return GPT2LMHeadModel(gpt2).eval()


# the largest logit difference allowed, as a share of the largest logit: measured 0 (f32) and
# 0.03 to 0.056 (q8_0) against the source; 0 against transformers' own loading of the GGUF
TOLERANCES = {"f32": 1e-6, "q8_0": 0.15}


@pytest.mark.heavy
@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_transformers_loads_the_folder_strictly_with_the_same_logits(
    tmp_path: Path, cli: Cli, arch: str, gguf_type: str
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _tiny(arch)
    source.save_pretrained(tmp_path / "src")
    _byte_level_tokenizer().save(str(tmp_path / "src" / "tokenizer.json"))
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    there = cli("convert", tmp_path / "src", gguf_dir / "m.gguf", "--gguf-type", gguf_type)
    assert there.code == 0, there.err
    back = cli("convert", gguf_dir / "m.gguf", tmp_path / "out", "--to", "hf")
    assert back.code == 0, back.err
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    expected_class = "GPT2LMHeadModel" if arch == "gpt2" else "LlamaForCausalLM"  # mistral too
    assert type(loaded).__name__ == expected_class
    assert {k: v for k, v in info.items() if v} == {}
    assert loaded.config.tie_word_embeddings == source.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in SAMPLES:
        assert tokenizer(text)["input_ids"] == _byte_level_tokenizer().encode(text).ids
    via_transformers = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="m.gguf").eval()
    torch.manual_seed(1)
    for length in (1, 7, 19):
        ids = torch.randint(0, source.config.vocab_size, (2, length))
        with torch.no_grad():
            expected = source(ids).logits
            got = loaded.eval()(ids).logits
            theirs = via_transformers(ids).logits.float()
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= TOLERANCES[gguf_type] * scale
        assert float((got - theirs).abs().max()) <= 1e-5 * scale
