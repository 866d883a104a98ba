"""GGUF: llama.cpp's single-file format; a typed key/value header, tensor infos, aligned data.

Layout (ggml/docs/gguf.md; all integers little-endian, strings are a u64 length + UTF-8):

- bytes 0..4 MUST be ``b"GGUF"``; then ``version`` (u32), ``tensor_count`` (u64) and
  ``kv_count`` (u64). Version 1 used u32 counts and lengths and is refused; 2 and 3 are read
  (3 only added big-endian files, which are refused: their version reads byte-swapped);
- ``kv_count`` pairs: key (string), value type (u32), value. Types are the integers of 8 to
  64 bits, f32, f64, bool (u8), string, and array (element type u32, count u64, elements);
  arrays MAY nest;
- ``tensor_count`` infos: name (string), ``n_dims`` (u32, at most 4), ``n_dims`` u64 dims in
  GGML order (``ne[0]``, the fastest-varying, first), GGML type (u32), offset (u64) relative
  to the data section;
- the data section starts at the end of the infos rounded up to ``general.alignment`` (a u32
  power of two, default 32); each tensor offset MUST be a multiple of it.

This module holds the codes and tables both the reader and the writer need.
"""

from __future__ import annotations

from enum import IntEnum

from modelport import dtypes

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
PREFIX = 8  # magic and version; tensor_count and kv_count follow (u64 since version 2)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DIM = (1 << 63) - 1  # ggml stores dims as int64


class ValueType(IntEnum):
    """``gguf_type``: the type code of a metadata value."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class GGMLType(IntEnum):
    """``ggml_type``: a tensor's element or block type (gaps are removed types)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


PLAIN_TYPES = {
    GGMLType.F32: "float32",
    GGMLType.F16: "float16",
    GGMLType.BF16: "bfloat16",
    GGMLType.F64: "float64",
    GGMLType.I8: "int8",
    GGMLType.I16: "int16",
    GGMLType.I32: "int32",
    GGMLType.I64: "int64",
}

# plain types, and GGML's block types: those gguf-py quantizes (Q4_0 ... Q8_0, TQ1_0, TQ2_0,
# MXFP4) quantized by the writer, the others copied as they are from a GGUF source
WRITTEN_TYPES = {
    **{dtype: code for code, dtype in PLAIN_TYPES.items()},
    **{code.name: code for code in GGMLType if code.name in dtypes.GGML_BLOCKS},
}


def holds(dtype: str) -> bool:
    return dtype in WRITTEN_TYPES
