"""Adapters: PEFT folders and LoRA weight files, described from their names and metadata.

PEFT (``PeftModel.save_pretrained``) writes a folder, read by ``hf_dir``:

- ``adapter_config.json`` MUST be a JSON object; ``peft_type`` (``LORA``, ``LOHA``, ``IA3``
  ...), ``r``, ``lora_alpha``, ``target_modules``, ``base_model_name_or_path`` and
  ``task_type`` are shown when present;
- ``adapter_model.safetensors`` (or ``adapter_model.bin``, a torch zip) holds the tensors
  under the names the wrapped model gives them, adapter name removed:
  ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``.

kohya-ss ``sd-scripts`` (and LyCORIS, and the tools built on them) write one safetensors file:

- names are ``lora_<part>_<module path with _ for .>.<weight>``: ``<part>`` is ``unet``,
  ``te`` (``te1``, ``te2``, ``te3`` for the text encoders of SDXL and SD3) or
  ``transformer``; ``<weight>`` is ``lora_down.weight`` ``[r, in(, k, k)]``,
  ``lora_up.weight`` ``[out, r(, 1, 1)]`` and ``alpha`` (a scalar) for LoRA, ``hada_w1_a``
  ... for LoHa, ``lokr_w1`` ... for LoKr;
- ``__metadata__`` MAY hold the training record, ``ss_*`` keys as strings: among them
  ``ss_network_module`` (``networks.lora``, ``lycoris.kohya``), ``ss_network_dim`` (the
  rank), ``ss_network_alpha``, ``ss_base_model_version``, ``ss_sd_model_name``,
  ``ss_output_name``; and ``modelspec.*`` keys.

diffusers' ``pytorch_lora_weights.safetensors`` is a single file with PEFT names under the
component (``unet.<module>.lora_A.weight``), or, before diffusers 0.22,
``<module>.lora.down.weight`` / ``.lora.up.weight``.

``READER`` is the safetensors reader with these details added: it takes a safetensors file
whose first bytes name a LoRA tensor or a kohya key, and gives ``details["lora"]``. Nothing
here reads a tensor's bytes: ranks come from shapes, alphas from the metadata.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from modelport.formats import safetensors
from modelport.formats.protocol import Contents, FormatReader, Probe
from modelport.tensors import TensorRef

ADAPTER_CONFIG: Final = "adapter_config.json"
ADAPTER_FIELDS: Final = (
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "base_model_name_or_path",
    "task_type",
)
KOHYA_PARTS: Final = (  # longest first: lora_te1_ before lora_te_
    ("lora_transformer_", "transformer"),
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
)
KOHYA_METADATA: Final = {
    "ss_network_module": "network_module",
    "ss_network_dim": "network_dim",
    "ss_network_alpha": "network_alpha",
    "ss_base_model_version": "base_model_version",
    "ss_sd_model_name": "base_model",
    "ss_output_name": "output_name",
}
# The name patterns, compiled on first use (``_compiled``): only a file whose header names a
# LoRA needs them, and compiling them costs more than sniffing every other safetensors file.
# (name pattern, style, algorithm)
_STYLES: Final = (
    (r"^lora_[a-z0-9]+_.+\.lora_(down|up)\.weight$", "kohya", "lora"),
    (r"^lora_[a-z0-9]+_.+\.hada_w[12]_[ab]$", "kohya", "loha"),
    (r"^lora_[a-z0-9]+_.+\.lokr_w[12](_[ab])?$", "kohya", "lokr"),
    (r"\.lora_[AB](\.[A-Za-z0-9_]+)?\.weight$", "peft", "lora"),
    (r"\.lora_embedding_[AB](\.[A-Za-z0-9_]+)?$", "peft", "lora"),
    (r"\.lora(_linear_layer)?\.(down|up)\.weight$", "diffusers", "lora"),
)
_MODULE_END: Final = (
    r"\.(lora_(down|up)\.weight|alpha|hada_w[12]_[ab]|lokr_w[12](_[ab])?|"
    r"lora_[AB](\.[A-Za-z0-9_]+)?\.weight|lora_embedding_[AB](\.[A-Za-z0-9_]+)?|"
    r"lora(_linear_layer)?\.(down|up)\.weight)$"
)
# the weight whose first dimension is the rank
_DOWN: Final = (
    r"\.(lora_down\.weight|lora_A(\.[A-Za-z0-9_]+)?\.weight|lora(_linear_layer)?\.down\.weight)$"
)
SNIFF_MARKS: Final = (b"lora_", b".lora.down.", b"ss_network_")


def adapter_details(config: Mapping[str, Any]) -> dict[str, Any]:
    """What ``adapter_config.json`` says about the adapter (the fields PEFT users look at)."""
    details: dict[str, Any] = {"layout": "peft-adapter"}
    details.update({k: config[k] for k in ADAPTER_FIELDS if config.get(k) is not None})
    return details


def lora_details(tensors: Mapping[str, TensorRef], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The LoRA these tensors make, or {} when their names are no LoRA's: style (kohya,
    peft, diffusers), algorithm, how many modules it adapts and where, the ranks."""
    patterns = [(_compiled(text), style, algorithm) for text, style, algorithm in _STYLES]
    styles: Counter[tuple[str, str]] = Counter()
    for name in tensors:
        for pattern, style, algorithm in patterns:
            if pattern.search(name):
                styles[style, algorithm] += 1
                break
    if not styles:
        return {}
    (style, algorithm), _ = styles.most_common(1)[0]
    module_end, down = _compiled(_MODULE_END), _compiled(_DOWN)
    modules = {module_end.sub("", n) for n in tensors if module_end.search(n)}
    ranks = sorted({t.shape[0] for n, t in tensors.items() if down.search(n) and t.shape})
    details: dict[str, Any] = {"style": style, "algorithm": algorithm, "modules": len(modules)}
    if style == "kohya":
        details["targets"] = dict(Counter(_kohya_part(m) for m in modules))
    if ranks:
        details["ranks"] = ranks
    for key, shown in KOHYA_METADATA.items():
        value = metadata.get(key)
        if isinstance(value, str) and value not in ("", "None"):
            details[shown] = _number(value)
    return details


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _kohya_part(module: str) -> str:
    for prefix, part in KOHYA_PARTS:
        if module.startswith(prefix):
            return part
    return "other"


def _number(text: str) -> Any:
    """``"32"`` as 32, ``"16.0"`` as 16.0; other text as it is."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def sniff(probe: Probe) -> bool:
    """A safetensors file whose header, as far as the probe holds it, names a LoRA."""
    return safetensors.sniff(probe) and any(mark in probe.head for mark in SNIFF_MARKS)


def read(path: Path, probe: Probe) -> Contents:
    """The safetensors file, with ``details["lora"]`` when its names (as its header gives
    them, the names LoRA tools write) make a LoRA."""
    contents, tensors = safetensors.read_tensors(path, probe)
    described = lora_details(tensors, contents.metadata)
    if described:
        contents.details["lora"] = described
    return contents


READER = FormatReader(
    safetensors.READER.format,
    sniff,
    read,
    safetensors.READER.extensions,
)
