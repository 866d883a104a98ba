"""Configuration keys and files that make Hugging Face loaders import code: each is reported
as ``remote-code`` (suspicious) naming the code, and each has a benign twin that stays safe.
transformers' own AutoConfig is the oracle that an ``auto_map`` really is imported."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import modelport
from modelport.scanning import hf_code

SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "image_encoder": [None, None],
}
MINILM_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {
        "idx": 2,
        "name": "2",
        "path": "2_Normalize",
        "type": "sentence_transformers.models.Normalize",
    },
]
LORA = {
    "peft_type": "LORA",
    "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
    "r": 8,
    "target_modules": ["q_proj", "v_proj"],
    "auto_mapping": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
}

# file, attack document, what the message must name, benign twin
CASES: list[tuple[str, str, Any, str, Any]] = [
    (
        "auto_map-repo",
        "config.json",
        {"model_type": "x", "auto_map": {"AutoModel": "evil/repo--modeling_x.XModel"}},
        "modeling_x.XModel from the repository evil/repo",
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    ),
    (
        "auto_map-legacy-tokenizer",
        "tokenizer_config.json",
        {"auto_map": ["tokenization_x.XTokenizer", None]},
        "tokenization_x.XTokenizer",
        {"tokenizer_class": "LlamaTokenizer", "model_max_length": 2048},
    ),
    (
        "auto_map-image-processor",
        "preprocessor_config.json",
        {"auto_map": {"AutoImageProcessor": {"pil": "proc.PilX", "torchvision": "proc.FastX"}}},
        "proc.FastX, proc.PilX",
        {"image_processor_type": "CLIPImageProcessor", "do_resize": True},
    ),
    (
        "auto_map-processor",
        "processor_config.json",
        {"auto_map": {"AutoProcessor": "processing_x.XProcessor"}},
        "processing_x.XProcessor",
        {"processor_class": "LlavaProcessor"},
    ),
    (
        "custom_pipelines",
        "config.json",
        {"model_type": "x", "custom_pipelines": {"pair-cls": {"impl": "pair.PairPipeline"}}},
        "pair.PairPipeline",
        {"model_type": "bert", "id2label": {"0": "NEG", "1": "POS"}},
    ),
    (
        "attn_implementation-hub-kernel",
        "config.json",
        {"model_type": "llama", "attn_implementation": "evil-org/flash-kernel"},
        "evil-org/flash-kernel",
        {"model_type": "llama", "attn_implementation": "sdpa"},
    ),
    (
        "diffusers-custom-pipeline",
        "model_index.json",
        {**SD15_INDEX, "_class_name": ["pipeline", "MyPipeline"]},
        "pipeline.py",
        SD15_INDEX,
    ),
    (
        "diffusers-custom-component",
        "model_index.json",
        {**SD15_INDEX, "unet": ["my_unet", "MyUNet"]},
        "unet: my_unet",
        SD15_INDEX,
    ),
    (
        "diffusers-modular-type-hint",
        "modular_model_index.json",
        {
            "_class_name": "StableDiffusionXLModularPipeline",
            "_diffusers_version": "0.35.0",
            "unet": [None, None, {"repo": "x/y", "type_hint": ["evil_lib", "UNet"]}],
        },
        "unet: evil_lib",
        {
            "_class_name": "StableDiffusionXLModularPipeline",
            "_diffusers_version": "0.35.0",
            "unet": [None, None, {"repo": "x/y", "type_hint": ["diffusers", "UNet2DModel"]}],
        },
    ),
    (
        "sentence-transformers-module",
        "modules.json",
        [*MINILM_MODULES, {"idx": 3, "name": "3", "path": "3_Custom", "type": "custom.Layer"}],
        "custom.Layer",
        MINILM_MODULES,
    ),
    (
        "cross-encoder-activation",
        "config.json",
        {"model_type": "bert", "sentence_transformers": {"activation_fn": "evil.activate"}},
        "evil.activate",
        {
            "model_type": "bert",
            "sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Sigmoid"},
        },
    ),
    (
        "peft-auto-mapping",
        "adapter_config.json",
        {**LORA, "auto_mapping": {"base_model_class": "X", "parent_library": "evil_lib"}},
        "evil_lib",
        {
            **LORA,
            "auto_mapping": {
                "base_model_class": "LlamaModel",
                "parent_library": "transformers.models.llama.modeling_llama",
            },
        },
    ),
    (
        "peft-megatron-core",
        "adapter_config.json",
        {**LORA, "megatron_config": {"tp": 2}, "megatron_core": "evil.core"},
        "evil.core",
        {**LORA, "megatron_config": {"tp": 2}},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_code_named_by_a_config_is_suspicious_and_its_twin_safe(
    tmp_path: Path, case: tuple[str, str, Any, str, Any]
) -> None:
    _, name, attack, named, twin = case
    path = tmp_path / name
    path.write_text(json.dumps(attack))
    report = modelport.scan(path)
    assert report.verdict == "suspicious"
    (finding,) = report.files[0].findings
    assert (finding.rule, finding.severity.value, finding.member) == ("remote-code", "medium", name)
    assert named in finding.message
    path.write_text(json.dumps(twin))
    twin_report = modelport.scan(path)
    assert twin_report.files[0].findings == ()
    assert twin_report.verdict == "safe"


def test_messages_say_which_loader_imports_it_and_when(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"auto_map": {"AutoConfig": "configuration_x.XConfig"}})
    )
    (finding,) = modelport.scan(tmp_path / "config.json").files[0].findings
    assert finding.message.startswith(
        "auto_map names code to run (configuration_x.XConfig): transformers' Auto classes and "
        "pipeline() import the named module from the folder (or the repository before '--') "
        "when trust_remote_code=True"
    )
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "", "type": "mine.Layer"}]))
    (finding,) = modelport.scan(tmp_path / "modules.json").files[0].findings
    assert "from a local folder even without trust_remote_code" in finding.message


def test_python_files_in_a_model_folder_are_named(tmp_path: Path) -> None:
    """Suspicious where a loader imports them (``custom_generate/generate.py``; a module a
    configuration names); any other script is named as information (tests/
    test_training_folders.py has the auto_map case and DeepSpeed's zero_to_fp32.py)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "modeling_x.py").write_text("import os\n")
    (tmp_path / "custom_generate").mkdir()
    (tmp_path / "custom_generate" / "generate.py").write_text("def generate(model): ...\n")
    report = modelport.scan(tmp_path)
    assert report.verdict == "suspicious"
    flagged = sorted((f.rule, f.member) for file in report.files for f in file.findings)
    assert flagged == [
        ("python-source", "modeling_x.py"),  # no configuration names it
        ("remote-code", "custom_generate/generate.py"),
    ]
    generate = next(f for file in report.files for f in file.findings if "generate" in f.member)
    assert "custom_generate/generate.py replaces model.generate" in generate.message


def test_an_ordinary_model_folder_is_safe(tmp_path: Path) -> None:
    files = {
        "config.json": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True},
        "tokenizer_config.json": {
            "tokenizer_class": "LlamaTokenizer",
            "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
            "{% endfor %}",
        },
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
        "model_index.json": SD15_INDEX,
        "unet_config.json": {
            "_class_name": "UNet2DModel",
            "_diffusers_version": "0.30.0",
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        },
        "modules.json": MINILM_MODULES,
        "adapter_config.json": LORA,
    }
    for name, document in files.items():
        (tmp_path / name).write_text(json.dumps(document))
    report = modelport.scan(tmp_path)
    assert [f for file in report.files for f in file.findings] == []
    assert report.verdict == "safe"


