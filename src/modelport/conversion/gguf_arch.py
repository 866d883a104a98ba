"""Hugging Face folders as GGUF files llama.cpp runs: architecture, hyperparameters,
llama.cpp's tensor names and layouts, and the vocabulary.

llama.cpp loads a model only when the file says what it is: ``general.architecture``, the
hyperparameters it reads for that architecture (``{arch}.block_count`` ...) and tensors under
its own names (``blk.0.attn_q.weight``). Those names and keys are gguf-py's (``TensorNameMap``,
``Keys``), so the conversion runs only with gguf-py installed and for an architecture listed
in ``ARCHITECTURES``; otherwise the tensors are written as they are, under their Hugging Face
names, and a note says llama.cpp will not run the file.

Layouts follow llama.cpp's ``convert_hf_to_gguf.py``, each a strided view of the source, so the
writer still streams every tensor in bounded memory:

- Llama's ``q_proj`` / ``k_proj`` rows are reordered per head from Hugging Face's rotary
  layout (the two halves of a head) to llama.cpp's (interleaved pairs): the rows seen as
  ``(heads, 2, head_dim / 2)`` are swapped to ``(heads, head_dim / 2, 2)``, ``heads`` being
  the key/value head count for ``k_proj``. That is a 4-d view of the stored matrix written
  under its own 2-d shape (``OutputTensor.written_shape``).
- GPT-2's ``Conv1D`` weights (``c_attn``, ``c_proj``, ``c_fc``) are stored ``(in, out)``;
  llama.cpp wants ``(out, in)``: a transposed view. Its tied ``lm_head`` is written as
  ``output.weight`` from the embedding, as llama.cpp's converter does.
- Llama 3.1's RoPE scaling (``rope_type: llama3``) becomes llama.cpp's ``rope_freqs.weight``,
  computed from config.json (a few hundred bytes, held in memory).
- Which tensors take the type asked (norms, biases and position embeddings stay float32, as
  in llama.cpp's converter) is ``gguf_quantizing``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modelport import dtypes
from modelport.conversion import gguf_quantizing, gguf_vocab
from modelport.errors import ModelportError
from modelport.formats import _hf_folder
from modelport.formats.protocol import FormatReader
from modelport.loading.model_file import ModelFile
from modelport.tensors import Storage, TensorRef, byte_array, contiguous_strides
from modelport.transfer.write_plan import OutputTensor, TypedKind, TypedMetadata, TypedScalar

# Hugging Face ``architectures`` entries -> gguf-py's architecture name
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
}
SUFFIXES = (".weight", ".bias")
QUANT_VERSION = 2  # GGML_QUANT_VERSION, which llama.cpp's converter always writes
# llama.cpp's general.file_type (gguf-py's LlamaFileType) for the dtype most matrices have
FILE_TYPES = {
    "float32": 0,
    "float16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "bfloat16": 32,
    "TQ1_0": 36,
    "TQ2_0": 37,
    "MXFP4": 38,  # MOSTLY_MXFP4_MOE, the only MXFP4 file type llama.cpp names
}
_GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF target is written with: its tensors (renamed and reshaped for llama.cpp,
    or as they came), the typed metadata, notes for the report, and whether the tensors
    carry llama.cpp's names."""

    tensors: tuple[OutputTensor, ...]
    metadata: tuple[TypedMetadata, ...] = ()
    notes: tuple[str, ...] = ()
    runnable: bool = False


def for_llama_cpp(
    model: ModelFile, writer: FormatReader, outputs: Sequence[OutputTensor], cast: str | None
) -> GGUFModel:
    """``outputs`` as llama.cpp reads them when the target is GGUF and the source a Hugging
    Face folder of a known architecture; as they are (with a note) for any other GGUF target
    but a GGUF source (whose tensors already carry llama.cpp's names). Either way each tensor
    is stored in the type llama.cpp's converter would give it (``gguf_quantizing``), floats
    that are not quantized after all as ``cast`` (else float32)."""
    if writer.format.value != "gguf":
        return GGUFModel(tuple(outputs))
    mapped = GGUFModel(tuple(outputs), runnable=True)
    if model.format.value != "gguf":
        mapped = _mapped(model.path, model.format.value, outputs)
    kept = gguf_quantizing.settled(mapped.tensors, cast or "float32", mapped.runnable)
    metadata = mapped.metadata
    if mapped.runnable and metadata:
        file_type = TypedMetadata("general.file_type", "uint32", _file_type(kept.tensors))
        metadata = (*metadata, file_type)
    return GGUFModel(kept.tensors, metadata, (*mapped.notes, *kept.notes), mapped.runnable)


