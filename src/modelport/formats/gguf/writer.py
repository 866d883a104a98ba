"""GGUF writing; the format's codes come from ``spec``, never from the reader.

Layout written (ggml/docs/gguf.md, version 3, little-endian, as gguf-py's ``GGUFWriter``):

- ``b"GGUF"``, version 3 (u32), tensor count (u64), key/value count (u64);
- the key/value pairs: ``general.architecture`` first when the plan has it (readers do not
  require it; llama.cpp needs it to run a model, so it is never invented), then
  ``general.alignment`` (u32 32), then the plan's typed entries (``TypedMetadata``: u32,
  f32, bool, string ... or arrays of one of them, as llama.cpp's hyperparameters and
  vocabulary), then every other string metadata entry (a key typed too is written once,
  typed);
- one tensor info per tensor in plan order: name, n_dims, dims in GGML order (torch's
  reversed), GGML type, offset in the data section (a multiple of 32);
- zero bytes up to the next multiple of 32, then each tensor's data, padded with zero bytes
  to a multiple of 32 (the file ends padded too, as gguf-py writes it).

Types: F32/F16/BF16/F64/I8/I16/I32/I64 are streamed as they are (cast first if the plan
says so). A floating tensor planned as a block type gguf-py can quantize (``Q4_0``,
``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``, ``TQ1_0``, ``TQ2_0``, ``MXFP4``) is quantized here, a
source chunk at a time, exactly as gguf-py's ``quants.quantize`` does (``quantizing``);
``quantized_blocks`` is the same stream, for verifying what was written. Tensors already in
a GGML block type (``Q4_K`` ... from a GGUF source) are copied byte for byte.

Refused before a byte is written (``ConversionError``), since llama.cpp refuses or crashes
on them: more than 4 dims; names of 64 bytes or more (``GGML_MAX_NAME``); a zero dim other
than the last torch dim (ggml divides by ``ne[1..3]``); a cast into a block type modelport
does not quantize (the K-quants, IQ types, NVFP4: gguf-py has no quantizer for them either);
quantizing a non-floating tensor; a block type for a 0-d tensor or one whose last dim is not
a whole number of blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from modelport import dtypes
from modelport.errors import ConversionError
from modelport.formats.gguf import quantizing
from modelport.formats.gguf.spec import (
    ALIGNMENT_KEY,
    DEFAULT_ALIGNMENT,
    MAGIC,
    MAX_DIMS,
    WRITTEN_TYPES,
    ValueType,
)
from modelport.tensors import NDArray
from modelport.transfer.streaming import write_all, write_tensor
from modelport.transfer.write_plan import OutputTensor, TypedMetadata, TypedScalar, WritePlan

WRITE_VERSION = 3
ARCHITECTURE_KEY = "general.architecture"
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the terminating NUL
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PACKED = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT32: "<f",
    ValueType.FLOAT64: "<d",
    ValueType.BOOL: "<?",
}


def _string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _U64.pack(len(raw)) + raw


def check(plan: WritePlan) -> None:
    """Refuse what GGUF (or llama.cpp reading it) cannot take, before anything is written."""
    seen: set[str] = set()
    for tensor in plan.tensors:
        where = f"tensor {tensor.name!r}"
        if tensor.name in seen:
            raise ConversionError(f"{where} appears twice")
        seen.add(tensor.name)
        if tensor.dtype not in WRITTEN_TYPES:
            raise ConversionError(f"{where}: GGUF cannot hold {tensor.dtype}")
        if len(tensor.shape) > MAX_DIMS:
            raise ConversionError(f"{where} has {len(tensor.shape)} dims; GGUF holds at most 4")
        if len(tensor.name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ConversionError(
                f"{where}: GGUF names are at most {MAX_NAME_BYTES} bytes (llama.cpp refuses more)"
            )
        if 0 in tensor.shape[:-1]:
            raise ConversionError(
                f"{where} of shape {list(tensor.shape)}: a zero dim other than the last crashes "
                "llama.cpp's GGUF reader"
            )
        block = dtypes.dtype(tensor.dtype).block
        if block is None:
            continue
        if tensor.is_cast and tensor.dtype not in quantizing.QUANTIZERS:
            raise ConversionError(
                f"{where}: modelport quantizes to {', '.join(quantizing.QUANTIZERS)}; "
                f"{tensor.dtype} blocks can only be copied from a GGUF file that has them"
            )
        if (tensor.is_cast and tensor.source.dtype not in quantizing.SOURCES) or (
            not tensor.shape or tensor.shape[-1] % block[0]
        ):
            raise ConversionError(
                f"{where} ({tensor.source.dtype}, shape {list(tensor.shape)}): {tensor.dtype} "
                f"needs a floating tensor whose last dim is a multiple of {block[0]}"
            )


def header_bytes(plan: WritePlan) -> bytes:
    """Everything before the data section, padded to the alignment."""
    typed = {entry.key: entry for entry in plan.typed_metadata}
    if len(typed) != len(plan.typed_metadata):
        raise ConversionError("a GGUF metadata key appears twice in the typed metadata")
    if ALIGNMENT_KEY in typed:
        raise ConversionError(f"{ALIGNMENT_KEY} is the writer's own (it aligns to 32 bytes)")
    pairs = []
    if ARCHITECTURE_KEY in typed:
        pairs.append(_string(ARCHITECTURE_KEY) + _typed_value(typed[ARCHITECTURE_KEY]))
    elif ARCHITECTURE_KEY in plan.metadata:
        pairs.append(_string(ARCHITECTURE_KEY) + _kv_string(plan.metadata[ARCHITECTURE_KEY]))
    pairs.append(
        _string(ALIGNMENT_KEY) + _U32.pack(ValueType.UINT32) + _U32.pack(DEFAULT_ALIGNMENT)
    )
    for entry in plan.typed_metadata:
        if entry.key != ARCHITECTURE_KEY:
            pairs.append(_string(entry.key) + _typed_value(entry))
    for key, value in plan.metadata.items():
        if key not in (ARCHITECTURE_KEY, ALIGNMENT_KEY) and key not in typed:
            pairs.append(_string(key) + _kv_string(value))
    out = bytearray(MAGIC + _U32.pack(WRITE_VERSION))
    out += _U64.pack(len(plan.tensors)) + _U64.pack(len(pairs))
    out += b"".join(pairs)
    offset = 0
    for tensor in plan.tensors:
        dims = tuple(reversed(tensor.shape))
        out += _string(tensor.name) + _U32.pack(len(dims))
        out += b"".join(_U64.pack(d) for d in dims)
        out += _U32.pack(WRITTEN_TYPES[tensor.dtype]) + _U64.pack(offset)
        offset += tensor.nbytes + -tensor.nbytes % DEFAULT_ALIGNMENT
    out += bytes(-len(out) % DEFAULT_ALIGNMENT)
    return bytes(out)


def _kv_string(value: str) -> bytes:
    return _U32.pack(ValueType.STRING) + _string(str(value))


def _typed_value(entry: TypedMetadata) -> bytes:
    """A typed value's type code and bytes; an array is its element type, count, elements."""
    kind = ValueType[entry.kind.upper()]
    if isinstance(entry.value, tuple):
        items = b"".join(_scalar(kind, item, entry.key) for item in entry.value)
        head = _U32.pack(ValueType.ARRAY) + _U32.pack(kind) + _U64.pack(len(entry.value))
        return head + items
    return _U32.pack(kind) + _scalar(kind, entry.value, entry.key)


