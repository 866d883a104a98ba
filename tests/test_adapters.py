"""Adapters: PEFT folders read as adapters and convert to what PEFT loads; kohya-style LoRA
files are recognised and described.

Oracles: peft itself (``get_peft_model`` on a tiny BERT, random init, non-zero LoRA weights,
``save_pretrained`` as safetensors and as ``.bin``; ``PeftModel.from_pretrained`` of every
output), safetensors' ``load_file``. No library writes kohya files: they are built here the
way kohya-ss sd-scripts names them (``lora_unet_*`` / ``lora_te_*`` modules with
``lora_down`` / ``lora_up`` / ``alpha``, ``ss_*`` metadata), and diffusers' own kohya
converter (``StableDiffusionPipeline.lora_state_dict``) is the check that they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import modelport
from tests.conftest import digest, installed, torch_digest

pytestmark = installed("peft")


def base_model() -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    config = BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        vocab_size=50, max_position_embeddings=32,
    )  # fmt: skip
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """The PEFT model, its adapter folder in safetensors and in .bin."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
    )
    torch.manual_seed(6)
    model = get_peft_model(base_model(), config)
    model.save_pretrained(root / "adapter")
    model.save_pretrained(root / "adapter-bin", safe_serialization=False)
    return model, root / "adapter", root / "adapter-bin"


def lora_weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def assert_same_adapter(loaded: Any, original: Any) -> None:
    got, want = lora_weights(loaded), lora_weights(original)
    assert set(got) == set(want) and want
    for name, tensor in want.items():
        assert torch_digest(got[name]) == torch_digest(tensor), name


def test_peft_folder_reads_as_an_adapter(adapter: tuple[Any, Path, Path]) -> None:
    from safetensors.torch import load_file

    _, folder, _ = adapter
    oracle = load_file(folder / "adapter_model.safetensors")
    with modelport.open(folder) as model:
        assert set(model.tensors) == set(oracle)
        for name, tensor in oracle.items():
            assert digest(model.tensors[name].numpy()) == torch_digest(tensor), name
        details = model.details
    assert details["layout"] == "peft-adapter"
    assert details["peft_type"] == "LORA"
    assert (details["r"], details["lora_alpha"]) == (4, 8)
    assert sorted(details["target_modules"]) == ["query", "value"]
    assert details["lora"] == {"style": "peft", "algorithm": "lora", "modules": 4, "ranks": [4]}


def test_peft_bin_to_hf_and_back(adapter: tuple[Any, Path, Path], tmp_path: Path) -> None:
    """adapter_model.bin to adapter_model.safetensors and back to .bin, with
    adapter_config.json carried: PeftModel.from_pretrained loads each."""
    from peft import PeftModel

    model, _, bin_folder = adapter
    out = tmp_path / "st"
    modelport.convert(bin_folder, out, modelport.ConvertOptions(to="hf", shard_size="1KB"))
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not list(out.glob("*.index.json"))  # PEFT loads no shards: one file
    assert_same_adapter(PeftModel.from_pretrained(base_model(), out), model)
    back = tmp_path / "bin"
    modelport.convert(out, back, modelport.ConvertOptions(to="hf-bin"))
    assert (back / "adapter_model.bin").is_file()
    assert not (back / "adapter_model.safetensors").exists()
    assert_same_adapter(PeftModel.from_pretrained(base_model(), back), model)


KOHYA_MODULES = {  # name: (out features, in features), as sd-scripts names SD 1.x modules
    "lora_unet_down_blocks_0_attentions_0_proj_in": (8, 4),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),
}
KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_base_model_version": "sd_v1",
    "ss_output_name": "tiny",
}


def kohya_file(path: Path) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(7)
    tensors = {}
    for module, (out_features, in_features) in KOHYA_MODULES.items():
        tensors[f"{module}.lora_down.weight"] = torch.randn(4, in_features)
        tensors[f"{module}.lora_up.weight"] = torch.randn(out_features, 4)
        tensors[f"{module}.alpha"] = torch.tensor(2.0)
    save_file(tensors, path, metadata=KOHYA_METADATA)
    return path


def test_kohya_lora_described(tmp_path: Path) -> None:
    """Network dim and alpha from the metadata, ranks and targets from the names; diffusers'
    kohya converter finds the same modules and alphas."""
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    path = kohya_file(tmp_path / "tiny_lora.safetensors")
    report = modelport.inspect(path)
    assert report.format == "safetensors"
    lora = report.details["lora"]
    assert lora == {
        "style": "kohya",
        "algorithm": "lora",
        "modules": 3,
        "targets": {"text_encoder": 1, "unet": 2},
        "ranks": [4],
        "network_module": "networks.lora",
        "network_dim": 4,
        "network_alpha": 2.0,
        "base_model_version": "sd_v1",
        "output_name": "tiny",
    }
    _, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    assert len(alphas) == lora["modules"]
    assert set(alphas.values()) == {lora["network_alpha"]}
    out = tmp_path / "copy.safetensors"
    modelport.convert(path, out)  # the training record travels with the weights
    assert {k: v for k, v in modelport.open(out).metadata.items() if k.startswith("ss_")} == (
        KOHYA_METADATA
    )


def test_plain_safetensors_has_no_lora_details(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"lora_like.weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    assert "lora" not in modelport.inspect(tmp_path / "plain.safetensors").details


@pytest.mark.parametrize(
    ("suffixes", "algorithm"),
    [
        (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"), "loha"),
        (("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"), "lokr"),
    ],
)
def test_lycoris_names_described(tmp_path: Path, suffixes: tuple[str, ...], algorithm: str) -> None:
    """LyCORIS files keep kohya's module names with their own weight names."""
    from safetensors.torch import save_file

    modules = ("lora_unet_mid_block_attentions_0_proj_in", "lora_te1_text_model_final_layer_norm")
    tensors = {f"{m}.{s}": torch.ones(2, 2) for m in modules for s in suffixes}
    save_file(tensors, tmp_path / "lycoris.safetensors", {"ss_network_module": "lycoris.kohya"})
    lora = modelport.inspect(tmp_path / "lycoris.safetensors").details["lora"]
    assert (lora["style"], lora["algorithm"], lora["modules"]) == ("kohya", algorithm, 2)
    assert lora["targets"] == {"unet": 1, "text_encoder": 1}
    assert lora["network_module"] == "lycoris.kohya"