def _mapped(source: Path, source_format: str, outputs: Sequence[OutputTensor]) -> GGUFModel:
    """The tensors renamed and laid out for llama.cpp with the architecture's metadata, or
    as they are with a note saying why not."""
    if source_format != "hf-dir":
        return _tensors_only(outputs, "the source is not a Hugging Face folder with config.json")
    try:
        import gguf
    except ImportError:
        return _tensors_only(outputs, "gguf-py is not installed (pip install 'modelport[gguf]')")
    try:
        config = _hf_folder.load_json(source / _hf_folder.CONFIG_NAME)
    except (ModelportError, OSError) as exc:
        return _tensors_only(outputs, f"its config.json could not be read ({exc})")
    named = [a for a in config.get("architectures") or () if a in ARCHITECTURES]
    if not named:
        listed = ", ".join(map(str, config.get("architectures") or ())) or "no architecture"
        known = ", ".join(ARCHITECTURES)
        return _tensors_only(outputs, f"config.json names {listed} (modelport maps {known})")
    arch = ARCHITECTURES[named[0]]
    try:
        hparams = HYPERPARAMETERS[arch](config)
        tensors = _llama_cpp_tensors(gguf, arch, config, outputs)
    except _Unmappable as exc:
        return _tensors_only(outputs, str(exc))
    vocab = gguf_vocab.read(source, config, int(config.get("vocab_size") or 0))
    general = [
        TypedMetadata("general.architecture", "string", arch),
        TypedMetadata("general.name", "string", _model_name(source, config)),
        TypedMetadata("general.quantization_version", "uint32", QUANT_VERSION),
    ]
    arch_keys = [TypedMetadata(key.format(arch=arch), kind, v) for key, kind, v in hparams]
    notes = [f"written for llama.cpp as a {arch} model ({named[0]}), tensors renamed"]
    return GGUFModel(
        tuple(tensors), (*general, *arch_keys, *vocab.metadata), (*notes, *vocab.notes), True
    )


class _Unmappable(Exception):
    """A config or tensor the architecture's conversion cannot place: tensors only."""


def _tensors_only(outputs: Sequence[OutputTensor], reason: str) -> GGUFModel:
    note = (
        f"llama.cpp will not run this GGUF file: {reason}; it holds the tensors under their "
        "own names, without general.architecture, hyperparameters or a vocabulary"
    )
    return GGUFModel(tuple(outputs), (), (note,))


def _model_name(source: Path, config: dict[str, Any]) -> str:
    named = config.get("_name_or_path")
    if isinstance(named, str) and named.strip():
        return Path(named.rstrip("/")).name or source.name
    return source.resolve().name


def _file_type(tensors: Iterable[OutputTensor]) -> int:
    counts: dict[str, int] = {}
    for tensor in tensors:
        if len(tensor.shape) >= 2 and tensor.dtype in FILE_TYPES:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    return FILE_TYPES[max(counts, key=counts.__getitem__)] if counts else 0


# -- hyperparameters --------------------------------------------------------------------------
Hyperparameter = tuple[str, TypedKind, TypedScalar]


def _number(config: dict[str, Any], *names: str, default: float | None = None) -> float:
    for name in names:
        value = config.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    if default is None:
        raise _Unmappable(f"config.json has no {' or '.join(names)}")
    return default


def _count(config: dict[str, Any], *names: str, default: int | None = None) -> int:
    value = _number(config, *names, default=default)
    if value != int(value) or value < 0:
        raise _Unmappable(f"config.json's {names[0]} is {value}, not a count")
    return int(value)


