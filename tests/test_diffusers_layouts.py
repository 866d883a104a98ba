"""diffusers folders: a pipeline (``model_index.json`` + component subfolders) reads as one
model, a component folder reads alone, and ``convert --to hf`` / ``--to hf-bin`` keep the
layout diffusers loads.

Oracles: diffusers itself (tiny ``UNet2DModel`` / ``DDPMPipeline`` and a tiny Stable Diffusion
pipeline with a transformers text encoder and tokenizer, random init, ``save_pretrained``;
``from_pretrained`` of every output, compared bit for bit with the models saved), safetensors'
``load_file``, ``torch.load(weights_only=True)`` and huggingface_hub's shard split."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import modelport
from modelport.errors import ConversionError, UsageError
from tests.conftest import digest, installed, torch_digest

pytestmark = installed("diffusers")

UNET_FILE = "diffusion_pytorch_model.safetensors"


def tiny_unet() -> Any:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(4, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2,
    ).eval()  # fmt: skip


def tiny_stable_diffusion(root: Path) -> Any:
    """A Stable Diffusion pipeline of tiny random parts: a diffusers UNet and VAE, a
    transformers CLIP text encoder and tokenizer, a scheduler; no safety checker."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        norm_num_groups=2, attention_head_dim=2,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(4,), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=2, layers_per_block=1,
    )  # fmt: skip
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8,
            intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=50,
            max_position_embeddings=16,
        )
    )  # fmt: skip
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@dataclass(frozen=True)
class Built:
    root: Path
    ddpm: Any  # DDPMPipeline
    sd: Any  # StableDiffusionPipeline

    def path(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    from diffusers import DDPMPipeline, DDPMScheduler

    root = tmp_path_factory.mktemp("diffusers")
    ddpm = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10))
    ddpm.save_pretrained(root / "ddpm")
    ddpm.save_pretrained(root / "ddpm-bin", safe_serialization=False)
    ddpm.unet.save_pretrained(
        root / "unet-bin-shards", max_shard_size="10KB", safe_serialization=False
    )
    sd = tiny_stable_diffusion(root)
    sd.save_pretrained(root / "sd")
    return Built(root, ddpm, sd)


def assert_same_weights(loaded: Any, original: Any, cast: torch.dtype | None = None) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        mine = got[name]
        if cast is not None and tensor.is_floating_point():  # loaded as float16 or float32
            mine, tensor = mine.to(cast), tensor.to(cast)
        assert torch_digest(mine) == torch_digest(tensor), name


def assert_reads_like(
    tensors: dict[str, Any], oracle: dict[str, torch.Tensor], prefix: str
) -> None:
    """modelport's tensors under ``prefix`` are the oracle's, bit for bit."""
    mine = {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}
    assert set(mine) == set(oracle)
    for name, tensor in oracle.items():
        assert digest(mine[name].numpy()) == torch_digest(tensor), name


# -- reading -------------------------------------------------------------------------------


def test_pipeline_reads_as_one_model(built: Built) -> None:
    """Every component's tensors, named <component>.<name>, bit for bit what safetensors
    loads from each component's file; the classes from model_index.json and the configs."""
    from safetensors.torch import load_file

    sd = built.path("sd")
    with modelport.open(sd) as model:
        assert model.format.value == "hf-dir"
        oracles = {
            "unet.": load_file(sd / "unet" / UNET_FILE),
            "vae.": load_file(sd / "vae" / UNET_FILE),
            "text_encoder.": load_file(sd / "text_encoder" / "model.safetensors"),
        }
        assert sum(len(o) for o in oracles.values()) == len(model.tensors)
        for prefix, oracle in oracles.items():
            assert_reads_like(dict(model.tensors), oracle, prefix)
        details = model.details
    assert details["layout"] == "diffusers-pipeline"
    assert details["pipeline"] == "StableDiffusionPipeline"
    parts = details["components"]
    assert parts["unet"] == {
        "class": "UNet2DConditionModel",
        "library": "diffusers",
        "tensors": len(oracles["unet."]),
        "files": [UNET_FILE],
    }
    assert parts["text_encoder"]["class"] == "CLIPTextModel"
    assert parts["text_encoder"]["files"] == ["model.safetensors"]
    assert parts["tokenizer"]["class"] == "CLIPTokenizer"
    assert "tokenizer_config.json" in parts["tokenizer"]["files"]
    assert "safety_checker" in details["absent_components"]
    report = modelport.inspect(sd)
    assert report.parameters == sum(t.numel() for o in oracles.values() for t in o.values())
    assert {t.name.partition(".")[0] for t in report.tensors} == {"unet", "vae", "text_encoder"}


