"""Hugging Face folders: one model, a diffusers pipeline of models, a sentence-transformers
model of modules, or a PEFT adapter.

Four layouts read as one ``hf-dir`` model, told apart by their files (``details["layout"]``
names which):

- a model folder (``_hf_folder``): ``config.json`` plus weights in one file or in shards,
  as transformers (``model.safetensors``, ``pytorch_model.bin``) and diffusers
  (``diffusion_pytorch_model.safetensors``, ``.bin``) save them, or any ``*.index.json``
  with a ``weight_map``; a diffusers component folder on its own (``unet/``) is one;
- a diffusers pipeline (``diffusers_dir``): ``model_index.json`` and a subfolder per
  component; tensors are named ``<component>.<name>``;
- a sentence-transformers model (``sentence_transformers_dir``): ``modules.json`` and a
  folder per module, the Transformer module's often the top folder itself; tensors are
  named ``<module folder>/<name>``, the top folder's keep their names;
- a PEFT adapter (``adapters``): ``adapter_config.json`` plus ``adapter_model.safetensors``
  (or ``.bin``); tensors keep their PEFT names, ``details`` the adapter's configuration.

The pipeline is tried first (its top folder holds no weights of its own that count), then
``modules.json`` (the top folder's weights are one module of several).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from modelport.formats import _hf_folder, diffusers_dir, sentence_transformers_dir
from modelport.formats.protocol import Contents, Format, FormatReader, Probe

INDEX_SUFFIX: Final = _hf_folder.INDEX_SUFFIX
SNIFF_BYTES: Final = _hf_folder.SNIFF_BYTES
CONFIG_NAME: Final = _hf_folder.CONFIG_NAME


def sniff(probe: Probe) -> bool:
    if not probe.is_dir:
        return False
    return is_pipeline(probe.path) or _hf_folder.sniff_folder(probe.path)


def read(path: Path, probe: Probe) -> Contents:
    if diffusers_dir.sniff(path):
        return diffusers_dir.read(path)
    if sentence_transformers_dir.sniff(path):
        return sentence_transformers_dir.read(path)
    return _hf_folder.read_folder(path)


def read_model_folder(path: Path) -> Contents:
    """The folder's own weights as one model, its subfolders aside: one component or module
    of a model made of several (a Transformer module at a sentence-transformers model's
    top), or a plain model folder."""
    return _hf_folder.read_folder(path)


def is_pipeline(path: Path) -> bool:
    """Whether ``path`` is a model made of several model folders, read as one: a diffusers
    pipeline (components) or a sentence-transformers model (modules)."""
    return path.is_dir() and (diffusers_dir.sniff(path) or sentence_transformers_dir.sniff(path))


READER = FormatReader(Format.HF_DIR, sniff, read, ())