def _rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE in ``rope_parameters``; older configs in ``rope_theta`` and
    ``rope_scaling``."""
    merged: dict[str, Any] = {}
    for name in ("rope_scaling", "rope_parameters"):
        value = config.get(name)
        if isinstance(value, dict):
            merged.update(value)
    if "rope_theta" in config:
        merged.setdefault("rope_theta", config["rope_theta"])
    return merged


def _llama(config: dict[str, Any]) -> list[Hyperparameter]:
    heads = _count(config, "num_attention_heads")
    hidden = _count(config, "hidden_size")
    head_dim = _count(config, "head_dim", default=hidden // heads if heads else 0)
    rope = _rope_settings(config)
    keys: list[Hyperparameter] = [
        ("{arch}.vocab_size", "uint32", _count(config, "vocab_size")),
        ("{arch}.context_length", "uint32", _count(config, "max_position_embeddings")),
        ("{arch}.embedding_length", "uint32", hidden),
        ("{arch}.feed_forward_length", "uint32", _count(config, "intermediate_size")),
        ("{arch}.block_count", "uint32", _count(config, "num_hidden_layers")),
        ("{arch}.attention.head_count", "uint32", heads),
        (
            "{arch}.attention.head_count_kv",
            "uint32",
            _count(config, "num_key_value_heads", default=heads),
        ),
        ("{arch}.attention.key_length", "uint32", head_dim),
        ("{arch}.attention.value_length", "uint32", head_dim),
        ("{arch}.rope.dimension_count", "uint32", head_dim),
        ("{arch}.rope.freq_base", "float32", float(_number(rope, "rope_theta", default=1e4))),
        (
            "{arch}.attention.layer_norm_rms_epsilon",
            "float32",
            float(_number(config, "rms_norm_eps", default=1e-6)),
        ),
    ]
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("linear", "yarn"):
        keys.append(("{arch}.rope.scaling.type", "string", str(kind)))
        keys.append(("{arch}.rope.scaling.factor", "float32", float(_number(rope, "factor"))))
        if kind == "yarn" and "original_max_position_embeddings" in rope:
            original = _count(rope, "original_max_position_embeddings")
            keys.append(("{arch}.rope.scaling.original_context_length", "uint32", original))
    elif kind not in ("default", "llama3", None):  # llama3: the rope_freqs tensor
        raise _Unmappable(f"RoPE scaling {kind!r} is not mapped by modelport")
    return keys


def _gpt2(config: dict[str, Any]) -> list[Hyperparameter]:
    hidden = _count(config, "n_embd", "hidden_size")
    return [
        ("{arch}.vocab_size", "uint32", _count(config, "vocab_size")),
        # llama.cpp sizes position_embd by it: the rows of wpe, n_positions (n_ctx is older)
        ("{arch}.context_length", "uint32", _count(config, "n_positions", "n_ctx")),
        ("{arch}.embedding_length", "uint32", hidden),
        ("{arch}.feed_forward_length", "uint32", _count(config, "n_inner", default=4 * hidden)),
        ("{arch}.block_count", "uint32", _count(config, "n_layer", "num_hidden_layers")),
        ("{arch}.attention.head_count", "uint32", _count(config, "n_head")),
        (
            "{arch}.attention.layer_norm_epsilon",
            "float32",
            float(_number(config, "layer_norm_epsilon", default=1e-5)),
        ),
    ]


HYPERPARAMETERS: dict[str, Callable[[dict[str, Any]], list[Hyperparameter]]] = {
    "llama": _llama,
    "gpt2": _gpt2,
}


# -- tensors ----------------------------------------------------------------------------------
def permuted_heads(tensor: TensorRef, heads: int) -> TensorRef:
    """llama.cpp's row order for a rotary projection, as a view of ``tensor``'s storage:
    rows ``(heads, 2, half)`` read as ``(heads, half, 2)`` (4-d for a matrix, 3-d for a
    bias); written under ``tensor.shape`` it is ``convert_hf_to_gguf``'s ``permute``."""
    rows = tensor.shape[0] if tensor.shape else 0
    if heads <= 0 or rows % (2 * heads):
        raise _Unmappable(f"{rows} rows do not split into {heads} rotary heads")
    half = rows // heads // 2
    step, *rest = tensor.strides or contiguous_strides(tensor.shape)
    return TensorRef(
        tensor.dtype,
        (heads, half, 2, *tensor.shape[1:]),
        tensor.storage,
        tensor.element_offset,
        (2 * half * step, step, half * step, *rest),
        tensor.note,
    )


