"""Element types, named the way torch spells them (without the ``torch.`` prefix).

One table ties each name to its numpy dtype (``ml_dtypes`` for bfloat16 and the float8
family), its width, and the codes each file format uses for it. Formats translate their
own codes here and nowhere else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from modelport.errors import UnsupportedDtypeError

if TYPE_CHECKING:
    import numpy as np

ML_DTYPES = "ml_dtypes."


@dataclass(frozen=True)
class DType:
    """One element type: its torch name, width in bits, and numpy equivalent (if any,
    resolved on first use so that ml_dtypes loads only when one of its types is met)."""

    name: str
    bits: int
    numpy_spec: str | None  # numpy's spelling ("<f4"), or "ml_dtypes.<type>"
    is_floating: bool = False
    # Block-quantized types (GGML's Q4_0, Q4_K, IQ2_XS ...): (elements, bytes) per block.
    block: tuple[int, int] | None = None

    @property
    def numpy(self) -> np.dtype | None:  # type: ignore[type-arg]
        return None if self.numpy_spec is None else _resolve(self.numpy_spec)

    @property
    def itemsize(self) -> int:
        return max(1, self.bits // 8)

    def nbytes(self, numel: int) -> int:
        """Bytes that ``numel`` elements occupy (whole blocks for block-quantized types)."""
        if self.block is None:
            return numel * max(1, self.bits // 8)
        elements, size = self.block
        return -(-numel // elements) * size


@functools.cache
def _resolve(spec: str) -> np.dtype:  # type: ignore[type-arg]
    """numpy's dtype for a spelling; ``ml_dtypes`` (a tenth of a second to import) only
    when one of its types is asked for."""
    import numpy as np

    if spec.startswith(ML_DTYPES):
        import ml_dtypes

        found: np.dtype = np.dtype(getattr(ml_dtypes, spec.removeprefix(ML_DTYPES)))  # type: ignore[type-arg]
        return found
    return np.dtype(spec)


_ALL: Final = (
    DType("float64", 64, "<f8", True),
    DType("float32", 32, "<f4", True),
    DType("float16", 16, "<f2", True),
    DType("bfloat16", 16, "ml_dtypes.bfloat16", True),
    DType("float8_e4m3fn", 8, "ml_dtypes.float8_e4m3fn", True),
    DType("float8_e5m2", 8, "ml_dtypes.float8_e5m2", True),
    DType("float8_e4m3fnuz", 8, "ml_dtypes.float8_e4m3fnuz", True),
    DType("float8_e5m2fnuz", 8, "ml_dtypes.float8_e5m2fnuz", True),
    DType("float8_e8m0fnu", 8, "ml_dtypes.float8_e8m0fnu", True),
    DType("complex128", 128, "<c16"),
    DType("complex64", 64, "<c8"),
    DType("complex32", 32, None),
    DType("int64", 64, "<i8"),
    DType("int32", 32, "<i4"),
    DType("int16", 16, "<i2"),
    DType("int8", 8, "i1"),
    DType("uint64", 64, "<u8"),
    DType("uint32", 32, "<u4"),
    DType("uint16", 16, "<u2"),
    DType("uint8", 8, "u1"),
    DType("bool", 8, "?"),
    DType("qint8", 8, "i1"),
    DType("quint8", 8, "u1"),
    DType("qint32", 32, "<i4"),
    DType("quint4x2", 8, "u1"),
    DType("quint2x4", 8, "u1"),
    DType("float4_e2m1fn_x2", 8, "u1"),
)

# GGML block-quantized types, named as GGML names them (gguf-py's GGML_QUANT_SIZES). numpy
# cannot hold them: their tensors are read as raw bytes (``TensorRef.raw_bytes``).
GGML_BLOCKS: Final = MappingProxyType(
    {
        "Q4_0": (32, 18),
        "Q4_1": (32, 20),
        "Q5_0": (32, 22),
        "Q5_1": (32, 24),
        "Q8_0": (32, 34),
        "Q8_1": (32, 40),
        "Q2_K": (256, 84),
        "Q3_K": (256, 110),
        "Q4_K": (256, 144),
        "Q5_K": (256, 176),
        "Q6_K": (256, 210),
        "Q8_K": (256, 292),
        "IQ2_XXS": (256, 66),
        "IQ2_XS": (256, 74),
        "IQ3_XXS": (256, 98),
        "IQ1_S": (256, 50),
        "IQ4_NL": (32, 18),
        "IQ3_S": (256, 110),
        "IQ2_S": (256, 82),
        "IQ4_XS": (256, 136),
        "IQ1_M": (256, 56),
        "TQ1_0": (256, 54),
        "TQ2_0": (256, 66),
        "MXFP4": (32, 17),
        "NVFP4": (64, 36),
        "Q1_0": (128, 18),
    }
)

_GGML: Final = tuple(
    DType(name, size * 8 // elements, None, True, (elements, size))
    for name, (elements, size) in GGML_BLOCKS.items()
)

DTYPES: Final = MappingProxyType({d.name: d for d in (*_ALL, *_GGML)})

# torch storage classes as they appear in pickles (``torch.FloatStorage``) -> dtype name.
TORCH_STORAGE_TYPES: Final = MappingProxyType(
    {
        "DoubleStorage": "float64",
        "FloatStorage": "float32",
        "HalfStorage": "float16",
        "BFloat16Storage": "bfloat16",
        "ComplexDoubleStorage": "complex128",
        "ComplexFloatStorage": "complex64",
        "LongStorage": "int64",
        "IntStorage": "int32",
        "ShortStorage": "int16",
        "CharStorage": "int8",
        "ByteStorage": "uint8",
        "BoolStorage": "bool",
        "QInt8Storage": "qint8",
        "QUInt8Storage": "quint8",
        "QInt32Storage": "qint32",
        "QUInt4x2Storage": "quint4x2",
        "QUInt2x4Storage": "quint2x4",
        "UntypedStorage": "uint8",
        # TorchScript's C++ pickler names every dtype's storage ``<ScalarType>Storage``
        "ComplexHalfStorage": "complex32",
        "UInt16Storage": "uint16",
        "UInt32Storage": "uint32",
        "UInt64Storage": "uint64",
        "Float8_e4m3fnStorage": "float8_e4m3fn",
        "Float8_e5m2Storage": "float8_e5m2",
        "Float8_e4m3fnuzStorage": "float8_e4m3fnuz",
        "Float8_e5m2fnuzStorage": "float8_e5m2fnuz",
        "Float8_e8m0fnuStorage": "float8_e8m0fnu",
    }
)

# Attribute names of ``torch`` that are dtypes, as pickles reference them (``torch.float32``).
TORCH_DTYPE_ATTRS: Final = MappingProxyType(
    {
        **{d.name: d.name for d in _ALL},
        "float": "float32",
        "double": "float64",
        "half": "float16",
        "long": "int64",
        "int": "int32",
        "short": "int16",
        "cfloat": "complex64",
        "cdouble": "complex128",
        "chalf": "complex32",
    }
)

# safetensors header codes, as the reference library's ``Dtype`` spells them (it has no
# complex128: such a file is refused, and nothing complex128 is written as safetensors).
SAFETENSORS_CODES: Final = MappingProxyType(
    {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
        "F4": "float4_e2m1fn_x2",
        "C64": "complex64",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
    }
)


# The codes numpy spells plain numbers with (kind and itemsize, as ``dtype.str`` and a
# pickled ``numpy.dtype`` write them), each to its torch name: readers take these without
# importing numpy, which costs a process a quarter of a second.
NUMPY_CODES: Final = MappingProxyType(
    {
        "b1": "bool",
        **{f"i{size}": f"int{8 * size}" for size in (1, 2, 4, 8)},
        **{f"u{size}": f"uint{8 * size}" for size in (1, 2, 4, 8)},
        **{f"f{size}": f"float{8 * size}" for size in (2, 4, 8)},
        "c8": "complex64",
        "c16": "complex128",
    }
)


def dtype(name: str) -> DType:
    """Look up a dtype by its torch name; unknown names are a format error upstream."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UnsupportedDtypeError(f"unknown dtype {name!r}") from None


