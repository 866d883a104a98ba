"""diffusers pipelines: ``model_index.json`` and one subfolder per component.

Layout (diffusers ``DiffusionPipeline.save_pretrained``):

- ``model_index.json`` MUST be a JSON object: ``_class_name`` (the pipeline's class),
  ``_diffusers_version``, and for each component ``name: [library, class]``
  (``["diffusers", "UNet2DModel"]``, ``["transformers", "CLIPTextModel"]``; ``[null,
  null]`` for a component saved as None, such as a removed safety checker); other keys
  are the pipeline's own configuration (``requires_safety_checker``);
- a component MAY have a subfolder of its name: a diffusers model (``unet/``, ``vae/``,
  ``transformer/``: ``config.json`` + ``diffusion_pytorch_model.safetensors``, sharded with
  ``diffusion_pytorch_model.safetensors.index.json``, or ``.bin``), a transformers model
  (``text_encoder/``: ``config.json`` + ``model.safetensors``), or configuration only
  (``scheduler/scheduler_config.json``, ``tokenizer/``, ``feature_extractor/``);
- component names MUST be plain names: one that would leave the folder is refused.

Read as one model: each component folder that holds weights is read as a Hugging Face
folder (``_hf_folder``) and its tensors are named ``<component>.<name>``
(``unet.conv_in.weight``), components in ``model_index.json`` order. ``details`` gives the
pipeline's class and diffusers version and, per component, its class, library, tensor
count and files; components saved as None are listed apart. Weight files at the
pipeline's top (the single-file checkpoint the Stable Diffusion repositories keep beside
the folders) are listed under ``ignored_weights`` and not read; subfolders with weights
that ``model_index.json`` does not name are ignored with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from modelport.errors import CorruptFileError
from modelport.formats import _hf_folder
from modelport.formats.protocol import Contents
from modelport.tensors import TensorRef

MODEL_INDEX: Final = "model_index.json"
WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
SEPARATOR: Final = "."  # between a component's name and its tensors' names


@dataclass(frozen=True)
class Component:
    """One entry of ``model_index.json``: its library and class (None when saved as None),
    and its folder when the pipeline has one."""

    name: str
    library: str | None
    class_name: str | None
    folder: Path | None

    @property
    def has_weights(self) -> bool:
        return self.folder is not None and _hf_folder.sniff_folder(self.folder)


def sniff(path: Path) -> bool:
    """A folder with ``model_index.json`` and a subfolder that holds a model's weights."""
    if not (path / MODEL_INDEX).is_file():
        return False
    return any(
        sub.is_dir() and not sub.name.startswith(".") and _hf_folder.sniff_folder(sub)
        for sub in path.iterdir()
    )


def components(path: Path) -> tuple[dict[str, Any], list[Component]]:
    """``model_index.json`` and the components it names, in its order."""
    index = _hf_folder.load_json(path / MODEL_INDEX)
    found = []
    for name, value in index.items():
        if name.startswith("_") or not _is_component(value):
            continue
        folder = _hf_folder.inside(path, name, "component folder")
        library, class_name = value
        found.append(Component(name, library, class_name, folder if folder.is_dir() else None))
    if not any(c.has_weights for c in found):
        raise CorruptFileError(
            f"{MODEL_INDEX} names no component folder holding weights", path=path
        )
    return index, found


def _is_component(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(v is None or isinstance(v, str) for v in value)
    )


def read(path: Path) -> Contents:
    index, listed = components(path)
    parts = _hf_folder.Parts({"layout": "diffusers-pipeline"})
    described: dict[str, Any] = {}
    absent = [p.name for p in listed if p.class_name is None]
    try:
        for part in listed:
            if part.class_name is not None:
                described[part.name] = _component(
                    part, parts.tree, parts.aliases, parts.warnings, parts.closers
                )
    except BaseException:
        _hf_folder.close_all(parts.closers)
        raise
    details = parts.details
    shown = {"_class_name": "pipeline", "_diffusers_version": "diffusers_version"}
    details.update({name: index[key] for key, name in shown.items() if key in index})
    details["components"] = described
    if absent:
        details["absent_components"] = absent
    if parts.aliases:
        details["aliases"] = parts.aliases
    ignored = sorted(
        p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES
    )
    if ignored:
        details["ignored_weights"] = ignored
    named = {(path / p.name).resolve() for p in listed}
    return _hf_folder.parts_contents(path, parts, MODEL_INDEX, named, _hf_folder.sniff_folder)


def _component(
    part: Component,
    tree: dict[str, TensorRef],
    aliases: dict[str, str],
    warnings: list[str],
    closers: list[Any],
) -> dict[str, Any]:
    """One component's details; its tensors join ``tree`` under ``<component>.``."""
    facts: dict[str, Any] = {"class": part.class_name, "library": part.library}
    if part.folder is None:
        return facts
    if not part.has_weights:
        facts["files"] = sorted(p.name for p in part.folder.iterdir() if p.is_file())
        return facts
    contents = _hf_folder.read_prefixed(
        part.folder, part.name + SEPARATOR, tree, aliases, warnings, closers
    )
    facts["tensors"] = len(contents.tree)
    keep = ("files", "index", "ignored_weights", "dtype", "torch_dtype")
    facts.update({k: contents.details[k] for k in keep if k in contents.details})
    return facts
