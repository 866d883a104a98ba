"""Quantized layers, recognised from tensor names, dtypes and shapes, so that a quantized
checkpoint is listed as what it is and its parameters count weights, not packed words.

What each library writes for one quantized layer ``P`` (``in`` and ``out`` are the
``nn.Linear`` features; ``groups = in / group_size``):

- GPTQ (AutoGPTQ, GPTQModel, optimum): ``P.qweight`` int32 ``[in * bits / 32, out]`` (input
  rows packed into words), ``P.qzeros`` int32 ``[groups, out * bits / 32]``, ``P.scales``
  float16 ``[groups, out]`` and ``P.g_idx`` int32 ``[in]`` (each input row's group).
- AWQ (AutoAWQ GEMM): ``P.qweight`` int32 ``[in, out * bits / 32]``, ``P.qzeros`` int32
  ``[groups, out * bits / 32]``, ``P.scales`` float16 ``[groups, out]``; no ``g_idx``.
- compressed-tensors ``pack-quantized`` (llm-compressor): ``P.weight_packed`` int32
  ``[out, in * bits / 32]``, ``P.weight_scale`` ``[out, groups]``, ``P.weight_zero_point``,
  ``P.weight_shape`` (the logical shape, stored as data) and ``P.weight_g_idx``.
- bitsandbytes 4-bit: ``P.weight`` uint8 ``[ceil(n / 2), 1]`` (two values a byte),
  ``P.weight.absmax`` (uint8 when double-quantized, then with ``P.weight.nested_absmax`` and
  ``P.weight.nested_quant_map``), ``P.weight.quant_map`` float32 ``[16]`` and
  ``P.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): the bytes of a JSON object with
  the logical ``shape``, ``blocksize`` and ``quant_type``, the one part read here.
- bitsandbytes 8-bit (LLM.int8): ``P.weight`` int8 ``[out, in]``, ``P.SCB`` float32 ``[out]``
  (row scales) and ``P.weight_format`` uint8.
- FP8 with block scales (DeepSeek-V3, transformers' fine-grained FP8): ``P.weight``
  float8_e4m3fn ``[out, in]`` and ``P.weight_scale_inv`` float32 ``[ceil(out / b0),
  ceil(in / b1)]`` for ``weight_block_size = [b0, b1]``; per-channel or per-tensor FP8
  (compressed-tensors, fbgemm): ``P.weight_scale`` ``[out, 1]`` or one value, and
  ``P.input_scale``.
- MLX (``mlx.nn.quantize``, mlx-lm): ``P.weight`` uint32 ``[..., out, in * bits / 32]``, a
  little-endian bit stream per row (value ``j`` at bits ``j * bits`` onwards, across word
  boundaries for 3, 5 and 6 bits), ``P.scales`` and ``P.biases`` ``[..., out, groups]``;
  ``w = scales * q + biases`` per group (``tree.dequantizing``). The microscaling modes
  (``mxfp4``, ``nvfp4``, ``mxfp8``) store uint8 scales and no biases.

A ``config.json`` beside the weights refines what the shapes say: transformers'
``quantization_config`` (``quant_method``, ``bits``, ``group_size``, ``weight_block_size``,
compressed-tensors' ``config_groups``) or MLX's ``quantization`` (``group_size``, ``bits``,
``mode``, and per-layer overrides under the layer's name, ``false`` for a layer left plain).
A layer whose shapes disagree with each other is not recognised and stays a plain listing.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter, methodcaller
from pathlib import Path
from typing import Any, Final

from modelport import limits
from modelport.errors import ModelportError
from modelport.tensors import TensorRef

CONFIG_NAME: Final = "config.json"
MAX_QUANT_STATE_BYTES: Final = 64 << 10  # bitsandbytes' JSON quant state: ~200 bytes
MLX_BITS: Final = (2, 3, 4, 5, 6, 8)
MLX_GROUPS: Final = (64, 32, 128)  # tried in this order when no config says: 64 is MLX's default
MLX_MICROSCALING: Final = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}  # bits, group
NAMES: Final = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "compressed-tensors": "compressed-tensors",
    "bitsandbytes-nf4": "bitsandbytes NF4",
    "bitsandbytes-fp4": "bitsandbytes FP4",
    "bitsandbytes-int8": "bitsandbytes LLM.int8",
    "fp8": "FP8",
    "mlx": "MLX",
}


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized layer: ``parts`` are its tensors, the packed weight first; ``shape`` is
    the weight it stands for (``[out, in]``), None where only its size is known.
    ``group_size``: input values per scale, a ``(rows, columns)`` block (FP8), None for one
    scale per output row, 0 for one scale for the whole tensor."""

    name: str
    scheme: str
    bits: int
    group_size: int | tuple[int, ...] | None
    shape: tuple[int, ...] | None
    parts: tuple[str, ...]
    parameters: int

    @property
    def kind(self) -> tuple[str, int, int | tuple[int, ...] | None]:
        return self.scheme, self.bits, self.group_size

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scheme": self.scheme,
            "bits": self.bits,
            "group_size": _group_json(self.group_size),
            "shape": list(self.shape) if self.shape is not None else None,
            "parameters": self.parameters,
            "parts": list(self.parts),
        }


