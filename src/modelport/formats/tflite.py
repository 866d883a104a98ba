"""TFLite: a FlatBuffer whose root table is ``Model`` (tensorflow/compiler/mlir/lite/schema).

Layout (schema.fbs; slot ids as in the ``tflite`` package's generated code):

- bytes 0..4 MUST be the u32 offset of the root ``Model`` table; bytes 4..8 MUST be the
  file identifier ``TFL3``;
- ``Model``: ``version`` (0, u32), ``operator_codes`` (1), ``subgraphs`` (2),
  ``description`` (3), ``buffers`` (4), ``metadata_buffer`` (5), ``metadata`` (6: name ->
  buffer index), ``signature_defs`` (7);
- ``SubGraph``: ``tensors`` (0), ``inputs`` (1), ``outputs`` (2) as tensor indices,
  ``operators`` (3), ``name`` (4);
- ``Tensor``: ``shape`` (0, [int32]), ``type`` (1, ``TensorType``), ``buffer`` (2, index
  into ``Model.buffers``; 0 is the empty sentinel), ``name`` (3), ``quantization`` (4),
  ``sparsity`` (6);
- ``Buffer``: ``data`` (0, [ubyte]: the tensor's bytes, inside the flatbuffer, 16-byte
  aligned by the converter) or, for models past 2 GiB, ``offset`` (1) and ``size`` (2, u64):
  the bytes at that absolute file offset, after the flatbuffer (valid when offset > 1).

Every tensor with a non-empty buffer is listed, its bytes a zero-copy range of the file;
tensors without one (activations) are not. A buffer's size MUST equal shape x itemsize.
Sparse constants are listed dense (``_tflite_sparse``: densified when their values are read);
STRING, INT4 and resource/variant tensors are reported in ``details``, not listed.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from modelport import dtypes, limits
from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError
from modelport.formats._flatbuffers import FlatBuffer, Table
from modelport.formats._tflite_sparse import Sparsity, densify, read_sparsity
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import NDArray, Storage, TensorRef

IDENTIFIER = b"TFL3"
MAX_METADATA_TEXT = 4096


class ModelSlot(IntEnum):
    VERSION = 0
    OPERATOR_CODES = 1
    SUBGRAPHS = 2
    DESCRIPTION = 3
    BUFFERS = 4
    METADATA_BUFFER = 5
    METADATA = 6
    SIGNATURE_DEFS = 7


class SubGraphSlot(IntEnum):
    TENSORS = 0
    INPUTS = 1
    OUTPUTS = 2
    OPERATORS = 3
    NAME = 4


class TensorSlot(IntEnum):
    SHAPE = 0
    TYPE = 1
    BUFFER = 2
    NAME = 3
    QUANTIZATION = 4
    IS_VARIABLE = 5
    SPARSITY = 6


class BufferSlot(IntEnum):
    DATA = 0
    OFFSET = 1
    SIZE = 2


class OperatorCodeSlot(IntEnum):
    DEPRECATED_BUILTIN_CODE = 0
    CUSTOM_CODE = 1
    VERSION = 2
    BUILTIN_CODE = 3


class QuantizationSlot(IntEnum):
    SCALE = 2
    ZERO_POINT = 3
    QUANTIZED_DIMENSION = 6


class TensorType(IntEnum):
    FLOAT32 = 0
    FLOAT16 = 1
    INT32 = 2
    UINT8 = 3
    INT64 = 4
    STRING = 5
    BOOL = 6
    INT16 = 7
    COMPLEX64 = 8
    INT8 = 9
    FLOAT64 = 10
    COMPLEX128 = 11
    UINT64 = 12
    RESOURCE = 13
    VARIANT = 14
    UINT32 = 15
    UINT16 = 16
    INT4 = 17
    BFLOAT16 = 18


DTYPE_NAMES: Final = MappingProxyType(
    {
        TensorType.FLOAT32: "float32", TensorType.FLOAT16: "float16",
        TensorType.INT32: "int32", TensorType.UINT8: "uint8", TensorType.INT64: "int64",
        TensorType.BOOL: "bool", TensorType.INT16: "int16", TensorType.COMPLEX64: "complex64",
        TensorType.INT8: "int8", TensorType.FLOAT64: "float64",
        TensorType.COMPLEX128: "complex128", TensorType.UINT64: "uint64",
        TensorType.UINT32: "uint32", TensorType.UINT16: "uint16",
        TensorType.BFLOAT16: "bfloat16",
    }
)  # fmt: skip
TYPE_LABELS: Final = MappingProxyType(
    {int(t): DTYPE_NAMES.get(t, t.name.lower()) for t in TensorType}
)
DTYPE_BY_CODE: Final = MappingProxyType({int(t): name for t, name in DTYPE_NAMES.items()})
CUSTOM = 32
# BuiltinOperator names, indexed by code (schema.fbs, tflite 2.18: codes 0..208).
_BUILTIN_TEXT = """
    ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE
    EMBEDDING_LOOKUP FLOOR FULLY_CONNECTED HASHTABLE_LOOKUP L2_NORMALIZATION L2_POOL_2D
    LOCAL_RESPONSE_NORMALIZATION LOGISTIC LSH_PROJECTION LSTM MAX_POOL_2D MUL RELU
    RELU_N1_TO_1 RELU6 RESHAPE RESIZE_BILINEAR RNN SOFTMAX SPACE_TO_DEPTH SVDF TANH
    CONCAT_EMBEDDINGS SKIP_GRAM CALL CUSTOM EMBEDDING_LOOKUP_SPARSE PAD
    UNIDIRECTIONAL_SEQUENCE_RNN GATHER BATCH_TO_SPACE_ND SPACE_TO_BATCH_ND TRANSPOSE MEAN SUB
    DIV SQUEEZE UNIDIRECTIONAL_SEQUENCE_LSTM STRIDED_SLICE BIDIRECTIONAL_SEQUENCE_RNN EXP
    TOPK_V2 SPLIT LOG_SOFTMAX DELEGATE BIDIRECTIONAL_SEQUENCE_LSTM CAST PRELU MAXIMUM ARG_MAX
    MINIMUM LESS NEG PADV2 GREATER GREATER_EQUAL LESS_EQUAL SELECT SLICE SIN TRANSPOSE_CONV
    SPARSE_TO_DENSE TILE EXPAND_DIMS EQUAL NOT_EQUAL LOG SUM SQRT RSQRT SHAPE POW ARG_MIN
    FAKE_QUANT REDUCE_PROD REDUCE_MAX PACK LOGICAL_OR ONE_HOT LOGICAL_AND LOGICAL_NOT UNPACK
    REDUCE_MIN FLOOR_DIV REDUCE_ANY SQUARE ZEROS_LIKE FILL FLOOR_MOD RANGE
    RESIZE_NEAREST_NEIGHBOR LEAKY_RELU SQUARED_DIFFERENCE MIRROR_PAD ABS SPLIT_V UNIQUE CEIL
    REVERSE_V2 ADD_N GATHER_ND COS WHERE RANK ELU REVERSE_SEQUENCE MATRIX_DIAG QUANTIZE
    MATRIX_SET_DIAG ROUND HARD_SWISH IF WHILE NON_MAX_SUPPRESSION_V4 NON_MAX_SUPPRESSION_V5
    SCATTER_ND SELECT_V2 DENSIFY SEGMENT_SUM BATCH_MATMUL PLACEHOLDER_FOR_GREATER_OP_CODES
    CUMSUM CALL_ONCE BROADCAST_TO RFFT2D CONV_3D IMAG REAL COMPLEX_ABS HASHTABLE
    HASHTABLE_FIND HASHTABLE_IMPORT HASHTABLE_SIZE REDUCE_ALL CONV_3D_TRANSPOSE VAR_HANDLE
    READ_VARIABLE ASSIGN_VARIABLE BROADCAST_ARGS RANDOM_STANDARD_NORMAL BUCKETIZE
    RANDOM_UNIFORM MULTINOMIAL GELU DYNAMIC_UPDATE_SLICE RELU_0_TO_1 UNSORTED_SEGMENT_PROD
    UNSORTED_SEGMENT_MAX UNSORTED_SEGMENT_SUM ATAN2 UNSORTED_SEGMENT_MIN SIGN BITCAST
    BITWISE_XOR RIGHT_SHIFT STABLEHLO_LOGISTIC STABLEHLO_ADD STABLEHLO_DIVIDE
    STABLEHLO_MULTIPLY STABLEHLO_MAXIMUM STABLEHLO_RESHAPE STABLEHLO_CLAMP
    STABLEHLO_CONCATENATE STABLEHLO_BROADCAST_IN_DIM STABLEHLO_CONVOLUTION STABLEHLO_SLICE
    STABLEHLO_CUSTOM_CALL STABLEHLO_REDUCE STABLEHLO_ABS STABLEHLO_AND STABLEHLO_COSINE
    STABLEHLO_EXPONENTIAL STABLEHLO_FLOOR STABLEHLO_LOG STABLEHLO_MINIMUM STABLEHLO_NEGATE
    STABLEHLO_OR STABLEHLO_POWER STABLEHLO_REMAINDER STABLEHLO_RSQRT STABLEHLO_SELECT
    STABLEHLO_SUBTRACT STABLEHLO_TANH STABLEHLO_SCATTER STABLEHLO_COMPARE STABLEHLO_CONVERT
    STABLEHLO_DYNAMIC_SLICE STABLEHLO_DYNAMIC_UPDATE_SLICE STABLEHLO_PAD STABLEHLO_IOTA
    STABLEHLO_DOT_GENERAL STABLEHLO_REDUCE_WINDOW STABLEHLO_SORT STABLEHLO_WHILE
    STABLEHLO_GATHER STABLEHLO_TRANSPOSE DILATE STABLEHLO_RNG_BIT_GENERATOR REDUCE_WINDOW
    STABLEHLO_COMPOSITE STABLEHLO_SHIFT_LEFT STABLEHLO_CBRT"""
BUILTIN_NAMES: Final = tuple(_BUILTIN_TEXT.split())


def sniff(probe: Probe) -> bool:
    """The identifier at 4..8 and a root offset past it (a truncated file still sniffs, so
    reading it can say it is truncated)."""
    if probe.is_dir or len(probe.head) < 8 or probe.head[4:8] != IDENTIFIER:
        return False
    root: int = struct.unpack_from("<I", probe.head, 0)[0]
    return 8 <= root < 1 << 31


def type_label(code: int) -> str:
    return TYPE_LABELS.get(code) or f"tflite-type-{code}"


def read(path: Path, probe: Probe) -> Contents:
    if probe.size < 16:
        raise TruncatedFileError(
            "TFLite file shorter than its header", expected=16, actual=probe.size, path=path
        )
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[4:8] != IDENTIFIER:
            raise CorruptFileError("not a TFLite file (no TFL3 identifier)", path=path)
        return _Reader(FlatBuffer(m, path), path).model()


class _Reader:
    def __init__(self, buf: FlatBuffer, path: Path) -> None:
        self.buf = buf
        self.path = path
        self.buffers: list[Table] = []
        self.storages: dict[int, Storage | None] = {}
        self.warnings: list[str] = []
        self.skipped: dict[str, str] = {}
        self.tensor_count = 0

    def corrupt(self, message: str) -> CorruptFileError:
        return CorruptFileError(message, path=self.path)

    def model(self) -> Contents:
        model = self.buf.root("Model")
        self.buffers = model.tables(ModelSlot.BUFFERS, "Buffer")
        opcodes = [self.opcode(t) for t in model.tables(ModelSlot.OPERATOR_CODES, "OperatorCode")]
        tree: dict[str, TensorRef] = {}
        op_counts: Counter[str] = Counter()
        subgraphs: list[dict[str, Any]] = []
        for index, subgraph in enumerate(model.tables(ModelSlot.SUBGRAPHS, "SubGraph")):
            subgraphs.append(self.subgraph(index, subgraph, tree, opcodes, op_counts))
        details: dict[str, Any] = {
            "version": model.scalar(ModelSlot.VERSION, "<I", 0),
            "description": model.string(ModelSlot.DESCRIPTION),
            "subgraph_count": len(subgraphs),
            "buffer_count": len(self.buffers),
            "operator_codes": opcodes,
            "op_counts": dict(op_counts.most_common()),
            "subgraphs": subgraphs,
        }
        if subgraphs:
            details["inputs"] = subgraphs[0]["inputs"]
            details["outputs"] = subgraphs[0]["outputs"]
        signatures = self.signatures(model)
        if signatures:
            details["signatures"] = signatures
        if self.skipped:
            details["skipped_tensors"] = self.skipped
        metadata = self.metadata(model)
        return Contents(Format.TFLITE, tree, metadata, details, warnings=self.warnings)

    def opcode(self, table: Table) -> str:
        deprecated = table.scalar(OperatorCodeSlot.DEPRECATED_BUILTIN_CODE, "<b", 0)
        code = max(deprecated, table.scalar(OperatorCodeSlot.BUILTIN_CODE, "<i", 0))
        version = table.scalar(OperatorCodeSlot.VERSION, "<i", 1)
        if code == CUSTOM:
            return f"CUSTOM:{table.string(OperatorCodeSlot.CUSTOM_CODE)}"
        name = BUILTIN_NAMES[code] if 0 <= code < len(BUILTIN_NAMES) else f"BUILTIN_{code}"
        return f"{name}" if version == 1 else f"{name}/v{version}"

    def subgraph(
        self,
        index: int,
        table: Table,
        tree: dict[str, TensorRef],
        opcodes: list[str],
        op_counts: Counter[str],
    ) -> dict[str, Any]:
        name = table.string(SubGraphSlot.NAME)
        prefix = "" if index == 0 else f"{name or f'subgraph{index}'}/"
        declared = table.vector(SubGraphSlot.TENSORS, 4)
        self.tensor_count += declared[1] if declared else 0
        if self.tensor_count > limits.MAX_TFLITE_TENSORS:
            raise LimitExceededError("TFLite tensors", limits.MAX_TFLITE_TENSORS, self.tensor_count)
        tensors = table.tables(SubGraphSlot.TENSORS, f"subgraph {index} Tensor")
        infos: list[dict[str, Any]] = []
        for position, tensor in enumerate(tensors):
            info = self.tensor(tensor, position)
            infos.append(info)
            ref = info.pop("ref", None)
            if ref is None:
                continue
            key = prefix + (info["name"] or f"tensor_{position}")
            if key in tree:
                self.warnings.append(
                    f"tensor name {key!r} appears twice; listed as {key}:{position}"
                )
                key = f"{key}:{position}"
            tree[key] = ref
        operators = table.tables(SubGraphSlot.OPERATORS, f"subgraph {index} Operator")
        for operator in operators:
            code = operator.scalar(0, "<I", 0)
            if code >= len(opcodes):
                raise self.corrupt(f"operator uses opcode {code} of {len(opcodes)}")
            op_counts[opcodes[code].split("/v")[0]] += 1

        def endpoints(slot: int) -> list[dict[str, Any]]:
            found = []
            for position in table.scalars(slot, "<i", len(infos)):
                if not 0 <= position < len(infos):
                    raise self.corrupt(f"subgraph {index} names tensor {position} of {len(infos)}")
                info = infos[position]
                found.append({k: info[k] for k in ("name", "dtype", "shape")})
            return found

        return {
            "name": name,
            "tensors": len(infos),
            "operators": len(operators),
            "inputs": endpoints(SubGraphSlot.INPUTS),
            "outputs": endpoints(SubGraphSlot.OUTPUTS),
        }

    def tensor(self, table: Table, position: int) -> dict[str, Any]:
        """A tensor's facts, and under ``ref`` its TensorRef when it holds constant data."""
        name = table.string(TensorSlot.NAME)
        shape = table.scalars(TensorSlot.SHAPE, "<i", limits.MAX_RANK)
        code = table.scalar(TensorSlot.TYPE, "<b", 0)
        info: dict[str, Any] = {"name": name, "dtype": type_label(code), "shape": shape}
        storage = self.storage(table.scalar(TensorSlot.BUFFER, "<I", 0))
        if storage is None:
            return info
        label = name or f"tensor_{position}"
        dtype = DTYPE_BY_CODE.get(code)
        sparsity = table.ref(TensorSlot.SPARSITY)
        if dtype is not None and sparsity != 0:
            try:
                parameters = read_sparsity(self.buf.table(sparsity, "sparsity"), len(shape))
            except CorruptFileError as exc:  # that tensor alone cannot be read
                self.skipped[label] = "sparse (unreadable parameters)"
                self.warnings.append(f"tensor {label!r}: {exc}")
                return info
            info["ref"] = _densified(dtype, tuple(shape), storage, parameters, label)
            return info
        if dtype is None:
            reason = type_label(code)
            self.skipped[label] = reason
            if code != TensorType.STRING:
                self.warnings.append(f"tensor {label!r}: {reason} tensors are not supported")
            return info
        if any(d < 0 for d in shape):
            raise self.corrupt(f"constant tensor {label!r} has a negative dimension in {shape}")
        nbytes = math.prod(shape) * dtypes.dtype(dtype).itemsize
        if nbytes != storage.nbytes:
            raise self.corrupt(
                f"tensor {label!r}: shape {shape} of {dtype} needs {nbytes} bytes, its buffer "
                f"holds {storage.nbytes}"
            )
        note = self.quantization(table)
        info["ref"] = TensorRef(dtype, tuple(shape), storage, note=note)
        return info

    def storage(self, index: int) -> Storage | None:
        """The bytes of buffer ``index`` (one shared Storage per buffer), None when empty."""
        if index in self.storages:
            return self.storages[index]
        if index >= len(self.buffers):
            raise self.corrupt(f"tensor uses buffer {index} of {len(self.buffers)}")
        found: Storage | None = None
        if index > 0:
            table = self.buffers[index]
            span = table.vector(BufferSlot.DATA, 1)
            offset = table.scalar(BufferSlot.OFFSET, "<Q", 0)
            if span is not None and span[1] > 0:
                found = Storage(self.path, span[0], span[1], key=f"buffer {index}")
            elif offset > 1:
                size = table.scalar(BufferSlot.SIZE, "<Q", 0)
                self.buf.need(offset, size, f"buffer {index}")
                found = Storage(self.path, offset, size, key=f"buffer {index}")
        self.storages[index] = found
        return found

    def quantization(self, table: Table) -> str:
        at = table.ref(TensorSlot.QUANTIZATION)
        if at == 0:
            return ""
        params = self.buf.table(at, "QuantizationParameters")
        scales = params.scalars(QuantizationSlot.SCALE, "<f", 1 << 24)
        zeros = params.scalars(QuantizationSlot.ZERO_POINT, "<q", 1 << 24)
        if not scales:
            return ""
        if len(scales) == 1:
            return f"quantized: scale={scales[0]:.6g}, zero_point={zeros[0] if zeros else 0}"
        axis = params.scalar(QuantizationSlot.QUANTIZED_DIMENSION, "<i", 0)
        return f"quantized per axis {axis}: {len(scales)} scales"

    def metadata(self, model: Table) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for entry in model.tables(ModelSlot.METADATA, "Metadata"):
            name = entry.string(0)
            index = entry.scalar(1, "<I", 0)
            if index >= len(self.buffers):
                raise self.corrupt(f"metadata {name!r} uses buffer {index} of {len(self.buffers)}")
            storage = self.storage(index)
            size = 0 if storage is None else storage.nbytes
            found[name] = f"<{size} bytes in buffer {index}>"
            if storage is not None and size <= MAX_METADATA_TEXT:
                raw = bytes(self.buf.data[storage.offset : storage.offset + size])
                text = raw.rstrip(b"\x00")
                if text.isascii() and all(32 <= c < 127 or c in b"\t\n\r" for c in text):
                    found[name] = text.decode("ascii")
        return found

    def signatures(self, model: Table) -> list[dict[str, Any]]:
        found = []
        for signature in model.tables(ModelSlot.SIGNATURE_DEFS, "SignatureDef"):
            maps = {}
            for slot, key in ((0, "inputs"), (1, "outputs")):
                maps[key] = {t.string(0): t.scalar(1, "<I", 0) for t in signature.tables(slot, key)}
            found.append(
                {"key": signature.string(2), "subgraph": signature.scalar(4, "<I", 0), **maps}
            )
        return found


READER = FormatReader(Format.TFLITE, sniff, read, (".tflite",))


def _densified(
    dtype: str, shape: tuple[int, ...], stored: Storage, sparsity: Sparsity, label: str
) -> TensorRef:
    """A sparse constant as the dense tensor it stands for, made when its values are read."""
    if any(d < 0 for d in shape):
        raise CorruptFileError(f"sparse tensor {label!r} has a negative dimension in {shape}")

    def dense_bytes() -> NDArray:
        values = stored.bytes_view().view(dtypes.to_numpy(dtype))
        return densify(sparsity, shape, values).reshape(-1).view("uint8")

    nbytes = math.prod(shape) * dtypes.dtype(dtype).itemsize
    storage = Storage(stored.path, stored.offset, nbytes, key=label, reader=dense_bytes)
    return TensorRef(dtype, shape, storage, note="stored sparse; densified when read")