def test_transformers_imports_what_auto_map_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oracle for the table's first row: AutoConfig refuses without trust_remote_code,
    and with it imports configuration_x.py from the folder, which runs its top level."""
    import transformers.dynamic_module_utils as dynamic
    from transformers import AutoConfig

    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "IMPORTED"
    (model / "config.json").write_text(
        json.dumps(
            {"model_type": "x-remote", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}
        )
    )
    (model / "configuration_x.py").write_text(
        "from pathlib import Path\nfrom transformers import PretrainedConfig\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class XConfig(PretrainedConfig):\n    model_type = 'x-remote'\n"
    )
    report = modelport.scan(model)
    flagged = sorted((f.rule, f.member) for file in report.files for f in file.findings)
    assert flagged == [("remote-code", "config.json"), ("remote-code", "configuration_x.py")]
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoConfig.from_pretrained(model, trust_remote_code=False)
        assert not marker.exists()
        AutoConfig.from_pretrained(model, trust_remote_code=True)
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            monkeypatch.delitem(sys.modules, name)
    assert marker.read_text() == "ran"


def test_every_loader_row_names_its_source() -> None:
    """The table is the documentation: every row says what is read, what runs, and where
    in the loader's own code."""
    assert set(hf_code.LOADERS) == {
        "auto_map",
        "custom_pipelines",
        "attn_implementation",
        "custom_pipeline_class",
        "custom_component",
        "sentence_transformers_module",
        "cross_encoder_activation",
        "dense_activation",
        "peft_auto_mapping",
        "peft_megatron_core",
        "python_file",
    }
    for name, loader in hf_code.LOADERS.items():
        package = loader.source.split(":")[0]
        assert package in {"transformers", "diffusers", "sentence-transformers", "peft"}, name
        assert re.search(r"[\w/]+\.py [\w.]+", loader.source) is not None, name
    assert {"stable_diffusion", "kandinsky", "transformers"} <= hf_code.DIFFUSERS_LIBRARIES