def test_bin_folders_read_like_torch_load(built: Built) -> None:
    """A .bin pipeline and a component folder sharded as .bin: the tensors torch.load gives."""
    pipe = built.path("ddpm-bin")
    with modelport.open(pipe) as model:
        oracle = torch.load(pipe / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
        assert_reads_like(dict(model.tensors), oracle, "unet.")
    shards = built.path("unet-bin-shards")
    index = json.loads((shards / "diffusion_pytorch_model.bin.index.json").read_text())
    oracle = {}
    for shard in sorted(set(index["weight_map"].values())):
        oracle.update(torch.load(shards / shard, weights_only=True))
    with modelport.open(shards) as model:
        assert model.details["layout"] == "diffusers"
        assert model.details["class"] == "UNet2DModel"
        assert_reads_like(dict(model.tensors), oracle, "")


def test_a_component_folder_reads_alone(built: Built) -> None:
    from safetensors.torch import load_file

    unet = built.path("sd") / "unet"
    with modelport.open(unet) as model:
        assert_reads_like(dict(model.tensors), load_file(unet / UNET_FILE), "")
        assert model.details["files"] == [UNET_FILE]


def test_variants_read_when_alone_and_set_aside_otherwise(built: Built, tmp_path: Path) -> None:
    """diffusers' variant files (save_pretrained(variant="fp16")): read when the folder has
    nothing else, listed as left aside beside the plain name; --to hf writes the plain name."""
    from diffusers import UNet2DModel

    unet = built.ddpm.unet
    alone = tmp_path / "alone"
    copy.deepcopy(unet).to(torch.float16).save_pretrained(alone, variant="fp16")
    assert (alone / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with modelport.open(alone) as model:
        assert model.details["files"] == ["diffusion_pytorch_model.fp16.safetensors"]
        assert {t.dtype for t in model.tensors.values()} == {"float16"}
    both = tmp_path / "both"
    shutil.copytree(built.path("ddpm") / "unet", both)
    shutil.copy(alone / "diffusion_pytorch_model.fp16.safetensors", both)
    with modelport.open(both) as model:
        assert model.details["files"] == [UNET_FILE]
        assert model.details["ignored_weights"] == ["diffusion_pytorch_model.fp16.safetensors"]
    out = tmp_path / "out"
    modelport.convert(alone, out, modelport.ConvertOptions(to="hf", dtype="float32"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", UNET_FILE]
    assert_same_weights(UNet2DModel.from_pretrained(out), unet, torch.float16)


# -- converting a component ----------------------------------------------------------------


def test_component_bin_shards_to_hf(built: Built, tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    out = tmp_path / "unet"
    modelport.convert(built.path("unet-bin-shards"), out, modelport.ConvertOptions(to="hf"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", UNET_FILE]
    assert_same_weights(UNet2DModel.from_pretrained(out), built.ddpm.unet)


def test_component_sharded_as_diffusers_shards(built: Built, tmp_path: Path) -> None:
    """diffusers' shard names and index name, cut as huggingface_hub cuts them."""
    from diffusers import UNet2DModel
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file

    out = tmp_path / "unet"
    options = modelport.ConvertOptions(to="hf", shard_size="10KB")
    report = modelport.convert(built.path("ddpm") / "unet", out, options)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    count = len(set(index["weight_map"].values()))
    assert count > 1
    names = [
        f"diffusion_pytorch_model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, 1 + count)
    ]
    assert sorted(p.name for p in out.glob("*.safetensors")) == names
    stored = {}
    for name in names:
        stored.update(load_file(out / name))
    split = split_torch_state_dict_into_shards(
        {name: stored[name] for name, *_ in report.tensors},
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size=10_000,
    )
    assert split.tensor_to_filename == index["weight_map"]
    assert_same_weights(UNet2DModel.from_pretrained(out), built.ddpm.unet)


def test_component_to_hf_bin_sharded(built: Built, tmp_path: Path) -> None:
    """diffusers' .bin shards and index; diffusers finds a sharded .bin only when told to
    (use_safetensors=False), as it does for its own, and the report says so."""
    from diffusers import UNet2DModel

    out = tmp_path / "unet"
    options = modelport.ConvertOptions(to="hf-bin", shard_size="10KB")
    report = modelport.convert(built.path("ddpm") / "unet", out, options)
    index = json.loads((out / "diffusion_pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert all(s.startswith("diffusion_pytorch_model-0000") and s.endswith(".bin") for s in shards)
    assert any("use_safetensors=False" in note for note in report.notes)
    for shard in shards:
        assert set(torch.load(out / shard, weights_only=True)) == {
            k for k, v in index["weight_map"].items() if v == shard
        }
    assert_same_weights(UNet2DModel.from_pretrained(out, use_safetensors=False), built.ddpm.unet)


# -- converting a pipeline -----------------------------------------------------------------


def test_pipeline_to_hf_keeps_the_pipeline_layout(built: Built, tmp_path: Path) -> None:
    """Every component in its subfolder under its library's names (cast to float16, the
    text encoder's config.json says so), the rest carried byte for byte;
    StableDiffusionPipeline.from_pretrained loads it."""
    from diffusers import StableDiffusionPipeline

    sd, out = built.path("sd"), tmp_path / "sd16"
    report = modelport.convert(sd, out, modelport.ConvertOptions(to="hf", dtype="float16"))
    assert report.verified
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(str(p.relative_to(sd)) for p in sd.rglob("*") if p.is_file())
    for same in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"):
        assert (out / same).read_bytes() == (sd / same).read_bytes(), same
    for name in ("tokenizer_config.json", "tokenizer.json"):
        assert (out / "tokenizer" / name).read_bytes() == (sd / "tokenizer" / name).read_bytes()
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float16"
    loaded = StableDiffusionPipeline.from_pretrained(out)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, part), getattr(built.sd, part), torch.float16)


def test_pipeline_round_trip_through_bin(built: Built, tmp_path: Path) -> None:
    """A .bin pipeline to safetensors and a safetensors one to .bin: DDPMPipeline loads both,
    and torch.load(weights_only=True) reads the .bin."""
    from diffusers import DDPMPipeline

    out = tmp_path / "from-bin"
    modelport.convert(built.path("ddpm-bin"), out, modelport.ConvertOptions(to="hf"))
    assert (out / "unet" / UNET_FILE).is_file()
    assert_same_weights(DDPMPipeline.from_pretrained(out).unet, built.ddpm.unet)
    back = tmp_path / "to-bin"
    modelport.convert(built.path("ddpm"), back, modelport.ConvertOptions(to="hf-bin"))
    assert sorted(p.name for p in (back / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.bin",
    ]  # fmt: skip
    state = torch.load(back / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    assert set(state) == set(built.ddpm.unet.state_dict())
    assert_same_weights(DDPMPipeline.from_pretrained(back).unet, built.ddpm.unet)


def test_pipeline_into_an_existing_folder(built: Built, tmp_path: Path) -> None:
    """Only the files of the scheme written are replaced, folder by folder: another
    scheme's weights, a model card and files of the user's stay."""
    from diffusers import DDPMPipeline

    out = tmp_path / "repo"
    (out / "unet").mkdir(parents=True)
    (out / "README.md").write_text("# my pipeline\n")
    (out / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"older weights, another scheme")
    stale = out / "unet" / "diffusion_pytorch_model-00001-of-00009.safetensors"
    stale.write_bytes(b"an older shard set")
    with pytest.raises(ConversionError, match="already holds unet/diffusion_pytorch_model-0000"):
        modelport.convert(built.path("ddpm"), out, modelport.ConvertOptions(to="hf"))
    assert stale.exists()
    modelport.convert(built.path("ddpm"), out, modelport.ConvertOptions(to="hf", overwrite=True))
    assert not stale.exists()
    assert (out / "README.md").read_text() == "# my pipeline\n"
    assert (out / "unet" / "diffusion_pytorch_model.bin").read_bytes().startswith(b"older")
    assert_same_weights(DDPMPipeline.from_pretrained(out).unet, built.ddpm.unet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # nothing aside left over


def test_pipeline_names_must_stay_in_their_components(built: Built, tmp_path: Path) -> None:
    """Renaming across components is refused before anything is written; a selection of
    one component writes that one and says which were left out."""
    sd = built.path("sd")
    with pytest.raises(UsageError, match="written per component"):
        modelport.convert(sd, tmp_path / "a", modelport.ConvertOptions(to="hf", add_prefix="x."))
    assert not (tmp_path / "a").exists()
    options = modelport.ConvertOptions(to="hf", include=("unet.*",))
    report = modelport.convert(sd, tmp_path / "b", options)
    assert (tmp_path / "b" / "unet" / UNET_FILE).is_file()
    assert not (tmp_path / "b" / "vae").exists()
    assert any("no tensors taken from text_encoder, vae" in note for note in report.notes)


def test_a_pipeline_flattens_to_one_file(built: Built, tmp_path: Path) -> None:
    """--to safetensors writes every component into one file under the names inspect shows."""
    from safetensors.torch import load_file

    out = tmp_path / "sd.safetensors"
    modelport.convert(built.path("sd"), out)
    written = load_file(out)
    unet = built.sd.unet.state_dict()
    assert {n.removeprefix("unet.") for n in written if n.startswith("unet.")} == set(unet)
    assert {n.partition(".")[0] for n in written} == {"unet", "vae", "text_encoder"}
