"""GGML block quantization: float tensors as the block types gguf-py's ``quants.quantize``
writes, byte for byte, streamed a slice of a source chunk at a time.

Every block is quantized on its own (no scale spans two blocks), so a tensor quantized in
slices is the same bytes as the whole tensor at once. Values are float32 first (as gguf-py
does: a float16, bfloat16 or float64 source is widened or rounded to float32), then each
type's arithmetic runs in float32 in gguf-py's order, since a different order can round a
scale differently. Layouts (``ggml-common.h``), ``d`` a float16 scale unless said:

- ``Q8_0`` (32 values, 34 bytes): ``d = max|x| / 127``, then ``x / d`` rounded half away
  from zero as int8.
- ``Q4_0`` (32, 18) / ``Q5_0`` (32, 22): ``d = m / -8`` (``/ -16``), ``m`` the value of the
  largest magnitude with its sign; ``q = trunc(x / d + 8.5)`` (``+ 16.5``) clipped to 4 (5)
  bits. Stored: ``d``, for Q5_0 the 32 fifth bits (4 bytes, value ``i`` at bit ``i``), then
  16 bytes of nibbles: value ``i`` low, value ``i + 16`` high.
- ``Q4_1`` (32, 20) / ``Q5_1`` (32, 24): ``d = (max - min) / 15`` (``/ 31``), ``m = min``;
  ``q = trunc((x - min) / d + 0.5)`` clipped. Stored: ``d``, ``m``, (fifth bits), nibbles.
- ``TQ2_0`` (256, 66) / ``TQ1_0`` (256, 54), ternary: ``d = max|x|``, each value rounded to
  -1, 0 or 1 and stored plus one. TQ2_0 packs four 2-bit values a byte (in runs of 128
  values, value ``j + 32 k`` at bits ``2k`` of byte ``j``); TQ1_0 five base-3 digits a byte
  (the first digit most significant) for values 0..239, four for the last 16, each byte
  then scaled to ``ceil(b * 256 / 243)``. ``d`` comes last.
- ``MXFP4`` (32, 17): an E8M0 exponent byte ``e = floor(log2 max|x|) - 2 + 127``, then each
  value as the nearest of the 16 E2M1 codes times ``2^(e - 128)`` (the first code on a tie),
  packed as nibbles like Q4_0.

Values that are not finite give whatever gguf-py's casts give on this machine: the same
casts run here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from modelport import dtypes
from modelport.tensors import NDArray, TensorRef
from modelport.transfer.streaming import source_chunks

# float dtypes a block type is quantized from (gguf-py widens or rounds each to float32)
SOURCES = ("float64", "float32", "float16", "bfloat16")
STEP = 1 << 18  # values quantized at once: the temporaries are several times the slice
MXFP4_STEP = 1 << 15  # its search holds 16 candidates for every value
_E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _half(scale: NDArray) -> NDArray:
    """float32 scales, one a row, as the two bytes of their float16."""
    import numpy as np

    return scale.astype(np.float16).view(np.uint8)


def _inverse(scale: NDArray) -> NDArray:
    import numpy as np

    with np.errstate(divide="ignore"):
        return np.where(scale == 0, 0, 1 / scale)


def _nibbles(codes: NDArray) -> NDArray:
    """Codes of one byte, a row of 32 each, as 16 bytes: code ``i`` low, ``i + 16`` high."""
    import numpy as np

    low, high = codes[:, :16], codes[:, 16:]
    return (low & np.uint8(0x0F)) | (high << np.uint8(4))


def _fifth_bits(codes: NDArray) -> NDArray:
    """Bit 4 of each of a row's 32 codes, code ``i`` at bit ``i`` of 4 little-endian bytes."""
    import numpy as np

    return np.packbits(codes >> np.uint8(4), axis=-1, bitorder="little")


def _truncated_codes(values: NDArray, offset: float, top: int) -> NDArray:
    import numpy as np

    with np.errstate(invalid="ignore"):
        return np.trunc(values + np.float32(offset)).astype(np.uint8).clip(0, top)


def _largest_signed(blocks: NDArray) -> NDArray:
    """Each row's value of the largest magnitude, with its sign (the first of equals)."""
    import numpy as np

    return np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)


def _rounded_away(values: NDArray) -> NDArray:
    """Rounded half away from zero (ggml's ``roundf``), in float32."""
    import numpy as np

    magnitude = np.abs(values)
    whole = np.floor(magnitude)
    rounded: NDArray = np.sign(values) * (whole + np.floor(2 * (magnitude - whole)))
    return rounded


def q8_0(blocks: NDArray) -> NDArray:
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
        codes = _rounded_away(blocks * _inverse(scale)).astype(np.int8).view(np.uint8)
    return np.concatenate([_half(scale), codes], axis=1)


