"""GGUF files llama.cpp runs, back into Hugging Face folders ``from_pretrained`` loads.

A GGUF of a known architecture (``general.architecture``) holds its tensors under llama.cpp's
names and layouts and its hyperparameters as typed keys; transformers wants its own names,
layouts and a ``config.json``. This is ``gguf_arch`` run backwards:

- names: gguf-py's ``TensorNameMap`` inverted. gguf-py lists every model family's spelling of
  a tensor (``model.layers.0.self_attn.q_proj``, ``layers.0.attention.wq`` ...); the one kept
  is the one the transformers class of the architecture uses (``HFArchitecture.names``);
- layouts: Llama's ``attn_q`` / ``attn_k`` rows go back from llama.cpp's interleaved rotary
  pairs to Hugging Face's two halves per head, the exact inverse of ``convert_hf_to_gguf``'s
  ``permute`` (``gguf_arch.permuted_heads``): the rows seen as ``(heads, head_dim / 2, 2)``
  are read as ``(heads, 2, head_dim / 2)``, ``heads`` being ``head_count_kv`` for keys. GPT-2's
  ``Conv1D`` weights are transposed back to ``(in, out)``. Both are strided views, streamed;
- ties: a file without ``output.weight``, or whose ``output.weight`` holds the same bytes as
  ``token_embd.weight``, gets ``tie_word_embeddings: true`` and no ``lm_head.weight``;
- dtypes: block-quantized tensors (Q8_0, Q4_0, K-quants ...) are dequantized with gguf-py's
  reference dequantizer, and every floating tensor is written as ``--dtype``, else float16 or
  bfloat16 when every matrix of the file is, else float32. A quantized matrix whose rows are
  reordered is dequantized whole in memory (blocks run along rows, so the view needs floats);
- ``config.json`` is rebuilt from the ``{arch}.*`` keys, the vocabulary size from the
  embedding's rows, and the special token ids from ``tokenizer.ggml.*``; the tokenizer
  (``gguf_hf_tokenizer``) is written where the file carries one.

A GGUF without ``general.architecture`` (tensors only, as modelport writes an architecture it
does not map) converts as it is; one of an architecture not listed here is refused, naming it.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelport import dtypes
from modelport.conversion import gguf_hf_tokenizer
from modelport.conversion.gguf_arch import transposed
from modelport.conversion.options import ConvertOptions
from modelport.errors import ConversionError, MissingDependencyError
from modelport.tensors import Storage, TensorRef, contiguous_strides
from modelport.transfer.streaming import dequantize
from modelport.transfer.write_plan import OutputTensor

SUFFIXES = (".weight", ".bias")
CONFIG_NAME = "config.json"
REDUCED_FLOATS = ("float16", "bfloat16")  # kept when every matrix of the file is in one


@dataclass(frozen=True)
class HFArchitecture:
    """The transformers class a GGUF architecture goes back to: its ``architectures`` entry,
    its ``model_type``, and the pattern its module names follow (which of gguf-py's
    spellings of a tensor is transformers')."""

    class_name: str
    model_type: str
    names: re.Pattern[str]


ARCHITECTURES = {
    "llama": HFArchitecture(
        "LlamaForCausalLM",
        "llama",
        re.compile(
            r"lm_head|model\.(embed_tokens|norm|layers\.\d+\.(input_layernorm|"
            r"post_attention_layernorm|self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj))"
        ),
    ),
    "gpt2": HFArchitecture(
        "GPT2LMHeadModel",
        "gpt2",
        re.compile(
            r"lm_head|transformer\.(wte|wpe|ln_f|h\.\d+\.(ln_[12]|attn\.c_(attn|proj)|mlp\.c_(fc|proj)))"
        ),
    ),
}
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")


@dataclass(frozen=True)
class HFFolder:
    """What an ``--to hf`` target of a GGUF source is written with: its tensors under
    Hugging Face names and layouts, the files to place beside them (``config.json``, the
    tokenizer), and notes for the report."""

    tensors: tuple[OutputTensor, ...]
    files: dict[str, bytes] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @contextmanager
    def sidecars(self, source: Path) -> Iterator[Path]:
        """A folder holding ``files``, named as the source (the report says "sidecars
        from model.gguf"), for the folder writer to carry; ``source`` itself when there are
        none. Removed on exit."""
        if not self.files:
            yield source
            return
        with tempfile.TemporaryDirectory(prefix="modelport-") as scratch:
            folder = Path(scratch) / source.name
            folder.mkdir()
            for name, data in self.files.items():
                (folder / name).write_bytes(data)
            yield folder


def for_transformers(
    source: Path,
    source_format: str,
    target_format: str,
    metadata: dict[str, Any],
    outputs: Sequence[OutputTensor],
    options: ConvertOptions,
) -> HFFolder:
    """``outputs`` renamed, laid out and typed for transformers, with ``config.json`` and the
    tokenizer, when a GGUF of a known architecture becomes a Hugging Face folder; as they
    are otherwise. Raises ``ConversionError`` for an architecture it cannot map back."""
    arch = metadata.get("general.architecture")
    if source_format != "gguf" or target_format != "hf-dir" or not isinstance(arch, str):
        return HFFolder(tuple(outputs))
    known = ARCHITECTURES.get(arch)
    if known is None:
        raise ConversionError(
            f"{source.name} is a GGUF file of the {arch!r} architecture, which modelport does "
            f"not map back to Hugging Face names (it maps {', '.join(ARCHITECTURES)}); "
            "convert it --to safetensors to keep llama.cpp's names"
        )
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError(
            "gguf", "gguf", "Mapping llama.cpp's tensor names back to Hugging Face's"
        ) from None
    hparams = _Hyperparameters(arch, metadata)
    dtype = options.dtype or _default_dtype(outputs)
    tensors, notes = _hf_tensors(gguf, known, hparams, outputs, dtype)
    tied = "lm_head.weight" not in {t.name for t in tensors}
    config = _config(known, hparams, tensors, tied, dtype)
    vocab = gguf_hf_tokenizer.files(source, metadata, int(config["vocab_size"]))
    files = {CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    files.update(vocab.files)
    said = [f"written for transformers as {known.class_name} (a {arch} GGUF), tensors renamed"]
    return HFFolder(tuple(tensors), files, (*said, *notes, *vocab.notes))


def _default_dtype(outputs: Sequence[OutputTensor]) -> str:
    """float16 or bfloat16 when every matrix is stored in it, else float32."""
    matrices = {t.source.dtype for t in outputs if len(t.source.shape) >= 2}
    if len(matrices) == 1 and (only := matrices.pop()) in REDUCED_FLOATS:
        return only
    return "float32"


# -- hyperparameters --------------------------------------------------------------------------
class _Hyperparameters:
    """The ``{arch}.*`` keys of a GGUF file, read with their types checked."""

    def __init__(self, arch: str, metadata: dict[str, Any]) -> None:
        self.arch = arch
        self.metadata = metadata

    def get(self, key: str) -> Any:
        return self.metadata.get(key.format(arch=self.arch))

    def count(self, key: str, default: int | None = None) -> int:
        value = self.get(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            name = key.format(arch=self.arch)
            found = "missing" if value is None else f"{value!r}, not a count"
            raise ConversionError(f"the GGUF key {name} is {found}; config.json needs it")
        return value

    def number(self, key: str, default: float) -> float:
        """A float32 key as the decimal it was written from (``1e-05``, not
        ``9.999999747378752e-06``): the shortest repr that reads back as the same float32."""
        import numpy as np

        value = self.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(str(np.float32(value)))
        return default


def _config(
    known: HFArchitecture,
    hparams: _Hyperparameters,
    tensors: Sequence[OutputTensor],
    tied: bool,
    dtype: str,
) -> dict[str, Any]:
    """config.json for ``known``'s class: the GGUF's hyperparameters under transformers'
    names; the vocabulary size is the embedding's row count, which the weights must match."""
    names = {t.name for t in tensors}
    embedding = next((t for t in tensors if t.name.endswith(_EMBEDDINGS)), None)
    if embedding is None:
        raise ConversionError(
            "config.json takes its vocabulary size from token_embd.weight, which is not "
            "among the tensors converted"
        )
    config: dict[str, Any] = {
        "architectures": [known.class_name],
        "model_type": known.model_type,
        "vocab_size": embedding.shape[0],
        "tie_word_embeddings": tied,
        "dtype": dtype,
    }
    if known.model_type == "llama":
        config.update(_llama_config(hparams, names))
    else:
        config.update(_gpt2_config(hparams))
    for key, name in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("padding", "pad_token_id"),
    ):
        token_id = hparams.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < embedding.shape[0]:
            config[name] = token_id
    return config


def _llama_config(hparams: _Hyperparameters, names: set[str]) -> dict[str, Any]:
    heads = hparams.count("{arch}.attention.head_count")
    hidden = hparams.count("{arch}.embedding_length")
    config: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": hparams.count("{arch}.feed_forward_length"),
        "num_hidden_layers": hparams.count("{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": hparams.count("{arch}.attention.head_count_kv", heads),
        "head_dim": hparams.count("{arch}.attention.key_length", hidden // max(heads, 1)),
        "max_position_embeddings": hparams.count("{arch}.context_length"),
        "rms_norm_eps": hparams.number("{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": hparams.number("{arch}.rope.freq_base", 1e4),
        "hidden_act": "silu",
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in names,
        "mlp_bias": "model.layers.0.mlp.gate_proj.bias" in names,
    }
    kind = hparams.get("{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        scaling: dict[str, Any] = {
            "rope_type": kind,
            "factor": hparams.number("{arch}.rope.scaling.factor", 1.0),
        }
        original = hparams.get("{arch}.rope.scaling.original_context_length")
        if isinstance(original, int):
            scaling["original_max_position_embeddings"] = original
        config["rope_scaling"] = scaling
    elif kind not in (None, "none"):
        raise ConversionError(f"RoPE scaling {kind!r} is not mapped back to config.json")
    return config


def _gpt2_config(hparams: _Hyperparameters) -> dict[str, Any]:
    hidden = hparams.count("{arch}.embedding_length")
    inner = hparams.count("{arch}.feed_forward_length", 4 * hidden)
    return {
        "n_embd": hidden,
        "n_layer": hparams.count("{arch}.block_count"),
        "n_head": hparams.count("{arch}.attention.head_count"),
        "n_positions": hparams.count("{arch}.context_length"),
        "n_inner": None if inner == 4 * hidden else inner,
        "layer_norm_epsilon": hparams.number("{arch}.attention.layer_norm_epsilon", 1e-5),
        "activation_function": "gelu_new",
    }


# -- tensors ----------------------------------------------------------------------------------
def unpermuted_heads(tensor: TensorRef, heads: int) -> TensorRef:
    """Hugging Face's row order for a rotary projection stored in llama.cpp's: rows
    ``(heads, half, 2)`` read as ``(heads, 2, half)``, a view of ``tensor``'s storage; written
    under ``tensor.shape`` it undoes ``convert_hf_to_gguf``'s ``permute``."""
    rows = tensor.shape[0] if tensor.shape else 0
    if heads <= 0 or rows % (2 * heads):
        raise ConversionError(f"{rows} rows do not split into {heads} rotary heads")
    half = rows // heads // 2
    step, *rest = tensor.strides or contiguous_strides(tensor.shape)
    return TensorRef(
        tensor.dtype,
        (heads, 2, half, *tensor.shape[1:]),
        tensor.storage,
        tensor.element_offset,
        (2 * half * step, step, 2 * step, *rest),
        tensor.note,
    )


def dequantized(tensor: TensorRef) -> TensorRef:
    """A block-quantized tensor's float32 values, computed when read (whole, in memory)."""
    if dtypes.dtype(tensor.dtype).block is None:
        return tensor
    count = tensor.numel

    def values() -> Any:
        return dequantize(tensor.raw_bytes(), tensor.dtype)[:count].view("uint8")

    key = tensor.storage.key if tensor.storage is not None else ""
    storage = Storage(None, 0, count * 4, key=key, reader=values)
    return TensorRef("float32", tensor.shape, storage, note=f"dequantized from {tensor.dtype}")


def _hf_tensors(
    gguf: Any,
    known: HFArchitecture,
    hparams: _Hyperparameters,
    outputs: Sequence[OutputTensor],
    dtype: str,
) -> tuple[list[OutputTensor], list[str]]:
    """Every tensor under its transformers name, in its layout, cast to ``dtype``."""
    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == hparams.arch)
    blocks = hparams.count("{arch}.block_count")
    spellings: dict[str, list[str]] = {}
    for hf_name, (_, gguf_name) in gguf.get_tensor_name_map(model_arch, blocks).mapping.items():
        spellings.setdefault(gguf_name, []).append(hf_name)
    result: list[OutputTensor] = []
    notes: list[str] = []
    quantized: dict[str, int] = {}
    for tensor in outputs:
        base, suffix = _split_suffix(tensor.name)
        if hparams.arch == "llama" and base == "rope_freqs":
            notes.append(
                "left out rope_freqs.weight (Llama 3.1's RoPE scaling): config.json gets no "
                "rope_scaling, so positions past the original context length differ"
            )
            continue
        chosen = [n for n in spellings.get(base, ()) if known.names.fullmatch(n)]
        if len(chosen) != 1:
            found = "none" if not chosen else ", ".join(chosen)
            raise ConversionError(
                f"the {hparams.arch} GGUF tensor {tensor.name!r} has no single transformers "
                f"name for {known.class_name} (gguf-py gives {found})"
            )
        source = tensor.source
        if dtypes.dtype(source.dtype).block is not None:
            quantized[source.dtype] = quantized.get(source.dtype, 0) + 1
        laid = _hf_layout(hparams, base, replace(tensor, source=source))
        result.append(replace(laid, name=chosen[0] + suffix, dtype=_written(source, dtype)))
    if quantized:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(quantized.items()))
        notes.append(f"dequantized {kinds} tensors to {dtype}")
    return _untied(result), notes


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _written(source: TensorRef, dtype: str) -> str:
    """Floats and GGML blocks become ``dtype``; integers stay as they are."""
    info = dtypes.dtype(source.dtype)
    return dtype if info.is_floating or info.block is not None else source.dtype


def _hf_layout(hparams: _Hyperparameters, base: str, tensor: OutputTensor) -> OutputTensor:
    """The tensor in transformers' layout (see the module docstring)."""
    kind = base.rsplit(".", 1)[-1]
    source = tensor.source
    if hparams.arch == "llama" and kind in ("attn_q", "attn_k"):
        heads = hparams.count("{arch}.attention.head_count")
        if kind == "attn_k":
            heads = hparams.count("{arch}.attention.head_count_kv", heads)
        flat = dequantized(source)
        return replace(tensor, source=unpermuted_heads(flat, heads), written_shape=flat.shape)
    if hparams.arch == "gpt2" and kind in _GPT2_CONV1D and len(source.shape) == 2:
        return replace(tensor, source=transposed(dequantized(source)))
    return tensor


def _untied(tensors: list[OutputTensor]) -> list[OutputTensor]:
    """``lm_head.weight`` left out when it holds the embedding's bytes (transformers ties
    it back from ``tie_word_embeddings``)."""
    head = next((t for t in tensors if t.name == "lm_head.weight"), None)
    embedding = next((t for t in tensors if t.name.endswith(_EMBEDDINGS)), None)
    if head is None or embedding is None:
        return tensors
    same = (head.source.dtype, head.source.shape) == (
        embedding.source.dtype,
        embedding.source.shape,
    )
    if same and (
        head.source.storage is embedding.source.storage
        or bool((head.source.raw_bytes() == embedding.source.raw_bytes()).all())
    ):
        return [t for t in tensors if t is not head]
    return tensors