def transposed(tensor: TensorRef) -> TensorRef:
    """A matrix's transpose, as a view of its storage."""
    rows, cols = tensor.shape
    down, across = tensor.strides or contiguous_strides(tensor.shape)
    return TensorRef(
        tensor.dtype, (cols, rows), tensor.storage, tensor.element_offset, (across, down)
    )


def llama3_rope_factors(config: dict[str, Any]) -> TensorRef:
    """Llama 3.1's RoPE scaling as llama.cpp takes it: ``rope_freqs.weight``, one divisor
    per rotary frequency (1 for short wavelengths, ``factor`` for long ones, a smooth blend
    between), the ratio of the plain frequencies to transformers' llama3 ones."""
    import numpy as np

    rope = _rope_settings(config)
    heads = _count(config, "num_attention_heads")
    dims = _count(config, "head_dim", default=_count(config, "hidden_size") // max(heads, 1))
    theta = _number(rope, "rope_theta", default=1e4)
    factor = _number(rope, "factor", default=8.0)
    low, high = (
        _number(rope, "low_freq_factor", default=1.0),
        _number(rope, "high_freq_factor", default=4.0),
    )
    original = _number(rope, "original_max_position_embeddings", default=8192)
    if high <= low:
        raise _Unmappable(f"llama3 RoPE needs high_freq_factor > low_freq_factor ({high}, {low})")
    frequencies = 1.0 / theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    wavelengths = 2 * np.pi / frequencies
    smooth = (original / wavelengths - low) / (high - low)
    divisors = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelengths < original / high, 1.0, divisors)
    divisors = np.where(wavelengths > original / low, factor, divisors).astype(np.float32)
    data = divisors.tobytes()
    storage = Storage(None, 0, len(data), key="rope_freqs", reader=lambda: byte_array(data))
    return TensorRef("float32", divisors.shape, storage, note="computed from config.json")


def _layout(arch: str, config: dict[str, Any], tensor: OutputTensor) -> OutputTensor:
    """The tensor in llama.cpp's layout for ``arch`` (see the module docstring)."""
    source, name = tensor.source, tensor.name
    if dtypes.dtype(source.dtype).numpy is None and (
        name.endswith(_GPT2_CONV1D) or "q_proj." in name or "k_proj." in name
    ):
        raise _Unmappable(f"{name} is stored as {source.dtype}, which cannot be re-laid out")
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
        heads = _count(config, "num_attention_heads")
        return replace(tensor, source=permuted_heads(source, heads), written_shape=source.shape)
    if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = _count(config, "num_key_value_heads", "num_attention_heads")
        return replace(tensor, source=permuted_heads(source, heads), written_shape=source.shape)
    if arch == "gpt2" and name.endswith(_GPT2_CONV1D) and len(source.shape) == 2:
        return replace(tensor, source=transposed(source))
    return tensor


def _llama_cpp_tensors(
    gguf: Any, arch: str, config: dict[str, Any], outputs: Sequence[OutputTensor]
) -> list[OutputTensor]:
    """Every tensor renamed through gguf-py's map for ``arch`` and laid out for llama.cpp;
    tensors the map marks as never written (rotary caches) are left out."""
    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    blocks = _count(config, "num_hidden_layers", "n_layer")
    names = gguf.get_tensor_name_map(model_arch, blocks)
    skipped = set(gguf.MODEL_TENSOR_SKIP.get(model_arch, ()))
    result: list[OutputTensor] = []
    for tensor in outputs:
        if arch == "gpt2" and tensor.name.endswith(_GPT2_BUFFERS):
            continue
        found = names.get_type_and_name(tensor.name, try_suffixes=SUFFIXES)
        if found is None:
            raise _Unmappable(f"gguf-py has no {arch} name for the tensor {tensor.name!r}")
        kind, new_name = found
        if kind in skipped:
            continue
        laid_out = _layout(arch, config, tensor)
        result.append(replace(laid_out, name=new_name))
    if arch == "llama" and _rope_settings(config).get("rope_type") == "llama3":
        result.append(OutputTensor("rope_freqs.weight", "float32", llama3_rope_factors(config)))
    names_written = {t.name for t in result}
    embedding = next((t for t in result if t.name == "token_embd.weight"), None)
    if arch == "gpt2" and "output.weight" not in names_written and embedding is not None:
        result.append(replace(embedding, name="output.weight"))
    return result