def _symmetric(blocks: NDArray, levels: int, fifth_bit: bool) -> NDArray:
    """Q4_0 (``levels`` 16) and Q5_0 (32)."""
    import numpy as np

    scale = _largest_signed(blocks) / -(levels // 2)
    with np.errstate(invalid="ignore", over="ignore"):
        codes = _truncated_codes(blocks * _inverse(scale), levels // 2 + 0.5, levels - 1)
    parts = [_half(scale), *([_fifth_bits(codes)] if fifth_bit else []), _nibbles(codes)]
    return np.concatenate(parts, axis=1)


def _offset(blocks: NDArray, levels: int, fifth_bit: bool) -> NDArray:
    """Q4_1 (``levels`` 16) and Q5_1 (32)."""
    import numpy as np

    low = blocks.min(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = (blocks.max(axis=1, keepdims=True) - low) / (levels - 1)
        codes = _truncated_codes((blocks - low) * _inverse(scale), 0.5, levels - 1)
    parts = [_half(scale), _half(low), *([_fifth_bits(codes)] if fifth_bit else [])]
    return np.concatenate([*parts, _nibbles(codes)], axis=1)


def q4_0(blocks: NDArray) -> NDArray:
    return _symmetric(blocks, 16, fifth_bit=False)


def q5_0(blocks: NDArray) -> NDArray:
    return _symmetric(blocks, 32, fifth_bit=True)


def q4_1(blocks: NDArray) -> NDArray:
    return _offset(blocks, 16, fifth_bit=False)


def q5_1(blocks: NDArray) -> NDArray:
    return _offset(blocks, 32, fifth_bit=True)


def _ternary(blocks: NDArray) -> tuple[NDArray, NDArray]:
    """Each row's scale (its largest magnitude) and its values as 0, 1, 2 (-1, 0, 1 plus 1)."""
    import numpy as np

    scale = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        signs = _rounded_away(blocks * _inverse(scale)).astype(np.int8)
    return scale, (signs + np.int8(1)).astype(np.uint8)


def tq2_0(blocks: NDArray) -> NDArray:
    import numpy as np

    scale, trits = _ternary(blocks)
    runs = trits.reshape(len(blocks), -1, 4, 32).astype(np.uint8)
    packed = runs[:, :, 0] | runs[:, :, 1] << 2 | runs[:, :, 2] << 4 | runs[:, :, 3] << 6
    return np.concatenate([packed.reshape(len(blocks), -1), _half(scale)], axis=1)


def _base3(trits: NDArray, digits: int, width: int) -> NDArray:
    """Groups of ``digits`` trits ``width`` apart as one number each, the first digit most
    significant."""
    import numpy as np

    weights = (3 ** np.arange(4, 4 - digits, -1)).reshape(1, digits, 1)
    numbers: NDArray = (trits.reshape(len(trits), digits, width).astype(np.int32) * weights).sum(
        axis=1
    )
    return numbers


def tq1_0(blocks: NDArray) -> NDArray:
    import numpy as np

    scale, trits = _ternary(blocks)
    numbers = np.concatenate(
        [
            _base3(trits[:, :160], 5, 32),
            _base3(trits[:, 160:240], 5, 16),
            _base3(trits[:, 240:], 4, 4),
        ],
        axis=1,
    )
    packed = ((numbers * 256 + 242) // 243).astype(np.uint8)
    return np.concatenate([packed, _half(scale)], axis=1)


def mxfp4(blocks: NDArray) -> NDArray:
    import numpy as np

    largest = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        exponent = np.where(largest > 0, np.floor(np.log2(largest)) - 2 + 127, 0)
        exponent = exponent.astype(np.uint8)
    wide = exponent.astype(np.uint32)
    half_scale = np.where(wide < 2, np.uint32(0x200000) << wide, (wide - 1) << np.uint32(23))
    scale = half_scale.view(np.float32).reshape(-1, 1, 1)
    candidates = np.array(_E2M1_DOUBLED, dtype=np.float32).reshape(1, 1, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        distance = np.abs(scale * candidates - blocks[:, :, None])
    codes = distance.argmin(axis=2).astype(np.uint8)
    return np.concatenate([exponent, _nibbles(codes)], axis=1)


QUANTIZERS: dict[str, Callable[[NDArray], NDArray]] = {
    "Q4_0": q4_0,
    "Q4_1": q4_1,
    "Q5_0": q5_0,
    "Q5_1": q5_1,
    "Q8_0": q8_0,
    "TQ1_0": tq1_0,
    "TQ2_0": tq2_0,
    "MXFP4": mxfp4,
}


def quantize(values: NDArray, block_type: str) -> NDArray:
    """``values`` (any float dtype, a whole number of blocks) as rows of ``block_type``'s
    blocks, one a row."""
    import numpy as np

    elements = dtypes.GGML_BLOCKS[block_type][0]
    with np.errstate(over="ignore"):
        rows = np.asarray(values).astype(np.float32, copy=False).reshape(-1, elements)
    return QUANTIZERS[block_type](rows)


def quantized_blocks(tensor: TensorRef, block_type: str) -> Iterator[NDArray]:
    """``tensor``'s values as ``block_type`` blocks in C order, a slice of a source chunk
    at a time: a few MiB of temporaries whatever the tensor's size."""
    import numpy as np

    elements = dtypes.GGML_BLOCKS[block_type][0]
    step = MXFP4_STEP if block_type == "MXFP4" else STEP
    pending: NDArray = np.zeros(0, dtype=np.float32)
    for chunk in source_chunks(tensor):
        with np.errstate(over="ignore"):
            values = chunk.astype(np.float32, copy=False)
        if pending.size:
            values = np.concatenate([pending, values])
        whole = values.size - values.size % elements
        for start in range(0, whole, step):
            yield quantize(values[start : min(whole, start + step)], block_type)
        pending = values[whole:].copy()  # the chunk's buffer is reused for the next one