def _scalar(kind: ValueType, value: TypedScalar, key: str) -> bytes:
    wrong = ConversionError(f"GGUF key {key!r}: {value!r} is not a {kind.name.lower()}")
    if kind == ValueType.STRING:
        if not isinstance(value, str):
            raise wrong
        return _string(value)
    if isinstance(value, str) or (kind == ValueType.BOOL) != isinstance(value, bool):
        raise wrong
    if isinstance(value, float) and kind not in (ValueType.FLOAT32, ValueType.FLOAT64):
        raise wrong
    try:
        return struct.pack(_PACKED[kind], value)
    except (struct.error, OverflowError):
        raise wrong from None


quantize_q8_0 = quantizing.q8_0


def quantized_blocks(tensor: OutputTensor) -> Iterator[NDArray]:
    """The blocks ``write_gguf`` writes for a tensor it quantizes, in the same slices."""
    return quantizing.quantized_blocks(tensor.source, tensor.dtype)


q8_0_blocks = quantized_blocks  # the name conversion.verifying imports


def write_gguf(handle: BinaryIO, plan: WritePlan) -> None:
    check(plan)
    write_all(handle, header_bytes(plan))
    for tensor in plan.tensors:
        if tensor.is_cast and tensor.dtype in quantizing.QUANTIZERS:
            written = 0
            for blocks in quantized_blocks(tensor):
                write_all(handle, blocks.tobytes())
                written += blocks.nbytes
            if written != tensor.nbytes:
                raise ConversionError(
                    f"tensor {tensor.name!r}: quantized {written} bytes, expected {tensor.nbytes}"
                )
        else:
            write_tensor(handle, tensor)
        write_all(handle, bytes(-tensor.nbytes % DEFAULT_ALIGNMENT))