@dataclass(frozen=True)
class Quantization:
    """The quantized layers among a set of tensors, and ``method``, the config's
    ``quant_method`` ("" without one)."""

    layers: tuple[QuantizedLayer, ...]
    method: str = ""
    parts: frozenset[str] = field(init=False)
    _holders: dict[str, QuantizedLayer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        holders = {part: layer for layer in self.layers for part in layer.parts}
        object.__setattr__(self, "_holders", holders)
        object.__setattr__(self, "parts", frozenset(holders))

    def parameter_count(self, tensors: Mapping[str, TensorRef]) -> int:
        """Each quantized layer's logical weight, plus every tensor that is no part of one:
        scales, zeros, group indices and absmax are not parameters."""
        if not self.layers:  # every tensor counts: summed in C, as a million may
            return sum(map(math.prod, map(_SHAPE, tensors.values())))
        plain = sum(t.numel for name, t in tensors.items() if name not in self.parts)
        return plain + sum(la.parameters for la in self.layers if la.parts[0] in tensors)

    def note_for(self, name: str) -> str:
        """What ``name`` is to its layer ("" for a tensor no layer holds)."""
        layer = self._holders.get(name)
        if layer is None:
            return ""
        if name == layer.parts[0]:
            shape = list(layer.shape) if layer.shape is not None else "?"
            return f"{_display(layer.scheme)} {layer.bits}-bit packed weight of {shape}"
        return f"{_display(layer.scheme)} {name.removeprefix(layer.name).lstrip('.')}"

    def summary(self) -> dict[str, Any] | None:
        """The ``quantization`` section of ``inspect --json``; None when nothing is quantized.
        The most common kind of layer gives ``scheme``, ``bits`` and ``group_size``."""
        if not self.layers:
            return None
        kinds = Counter(layer.kind for layer in self.layers)
        (scheme, bits, group), _ = kinds.most_common(1)[0]
        return {
            "scheme": scheme,
            "bits": bits,
            "group_size": _group_json(group),
            "quantized_layers": len(self.layers),
            "quant_method": self.method or None,
            "kinds": [
                {"scheme": s, "bits": b, "group_size": _group_json(g), "layers": count}
                for (s, b, g), count in kinds.most_common()
            ],
            "layers": [layer.to_json() for layer in self.layers],
        }


def describe(summary: Mapping[str, Any]) -> str:
    """One line per kind, e.g. "GPTQ 4-bit, group 128: 24 quantized linear layers"."""
    said = []
    for kind in summary.get("kinds", []):
        group = kind["group_size"]
        if isinstance(group, list):
            grouping = "block " + "x".join(map(str, group))
        else:
            grouping = {None: "per channel", 0: "per tensor"}.get(group, f"group {group}")
        what = "layer" if kind["scheme"].startswith("mlx") else "linear layer"  # MLX: embeddings
        what += "s" if kind["layers"] != 1 else ""
        said.append(
            f"{_display(kind['scheme'])} {kind['bits']}-bit, {grouping}: "
            f"{kind['layers']} quantized {what}"
        )
    return "; ".join(said)


def _display(scheme: str) -> str:
    return NAMES.get(scheme, scheme.replace("mlx-", "MLX "))


def _group_json(group: int | tuple[int, ...] | None) -> int | list[int] | None:
    return list(group) if isinstance(group, tuple) else group


# -- the config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    """What a config says; None where it says nothing."""

    method: str = ""
    bits: int | None = None
    group_size: int | None = None  # -1 in the config: one group per row
    block: tuple[int, ...] | None = None
    mlx: Mapping[str, Any] = field(default_factory=dict)


def config_beside(path: Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder, or beside a weights file; {} when there is
    none, or none that parses: the tensors alone still say most of it."""
    config = (path if path.is_dir() else path.parent) / CONFIG_NAME
    try:
        if not config.is_file() or config.stat().st_size > limits.MAX_HF_INDEX_JSON:
            return {}
        found = json.loads(config.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return found if isinstance(found, dict) else {}


def _settings(config: Mapping[str, Any]) -> _Settings:
    quant = config.get("quantization_config")
    quant = quant if isinstance(quant, dict) else {}
    mlx = config.get("quantization")
    if not isinstance(mlx, dict):
        mlx = quant if quant and "quant_method" not in quant else {}
    method = str(quant.get("quant_method", "")).lower()
    bits = _int(quant.get("bits", quant.get("w_bit")))
    group = _int(quant.get("group_size", quant.get("q_group_size")))
    groups = quant.get("config_groups")
    if isinstance(groups, dict):  # compressed-tensors: the first group's weights
        first: Any = next(iter(groups.values()), {})
        weights = first.get("weights") if isinstance(first, dict) else None
        if isinstance(weights, dict):
            bits = _int(weights.get("num_bits")) or bits
            group = _int(weights.get("group_size")) or group
    block = quant.get("weight_block_size")
    sizes = tuple(block) if isinstance(block, list) and len(block) == 2 else ()
    valid = len(sizes) == 2 and all(_int(b) for b in sizes)
    return _Settings(method, bits, group, sizes if valid else None, mlx)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- recognising -------------------------------------------------------------------------------
def recognise(
    tensors: Mapping[str, TensorRef], config: Mapping[str, Any] | None = None
) -> Quantization:
    """The quantized layers among ``tensors`` (see the module docstring), in file order."""
    settings = _settings(config or {})
    layers = []
    for name in filter(_ENDS_LIKE_ANCHOR, tensors):  # the few names worth a closer look
        ref = tensors[name]
        for suffix, recogniser in _ANCHORS:
            if name == suffix or name.endswith("." + suffix):
                layer = recogniser(name[: len(name) - len(suffix)], ref, tensors, settings)
                if layer is not None:
                    layers.append(layer)
                break
    return Quantization(tuple(layers), settings.method)


_Recogniser = Callable[[str, TensorRef, Mapping[str, TensorRef], _Settings], QuantizedLayer | None]


def _layer(
    prefix: str,
    scheme: str,
    bits: int,
    group: int | tuple[int, ...] | None,
    shape: tuple[int, ...] | None,
    parts: list[str],
    tensors: Mapping[str, TensorRef],
    parameters: int | None = None,
) -> QuantizedLayer:
    found = tuple(prefix + p for p in parts if prefix + p in tensors)
    count = parameters if parameters is not None else math.prod(shape or ())
    return QuantizedLayer(prefix.rstrip("."), scheme, bits, group, shape, found, count)


def _packed_int(
    prefix: str, qweight: TensorRef, tensors: Mapping[str, TensorRef], settings: _Settings
) -> QuantizedLayer | None:
    """GPTQ packs input rows (``[in * bits / 32, out]``), AWQ output columns
    (``[in, out * bits / 32]``); the scales are ``[groups, out]`` in both."""
    scales, qzeros = tensors.get(prefix + "scales"), tensors.get(prefix + "qzeros")
    g_idx = tensors.get(prefix + "g_idx")
    if qweight.dtype != "int32" or len(qweight.shape) != 2 or scales is None:
        return None
    if len(scales.shape) != 2 or 0 in scales.shape:
        return None
    rows, columns = qweight.shape
    groups, out = scales.shape
    awq = settings.method == "awq" or (settings.method != "gptq" and g_idx is None)
    awq = awq and columns != out  # a GPTQ file that lost its g_idx keeps ``out`` columns
    if awq:
        bits = settings.bits or _ratio(32 * columns, out)
        inputs = rows
        fits = bits is not None and columns * 32 == out * bits
    else:
        by_zeros = _ratio(32 * qzeros.shape[-1], out) if qzeros is not None else None
        by_index = _ratio(32 * rows, g_idx.shape[0]) if g_idx is not None and g_idx.shape else None
        bits = settings.bits or by_index or by_zeros
        inputs = rows * 32 // bits if bits else 0
        fits = bits is not None and inputs * bits == rows * 32 and columns == out
    if not fits or bits is None:
        return None
    group = _group(settings.group_size, inputs, groups)
    scheme = "awq" if awq else "gptq"
    parts = ["qweight", "qzeros", "scales", "g_idx"]
    return _layer(prefix, scheme, bits, group, (out, inputs), parts, tensors)


def _compressed(
    prefix: str, packed: TensorRef, tensors: Mapping[str, TensorRef], settings: _Settings
) -> QuantizedLayer | None:
    """compressed-tensors' ``pack-quantized``: ``[out, in * bits / 32]`` int32 words (4 bits
    when no config says, its common case)."""
    scale = tensors.get(prefix + "weight_scale")
    if packed.dtype != "int32" or len(packed.shape) != 2 or scale is None:
        return None
    bits = settings.bits or 4
    out, inputs = packed.shape[0], packed.shape[1] * 32 // bits
    if inputs * bits != packed.shape[1] * 32:
        return None
    groups = scale.shape[-1] if scale.shape else 1
    group = _group(settings.group_size, inputs, groups)
    parts = ["weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"]
    return _layer(prefix, "compressed-tensors", bits, group, (out, inputs), parts, tensors)


def _group(configured: int | None, inputs: int, groups: int) -> int | None:
    if configured is not None:
        return None if configured <= 0 else configured
    return None if groups <= 1 else inputs // groups


def _ratio(numerator: int, denominator: int) -> int | None:
    if denominator <= 0 or numerator % denominator:
        return None
    return numerator // denominator or None


def _plain_weight(
    prefix: str, weight: TensorRef, tensors: Mapping[str, TensorRef], settings: _Settings
) -> QuantizedLayer | None:
    """A tensor called ``weight`` is quantized when its dtype and companions say so."""
    if _bnb_state_name(prefix, tensors) or (
        weight.dtype == "uint8" and prefix + "weight.absmax" in tensors
    ):  # the packed bytes may sit in another dtype (bitsandbytes' ``quant_storage``)
        return _bitsandbytes_4bit(prefix, weight, tensors)
    if weight.dtype == "int8" and prefix + "SCB" in tensors and len(weight.shape) == 2:
        parts = ["weight", "SCB", "weight_format"]
        return _layer(prefix, "bitsandbytes-int8", 8, None, weight.shape, parts, tensors)
    if weight.dtype.startswith("float8") and len(weight.shape) == 2:
        return _fp8(prefix, weight, tensors, settings)
    if weight.dtype == "uint32" and prefix + "scales" in tensors:
        return _mlx(prefix, weight, tensors, settings)
    return None


def _bnb_state_name(prefix: str, tensors: Mapping[str, TensorRef]) -> str:
    for kind in ("nf4", "fp4"):
        name = f"{prefix}weight.quant_state.bitsandbytes__{kind}"
        if name in tensors:
            return name
    return ""


def _bitsandbytes_4bit(
    prefix: str, weight: TensorRef, tensors: Mapping[str, TensorRef]
) -> QuantizedLayer:
    state_name = _bnb_state_name(prefix, tensors)
    state = _quant_state(tensors[state_name]) if state_name else {}
    kind = str(state.get("quant_type") or state_name.rpartition("__")[2] or "nf4")
    shape = state.get("shape")
    logical = tuple(shape) if isinstance(shape, list) and all(_int(n) for n in shape) else None
    count = math.prod(logical) if logical is not None else 2 * weight.nbytes
    absmax = tensors.get(prefix + "weight.absmax")
    block = _int(state.get("blocksize"))
    if block is None and absmax is not None:
        block = _block_for(count, absmax.numel)
    parts = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax"]
    parts += ["weight.nested_quant_map", state_name.removeprefix(prefix)]
    scheme = "bitsandbytes-fp4" if kind == "fp4" else "bitsandbytes-nf4"
    return _layer(prefix, scheme, 4, block, logical, parts, tensors, count)


def _quant_state(ref: TensorRef) -> dict[str, Any]:
    """bitsandbytes' quant state: JSON in a uint8 tensor; {} when it cannot be read."""
    if ref.storage is None or ref.dtype != "uint8" or ref.nbytes > MAX_QUANT_STATE_BYTES:
        return {}
    try:
        found = json.loads(ref.raw_bytes().tobytes().decode("utf-8"))
    except (ModelportError, OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return found if isinstance(found, dict) else {}


def _fp8(
    prefix: str, weight: TensorRef, tensors: Mapping[str, TensorRef], settings: _Settings
) -> QuantizedLayer | None:
    out, inputs = weight.shape
    inverse = tensors.get(prefix + "weight_scale_inv")
    scale = inverse if inverse is not None else tensors.get(prefix + "weight_scale")
    if scale is None:
        return None
    group: int | tuple[int, ...] | None
    if len(scale.shape) == 2 and scale.shape[1] > 1:  # blocks
        rows = _block_for(out, scale.shape[0])
        columns = _block_for(inputs, scale.shape[1])
        derived = (rows, columns) if rows and columns else None
        group = settings.block or derived
    else:
        group = 0 if scale.numel == 1 else None
    parts = ["weight", "weight_scale_inv", "weight_scale", "input_scale"]
    return _layer(prefix, "fp8", 8, group, weight.shape, parts, tensors)


def _block_for(size: int, count: int) -> int | None:
    """The power-of-two block that cuts ``size`` values into ``count`` blocks."""
    block = 1
    while block <= max(size, 1):
        if -(-size // block) == count:
            return block
        block *= 2
    return None


def _mlx(
    prefix: str, weight: TensorRef, tensors: Mapping[str, TensorRef], settings: _Settings
) -> QuantizedLayer | None:
    scales, biases = tensors[prefix + "scales"], tensors.get(prefix + "biases")
    if len(weight.shape) < 2 or scales.shape[:-1] != weight.shape[:-1] or 0 in scales.shape:
        return None
    override = settings.mlx.get(prefix.rstrip("."))
    if override is False:
        return None
    said = override if isinstance(override, dict) else settings.mlx
    words, groups = weight.shape[-1], scales.shape[-1]
    mode = str(said.get("mode") or ("affine" if biases is not None else "mxfp4"))
    default_bits, default_group = MLX_MICROSCALING.get(mode, (None, None))
    bits = _int(said.get("bits")) or default_bits
    group = _int(said.get("group_size")) or default_group
    if bits is None and group is None:
        for candidate in MLX_GROUPS:
            if _ratio(32 * words, groups * candidate) in MLX_BITS:
                bits, group = _ratio(32 * words, groups * candidate), candidate
                break
    elif bits is None and group is not None:
        bits = _ratio(32 * words, groups * group)
    elif bits is not None and group is None:
        group = _ratio(32 * words, bits * groups)
    if bits is None or group is None or words * 32 != bits * groups * group:
        return None
    shape = (*weight.shape[:-1], groups * group)
    scheme = "mlx" if mode == "affine" else "mlx-" + mode
    return _layer(prefix, scheme, bits, group, shape, ["weight", "scales", "biases"], tensors)


_ANCHORS: Final[tuple[tuple[str, _Recogniser], ...]] = (
    ("qweight", _packed_int),
    ("weight_packed", _compressed),
    ("weight", _plain_weight),
)
_ENDS_LIKE_ANCHOR: Final = methodcaller("endswith", tuple(suffix for suffix, _ in _ANCHORS))
_SHAPE: Final = attrgetter("shape")
