"""Quantized layers as float weights: what ``convert --dequantize`` writes for MLX's affine
quantization (``mlx.core.dequantize``), computed when the tensor is read.

MLX packs each row of ``q`` as one little-endian bit stream over its uint32 words: value
``j`` takes bits ``j * bits`` to ``(j + 1) * bits - 1``, counting from the lowest bit of the
first word, so 3-, 5- and 6-bit values run across word boundaries. Each run of
``group_size`` values shares one scale and one bias: ``w = scales * q + biases``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Final

from modelport.tensors import NDArray, Storage, TensorRef
from modelport.tree.quantization import Quantization, QuantizedLayer

DEQUANTIZE_ELEMENTS: Final = 1 << 22  # rows unpacked at a time stay under this many values


def dequantized(
    tensors: Mapping[str, TensorRef], found: Quantization
) -> tuple[dict[str, TensorRef], list[QuantizedLayer]]:
    """``tensors`` with each MLX affine layer's packed weight replaced by its float32 values
    under the same name (computed when read) and its scales and biases left out; the layers
    so replaced. Other schemes pass through packed."""
    layers = {
        la.parts[0]: la
        for la in found.layers
        if la.scheme == "mlx" and len(la.parts) == 3 and la.shape is not None
    }
    left_out = {part for layer in layers.values() for part in layer.parts[1:]}
    result: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        layer = layers.get(name)
        if layer is not None:
            result[name] = _dequantized_ref(layer, tensors)
        elif name not in left_out:
            result[name] = ref
    return result, list(layers.values())


def _dequantized_ref(layer: QuantizedLayer, tensors: Mapping[str, TensorRef]) -> TensorRef:
    weight, scales, biases = (tensors[p] for p in layer.parts)
    assert layer.shape is not None and isinstance(layer.group_size, int)
    produce = functools.partial(_mlx_bytes, weight, scales, biases, layer.bits, layer.group_size)
    storage = Storage(None, 0, 4 * math.prod(layer.shape), key=layer.parts[0], reader=produce)
    note = f"dequantized from MLX {layer.bits}-bit, group {layer.group_size}"
    return TensorRef("float32", layer.shape, storage, note=note)


def _mlx_bytes(
    weight: TensorRef, scales: TensorRef, biases: TensorRef, bits: int, group_size: int
) -> NDArray:
    values = dequantize_mlx(weight.numpy(), scales.numpy(), biases.numpy(), bits, group_size)
    return values.reshape(-1).view("u1")


def dequantize_mlx(
    packed: NDArray, scales: NDArray, biases: NDArray, bits: int, group_size: int
) -> NDArray:
    """MLX's affine dequantization in float32: ``scales * q + biases`` per group of
    ``group_size`` inputs, ``q`` read from each row's little-endian bit stream. A few rows at
    a time, so the unpacked bits stay small beside the result."""
    import numpy as np

    words = np.ascontiguousarray(packed, dtype="<u4")
    inputs = words.shape[-1] * 32 // bits
    rows = words.reshape(-1, words.shape[-1])
    scale = np.asarray(scales, dtype=np.float32).reshape(len(rows), -1, 1)
    bias = np.asarray(biases, dtype=np.float32).reshape(len(rows), -1, 1)
    result = np.empty((len(rows), inputs), dtype=np.float32)
    step = max(1, DEQUANTIZE_ELEMENTS // max(1, inputs))
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        stream = np.unpackbits(block.view(np.uint8), axis=-1, bitorder="little")
        stream = stream.reshape(len(block), inputs, bits)
        q = np.zeros((len(block), inputs), dtype=np.uint8)
        for bit in range(bits):
            q |= stream[..., bit] << np.uint8(bit)
        grouped = q.reshape(len(block), -1, group_size).astype(np.float32)
        where = slice(start, start + len(block))
        result[where] = (grouped * scale[where] + bias[where]).reshape(len(block), inputs)
    return result.reshape(*words.shape[:-1], inputs)
