"""``convert --to gguf --gguf-type`` for every block type gguf-py quantizes, and
``tokenizer.ggml.pre`` named as llama.cpp's converter names it.

Oracles: gguf-py's ``quants.quantize`` (the bytes of every block type, on the same float32
values) and its reader; the ``tokenizers`` library encoding llama.cpp's check text (and, in a
heavy test, transformers' ``AutoTokenizer``, which llama.cpp's converter runs); transformers
loading the quantized GGUF of a tiny Llama (it dequantizes with gguf-py) with its logits
compared with the source model's (heavy)."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import modelport
from modelport.conversion import gguf_quantizing, gguf_vocab
from modelport.formats.gguf import quantizing
from modelport.tensors import Storage, TensorRef, byte_array
from modelport.transfer.write_plan import OutputTensor

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

TYPES = sorted(quantizing.QUANTIZERS)
TERNARY = ("TQ1_0", "TQ2_0")
# llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre): the text it tokenizes
LLAMA_CPP_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天\uff5e ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


def _code(block_type: str) -> Any:
    return gguf.GGMLQuantizationType[block_type]


def _hard_values(elements: int) -> np.ndarray[Any, Any]:
    """Rows that stress the rounding: several magnitudes, zero and constant blocks, ties,
    values that are float16-exact and ones that are not."""
    rng = np.random.default_rng(7)
    rows = [rng.standard_normal(elements) * scale for scale in (1e-4, 1.0, 3e3)]
    rows.append(np.zeros(elements))
    rows.append(np.full(elements, -2.5))
    rows.append(np.round(rng.standard_normal(elements) * 4) / 2)
    rows.append(rng.standard_normal(elements).astype(np.float16))
    return np.stack(rows).astype(np.float32)


def test_every_type_gguf_py_quantizes_is_written() -> None:
    probe = np.ones((1, 256), dtype=np.float32)
    quantized = set()
    for code in gguf.GGMLQuantizationType:
        try:
            quantize(probe, code)
        except (NotImplementedError, gguf.QuantError):
            continue
        quantized.add(code.name)
    assert quantized - {"F32", "F16", "BF16"} == set(TYPES)
    assert {name: f"{name.lower()}" for name in TYPES}.items() <= {
        v: k for k, v in gguf_quantizing.GGUF_TYPES.items()
    }.items()


@pytest.mark.parametrize("block_type", TYPES)
def test_blocks_are_gguf_py_bytes(block_type: str) -> None:
    values = _hard_values(256)
    got = quantizing.quantize(values, block_type)
    assert got.tobytes() == quantize(values, _code(block_type)).tobytes()


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "layer.weight": torch.randn(8, 512),
        "layer.bias": torch.randn(512),
        "odd.weight": torch.randn(4, 48),  # rows of 48: no type's blocks fit
        "half.weight": torch.randn(2, 256).to(torch.bfloat16),
        "steps": torch.arange(4),
    }


@pytest.mark.parametrize("block_type", TYPES)
def test_convert_quantizes_like_gguf_py(tmp_path: Path, block_type: str) -> None:
    src = tmp_path / "s.pt"
    state = _state()
    torch.save(state, src)
    out = tmp_path / "q.gguf"
    options = modelport.ConvertOptions(gguf_type=block_type.lower())
    report = modelport.convert(src, out, options)
    assert report.verified
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert types == {
        "layer.weight": block_type,
        "layer.bias": "F32",
        "odd.weight": "F32",
        "half.weight": block_type,
        "steps": "I64",
    }
    for name in ("layer.weight", "half.weight"):
        expected = quantize(state[name].float().numpy(), _code(block_type))
        assert tensors[name].data.tobytes() == expected.tobytes()
    assert any("odd.weight stays float32, not " + block_type in note for note in report.notes)
    with modelport.open(out) as written:
        assert written.tensors["layer.weight"].dtype == block_type
        assert written.tensors["layer.weight"].shape == (8, 512)
    shown = modelport.inspect(out).to_json()
    assert block_type in json.dumps(shown)


@pytest.mark.parametrize("block_type", ["Q4_1", "MXFP4", "TQ1_0"])
def test_quantized_in_bounded_memory(tmp_path: Path, block_type: str) -> None:
    """A 16 MiB matrix quantized a slice at a time: never the whole tensor in memory."""
    from safetensors.numpy import save_file

    big = np.random.default_rng(1).standard_normal((1024, 4096)).astype(np.float32)
    src = tmp_path / "big.safetensors"
    save_file({"big": big}, src)
    out = tmp_path / "big.gguf"
    tracemalloc.start()
    try:
        options = modelport.ConvertOptions(gguf_type=block_type.lower(), verify=False)
        modelport.convert(src, out, options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, peak
    (stored,) = gguf.GGUFReader(out).tensors
    assert stored.data.tobytes() == quantize(big, _code(block_type)).tobytes()


def _ref(name: str, shape: tuple[int, ...], dtype: str) -> OutputTensor:
    data = np.zeros(shape, dtype=np.float32)
    storage = Storage(None, 0, data.nbytes, reader=lambda: byte_array(data.tobytes()))
    return OutputTensor(name, dtype, TensorRef("float32", shape, storage))


def test_llama_cpp_names_keep_llama_cpp_types() -> None:
    planned = [
        _ref("token_embd.weight", (64, 256), "TQ1_0"),
        _ref("output.weight", (64, 256), "TQ1_0"),
        _ref("position_embd.weight", (64, 256), "TQ1_0"),
        _ref("blk.0.attn_norm.weight", (256,), "TQ1_0"),
        _ref("blk.0.attn_q.weight", (256, 256), "TQ1_0"),
        _ref("blk.0.attn_q.bias", (256,), "TQ1_0"),
        _ref("blk.0.ffn_down.weight", (256, 96), "TQ1_0"),
    ]
    kept = gguf_quantizing.settled(planned, "float32", llama_names=True)
    assert [t.dtype for t in kept.tensors] == [
        "float16",
        "float16",
        "float32",
        "float32",
        "TQ1_0",
        "float32",
        "float32",
    ]
    assert any("blk.0.ffn_down.weight stays float32" in note for note in kept.notes)
    assert any("token_embd.weight" in note and "float16" in note for note in kept.notes)
    plain = gguf_quantizing.settled(planned, "float16", llama_names=False)
    assert [t.dtype for t in plain.tensors][:2] == ["TQ1_0", "TQ1_0"]
    assert plain.tensors[3].dtype == "float16"


# -- tokenizer.ggml.pre -------------------------------------------------------------------------
BOS = 258  # after the 256 bytes and two merges


def _byte_level_tokenizer(folder: Path, bos: bool = False) -> Path:
    """A tiny byte-level BPE tokenizer (every byte, two merges), saved by the tokenizers
    library; with ``bos``, a post-processor that puts ``<s>`` first, as Llama 3's does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("e", "e")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.normalizer = normalizers.NFC()  # unlike GPT-2's split: only its hash names it
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>"])
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)]
        )
    folder.mkdir(exist_ok=True)
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def _llama_folder(tmp_path: Path, hidden: int = 64) -> Path:
    """A Llama folder (config.json, safetensors), no tokenizer yet."""
    from safetensors.torch import save_file

    folder = tmp_path / "llama"
    folder.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 260,
        "max_position_embeddings": 64,
        "bos_token_id": BOS,
        "eos_token_id": BOS,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    prefix = "model.layers.0"
    shapes = {
        "model.embed_tokens.weight": (260, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (260, hidden),
        f"{prefix}.self_attn.q_proj.weight": (hidden, hidden),
        f"{prefix}.self_attn.k_proj.weight": (hidden // 2, hidden),
        f"{prefix}.self_attn.v_proj.weight": (hidden // 2, hidden),
        f"{prefix}.self_attn.o_proj.weight": (hidden, hidden),
        f"{prefix}.mlp.gate_proj.weight": (2 * hidden, hidden),
        f"{prefix}.mlp.up_proj.weight": (2 * hidden, hidden),
        f"{prefix}.mlp.down_proj.weight": (hidden, 2 * hidden),
        f"{prefix}.input_layernorm.weight": (hidden,),
        f"{prefix}.post_attention_layernorm.weight": (hidden,),
    }
    save_file({k: torch.randn(v) for k, v in shapes.items()}, str(folder / "model.safetensors"))
    return folder


def _check_hash_of(path: Path) -> str:
    """llama.cpp's hash, computed here with the tokenizer itself."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path)).encode(LLAMA_CPP_CHECK_TEXT).ids
    return hashlib.sha256(str(ids).encode()).hexdigest()


def test_check_text_is_llama_cpp_s() -> None:
    assert gguf_vocab.CHECK_TEXT == LLAMA_CPP_CHECK_TEXT


def test_pre_tokenizer_named_by_llama_cpp_s_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _llama_folder(tmp_path)
    digest = _check_hash_of(_byte_level_tokenizer(folder))
    out = tmp_path / "unknown.gguf"
    report = modelport.convert(folder, out, modelport.ConvertOptions(gguf_type="q4_0"))
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == "default"
    assert any(digest in note and "may split text" in note for note in report.notes)
    monkeypatch.setitem(gguf_vocab.PRE_TOKENIZERS, digest, "gpt-2")
    known = tmp_path / "known.gguf"
    report = modelport.convert(folder, known, modelport.ConvertOptions(gguf_type="q4_0"))
    assert gguf.GGUFReader(known).fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert not any("tokenizer.ggml.pre" in note for note in report.notes)
    assert gguf.GGUFReader(known).fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0


@pytest.mark.heavy
def test_hash_is_what_llama_cpp_s_converter_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp's converter encodes with transformers' AutoTokenizer, special tokens added:
    a tokenizer whose post-processor puts a BOS first (Llama 3's) hashes with it."""
    from transformers import AutoTokenizer

    folder = _llama_folder(tmp_path)
    _byte_level_tokenizer(folder, bos=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    ids = AutoTokenizer.from_pretrained(folder).encode(LLAMA_CPP_CHECK_TEXT)
    assert ids[0] == BOS  # the BOS is part of what is hashed
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    monkeypatch.setitem(gguf_vocab.PRE_TOKENIZERS, digest, "llama-bpe")
    out = tmp_path / "m.gguf"
    modelport.convert(folder, out, modelport.ConvertOptions(gguf_type="q8_0"))
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"


# -- transformers runs the quantized files --------------------------------------------------------
# the largest logit difference allowed, as a share of the largest logit, for a Llama of hidden
# size 256 initialised with transformers' defaults; ternary types keep only the signs of a
# random model, so their logits are only checked to be finite
TOLERANCES = {"Q8_0": 0.05, "Q5_0": 0.25, "Q5_1": 0.25, "Q4_0": 0.5, "Q4_1": 0.5, "MXFP4": 0.6}


@pytest.mark.heavy
@pytest.mark.parametrize("block_type", TYPES)
def test_transformers_loads_the_quantized_llama(tmp_path: Path, block_type: str) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    source = LlamaForCausalLM(config).eval()
    source.save_pretrained(tmp_path / "src")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    options = modelport.ConvertOptions(gguf_type=block_type.lower())
    report = modelport.convert(tmp_path / "src", out_dir / "m.gguf", options)
    assert report.verified
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file="m.gguf").eval()
    down = source.model.layers[1].mlp.down_proj.weight.detach().numpy()
    expected = dequantize(quantize(down, _code(block_type)), _code(block_type))
    got = loaded.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    assert np.array_equal(got, expected)
    torch.manual_seed(1)
    worst = 0.0
    for length in (1, 7):
        ids = torch.randint(0, config.vocab_size, (2, length))
        with torch.no_grad():
            reference, logits = source(ids).logits, loaded(ids).logits.float()
        assert bool(torch.isfinite(logits).all())
        error = float((logits - reference).abs().max() / reference.abs().max())
        worst = max(worst, error)
    print(f"{block_type}: largest logit error {worst:.3f} of the largest logit")
    if block_type not in TERNARY:
        assert worst <= TOLERANCES[block_type]
