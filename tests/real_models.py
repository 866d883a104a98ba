"""Tiny models of the kinds people take to an edge runtime, each with the example inputs
an export takes: the ultralytics-style detection head that caches in ``forward``, GPT-2 and
Llama built from a saved folder (as ``--model DIR`` builds them) and a diffusers UNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modelport.torch_models.building import resolve_model

KINDS = ("detection", "gpt2", "llama", "unet")


def real_model(kind: str, folder: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model of ``kind`` (saved under ``folder`` where it is a folder) and its inputs."""
    torch.manual_seed(0)
    if kind == "detection":
        from tests.test_export_survives import tiny_yolo

        return tiny_yolo(), {"x": torch.randn(2, 3, 32, 32)}
    if kind == "unet":
        from tests.test_export_survives import tiny_unet_folder

        inputs = {"sample": torch.randn(1, 3, 8, 8), "timestep": torch.tensor(7)}
        return resolve_model(tiny_unet_folder(folder)), inputs
    _decoder(kind).save_pretrained(folder / kind)
    ids = torch.randint(0, 100, (2, 8))
    return resolve_model(folder / kind), {"input_ids": ids}


def _decoder(kind: str) -> Any:
    import transformers

    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)
