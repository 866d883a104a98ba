"""What a Hugging Face folder's config files say about a model: the library that loads it, the
class, the hub repository it was fine-tuned from, the task. A model card's front matter and
its ``from_pretrained`` code come from here.

Everything here is read from files, so nothing is trusted as code: a class name reaches the
card only if it is a plain Python identifier, a hub id only if it has the shape of one
(``org/name``, not a local path), tags only in a narrow alphabet. A config file that cannot
be read tells nothing; the card says so instead of failing.
"""

from __future__ import annotations

import json
import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from modelport.errors import ModelportError
from modelport.formats import _hf_folder
from modelport.formats.sentence_transformers_dir import MODULES_JSON

MODEL_INDEX: Final = "model_index.json"  # a diffusers pipeline
ADAPTER_CONFIG: Final = "adapter_config.json"  # a PEFT adapter

# The hub's own rule for repository ids, less its length limit: one slash, no "--" or "..".
_HUB_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_TAG: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")

# transformers class-name suffixes that name one task, and the hub's pipeline tag for it;
# ``ForConditionalGeneration`` and the like serve several tasks and are left out.
_TASK_SUFFIXES: Final = (
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
    ("ForObjectDetection", "object-detection"),
    ("ForSemanticSegmentation", "image-segmentation"),
    ("ForCTC", "automatic-speech-recognition"),
    ("ForAudioClassification", "audio-classification"),
)
_PIPELINE_SUFFIXES: Final = (
    ("Img2ImgPipeline", "image-to-image"),
    ("InpaintPipeline", "image-to-image"),
    ("Text2VideoPipeline", "text-to-video"),
)
_TEXT_TO_IMAGE: Final = frozenset(
    {
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "PixArtAlphaPipeline",
        "PixArtSigmaPipeline",
        "SanaPipeline",
    }
)


@dataclass(frozen=True)
class HubConfig:
    """What the config beside (or inside) a model says. ``folder`` is what ``from_pretrained``
    takes; ``class_name`` is a plain identifier or ""."""

    library: str  # "transformers", "diffusers", "peft", "sentence-transformers"
    config_file: str  # the file that told, by name
    folder: Path
    class_name: str
    model_type: str
    base_model: str
    pipeline_tag: str
    custom_code: bool  # ``auto_map``: the class is code that ships with the folder


def hub_config(path: Path) -> tuple[HubConfig | None, str]:
    """The config that describes ``path`` (a folder's own, or the one beside a file), and a
    note when one is there but cannot be read."""
    folder = path if path.is_dir() else path.parent
    names: tuple[str, ...] = (_hf_folder.CONFIG_NAME,)
    if path.is_dir():
        names = (MODEL_INDEX, MODULES_JSON, _hf_folder.CONFIG_NAME, ADAPTER_CONFIG)
    for name in names:
        config_path = folder / name
        if not config_path.is_file():
            continue
        if name == MODULES_JSON:  # a list of modules: the folder's kind is what it tells
            return _sentence_transformer(folder), ""
        try:
            config = _hf_folder.load_json(config_path)
        except ModelportError as exc:
            return None, f"{name} was not read: {exc}"
        if not isinstance(config, dict):
            return None, f"{name} holds no JSON object"
        return _described(folder, name, config), ""
    return None, ""


def _described(folder: Path, name: str, config: dict[str, Any]) -> HubConfig | None:
    """The config's facts; a ``config.json`` that names neither a class nor a model type is
    some other program's config, and tells nothing."""
    if name == ADAPTER_CONFIG:
        return HubConfig(
            "peft", name, folder, "", "", _hub_id(config.get("base_model_name_or_path")), "", False
        )
    class_name = _identifier(config.get("_class_name"))
    if name == MODEL_INDEX or "_diffusers_version" in config:
        return HubConfig(
            "diffusers",
            name,
            folder,
            class_name,
            "",
            _hub_id(config.get("_name_or_path")),
            _pipeline_task(class_name) if name == MODEL_INDEX else "",
            False,
        )
    architectures = config.get("architectures")
    first = architectures[0] if isinstance(architectures, list) and architectures else None
    class_name = _identifier(first)
    model_type = config.get("model_type")
    if not class_name and not isinstance(model_type, str):
        return None
    return HubConfig(
        "transformers",
        name,
        folder,
        class_name,
        model_type if isinstance(model_type, str) and _TAG.fullmatch(model_type) else "",
        _hub_id(config.get("_name_or_path")),
        _task(class_name),
        isinstance(config.get("auto_map"), dict),
    )


def _sentence_transformer(folder: Path) -> HubConfig:
    """A sentence-transformers model: ``modules.json`` names its modules, the top folder's
    ``config.json`` (when there is one) the transformer it embeds with."""
    inner, _ = hub_config(folder / _hf_folder.CONFIG_NAME)
    return HubConfig(
        "sentence-transformers",
        MODULES_JSON,
        folder,
        "SentenceTransformer",
        inner.model_type if inner else "",
        inner.base_model if inner else "",
        "sentence-similarity",
        False,
    )


def _identifier(value: Any) -> str:
    """A class name fit to be written into code: a plain identifier, or ""."""
    if isinstance(value, str) and value.isidentifier() and not keyword.iskeyword(value):
        return value
    return ""


def _hub_id(value: Any) -> str:
    """``org/name`` when ``value`` has a hub repository's shape; a local path gives ""."""
    if not isinstance(value, str) or not _HUB_ID.fullmatch(value):
        return ""
    if ".." in value or "--" in value or value.endswith((".", "-")):
        return ""
    return value


def _task(class_name: str) -> str:
    for suffix, task in _TASK_SUFFIXES:
        if class_name.endswith(suffix):
            return task
    return ""


def _pipeline_task(class_name: str) -> str:
    if class_name in _TEXT_TO_IMAGE:
        return "text-to-image"
    for suffix, task in _PIPELINE_SUFFIXES:
        if class_name.endswith(suffix):
            return task
    return ""


def front_matter(config: HubConfig | None, format_name: str) -> dict[str, Any]:
    """The card's metadata for the hub: what the config tells, and the format as a tag."""
    tags = ["modelport", format_name]
    found: dict[str, Any] = {}
    if config is not None:
        found["library_name"] = config.library
        if config.model_type:
            tags.append(config.model_type)
    found["tags"] = [t for i, t in enumerate(tags) if _TAG.fullmatch(t) and t not in tags[:i]]
    if config is not None and config.pipeline_tag:
        found["pipeline_tag"] = config.pipeline_tag
    if config is not None and config.base_model:
        found["base_model"] = config.base_model
    return found


def yaml_text(data: dict[str, Any]) -> str:
    """The front matter as YAML. Every value is a string or a list of strings; JSON strings
    are YAML's double-quoted scalars, so any text stays one scalar."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(str(item))}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(str(value))}")
    return "\n".join(lines) + "\n"