def from_numpy(np_dtype: np.dtype) -> str:  # type: ignore[type-arg]
    """The torch name of a numpy dtype (byte order must already be little-endian or n/a)."""
    from_ml_dtypes = np_dtype.type.__module__.startswith("ml_dtypes")
    for d in _ALL:
        if d.numpy_spec is None or d.name.startswith("q"):
            continue
        if d.numpy_spec.startswith(ML_DTYPES) != from_ml_dtypes:
            continue
        if d.numpy == np_dtype:
            return d.name
    raise UnsupportedDtypeError(f"numpy dtype {np_dtype} has no torch equivalent")


def to_numpy(name: str) -> np.dtype:  # type: ignore[type-arg]
    """The numpy dtype of a torch dtype name; raises for types numpy cannot hold."""
    found = dtype(name).numpy
    if found is None:
        raise UnsupportedDtypeError(f"dtype {name} has no numpy equivalent")
    return found


# The spellings people type for a dtype (``--dtype fp16``, ``dtype="half"``), each to its torch
# name: numpy's and torch's long names, their short forms, GGUF's and safetensors' codes.
DTYPE_ALIASES: Final = MappingProxyType(
    {
        **{alias: "float16" for alias in ("fp16", "f16", "half", "float16")},
        **{alias: "bfloat16" for alias in ("bf16", "bfloat16")},
        **{alias: "float32" for alias in ("fp32", "f32", "float", "float32")},
        **{alias: "float64" for alias in ("fp64", "f64", "double", "float64")},
        **{alias: "float8_e4m3fn" for alias in ("fp8", "fp8_e4m3", "f8_e4m3", "e4m3")},
        **{alias: "float8_e5m2" for alias in ("fp8_e5m2", "f8_e5m2", "e5m2")},
    }
)


def canonical_name(text: str) -> str:
    """The torch name of a dtype as a person may spell it (``fp16``, ``torch.half``, ``BF16``);
    text that names no known dtype comes back unchanged, for the caller to refuse in its
    own words (it knows which dtypes it takes)."""
    key = text.strip().lower().removeprefix("torch.")
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    if key in DTYPES:
        return key
    return text
