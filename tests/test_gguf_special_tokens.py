"""Special tokens and chat templates in GGUF files written from Hugging Face folders.

Oracle: gguf-py's ``SpecialVocab``, which llama.cpp's converter uses to read them, writing
the same folder through gguf-py's ``GGUFWriter``; both files are read back by gguf-py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import modelport

gguf = pytest.importorskip("gguf")
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 32,
    "bos_token_id": 60,
    "eos_token_id": [61, 62],
}
CHAT = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
SETTINGS = {
    "with settings": {
        "bos_token": "<s>",
        "eos_token": {"content": "<|end|>", "special": True},
        "pad_token": "<|end|>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": CHAT,
    },
    "named templates": {
        "bos_token": "<s>",
        "chat_template": [
            {"name": "default", "template": CHAT},
            {"name": "tool use", "template": CHAT + "{{ tools }}"},
        ],
    },
    "no tokenizer_config.json": None,
}


def _folder(tmp_path: Path, settings: dict[str, Any] | None) -> Path:
    """A one-block Llama whose byte-level BPE tokenizer (saved by the tokenizers library)
    puts ``<s>`` first, as Llama 3's does."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    vocab = {chr(ord("a") + i): i for i in range(26)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(["<s>", "<|end|>", "<unk>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 26)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    if settings is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    shapes = {"embed_tokens": (64, 32), "norm": (32,), "layers.0.input_layernorm": (32,)}
    shapes |= {"layers.0.self_attn.q_proj": (32, 32), "layers.0.self_attn.k_proj": (32, 32)}
    shapes |= {"layers.0.self_attn.v_proj": (32, 32), "layers.0.self_attn.o_proj": (32, 32)}
    shapes |= {"layers.0.mlp.gate_proj": (64, 32), "layers.0.mlp.up_proj": (64, 32)}
    shapes |= {"layers.0.mlp.down_proj": (32, 64), "layers.0.post_attention_layernorm": (32,)}
    weights = {f"model.{k}.weight": torch.randn(v) for k, v in shapes.items()}
    save_file(weights | {"lm_head.weight": torch.randn(64, 32)}, str(folder / "model.safetensors"))
    return folder


def _special_fields(path: Path) -> dict[str, Any]:
    ignored = ("tokens", "token_type", "merges", "model", "pre", "scores")
    return {
        name: field.contents()
        for name, field in gguf.GGUFReader(path).fields.items()
        if name.startswith("tokenizer.") and name.split(".")[-1] not in ignored
    }


@pytest.mark.parametrize("variant", SETTINGS)
def test_special_tokens_as_gguf_py_reads_them(tmp_path: Path, variant: str) -> None:
    folder = _folder(tmp_path, SETTINGS[variant])
    out = tmp_path / "m.gguf"
    modelport.convert(folder, out, modelport.ConvertOptions(gguf_type="f16"))
    reference = tmp_path / "gguf_py.gguf"
    writer = gguf.GGUFWriter(reference, "llama")
    gguf.SpecialVocab(folder, n_vocab=64).add_to_gguf(writer, quiet=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    written, expected = _special_fields(out), _special_fields(reference)
    if "tokenizer.chat_templates" in expected:  # gguf-py lists the names from a set
        expected["tokenizer.chat_templates"] = sorted(expected["tokenizer.chat_templates"])
        written["tokenizer.chat_templates"] = sorted(written["tokenizer.chat_templates"])
    if "eos_token" not in (SETTINGS[variant] or {}):  # config.json's list: its first, where
        expected["tokenizer.ggml.eos_token_id"] = 61  # gguf-py writes none (llama.cpp: 11)
    assert written == expected
    assert written["tokenizer.ggml.add_bos_token"] is True
    assert ("tokenizer.chat_template" in written) == (SETTINGS[variant] is not None)


def test_merges_with_spaces_as_gguf_py_writes_them(tmp_path: Path) -> None:
    """tokenizers saves merges as pairs, whose parts may hold a space."""
    from tokenizers import Tokenizer, models

    folder = _folder(tmp_path, None)
    vocab = {"a": 0, " ": 1, "b": 2, "a ": 3, "a b": 4}
    merges = [("a", " "), ("a ", "b")]
    Tokenizer(models.BPE(vocab=vocab, merges=merges)).save(str(folder / "tokenizer.json"))
    assert isinstance(
        json.loads((folder / "tokenizer.json").read_text())["model"]["merges"][0], list
    )
    out = tmp_path / "m.gguf"
    modelport.convert(folder, out, modelport.ConvertOptions(gguf_type="f16"))
    written = gguf.GGUFReader(out).fields["tokenizer.ggml.merges"].contents()
    assert written == gguf.SpecialVocab(folder, load_merges=True).merges == ["a Ġ", "aĠ b"]
