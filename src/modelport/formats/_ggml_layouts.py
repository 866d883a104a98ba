"""The legacy GGML file layouts, and the element types each quantization era stored.

Before GGUF every program built on ggml wrote its own header after a four-byte magic, so the
bytes alone do not say which header follows. ``LAYOUTS`` lists the ones modelport knows, as
the converters of whisper.cpp, llama.cpp and the ggml examples wrote them (all integers
little-endian int32):

- ``whisper`` (``ggml``): 11 hparams; the mel filters (``n_mel``, ``n_fft``, then
  ``n_mel * n_fft`` float32); a counted vocabulary (count, then length + bytes each);
- ``llama`` (``ggml`` unversioned, ``ggmf`` v1, ``ggjt`` v1-v3): 7 hparams; ``n_vocab``
  tokens (length + bytes, plus a float32 score in ggmf and ggjt);
- ``gpt-2``, ``gpt-j`` (``ggml``): 6 or 7 hparams and a counted vocabulary; ``gpt-neox``
  (``ggml``): 8 hparams and ``n_vocab`` tokens without scores;
- ``llama-lora`` (``ggla`` v1): LoRA adapters, ``r`` and ``lora_alpha`` (or, from the
  first converter, no hparams at all) and no vocabulary;
- ``silero-vad`` (``ggml``, whisper.cpp's ``convert-silero-vad-to-ggml.py``, read by
  ``whisper_vad_init_with_params``): a model type (length + bytes, ``silero-16k``), the
  version (major, minor, patch), ``n_window``, ``n_context``, ``n_encoder_layers``, then
  in, out channels and kernel size per encoder layer, then the LSTM and final conv sizes;
  no vocabulary; F32 and F16 tensors only.

Order matters where two layouts read the same bytes: a counted vocabulary whose count equals
``n_vocab`` also reads as one more hparam and an uncounted vocabulary (gpt-2 as llama, gpt-j
as gpt-neox), so the counted layout is tried first: a real file of the other kind does not
read as it, since that would take the file's ``ftype`` for its token count.

Tensors follow to the end of the file, each: ``n_dims``, name length, type code, ``n_dims``
dims (``ne[0]``, the fastest-varying, first), the name, then the data (in ggjt and ggla
starting at the next multiple of 32 bytes of the file).

Block-quantized types changed layout twice (llama.cpp #1405 reordered the nibbles, #1508
made the Q4/Q8 scales float16). ``Quantization`` names the three eras: a ggjt file's version
says which it holds, a ggml-examples file (whisper, gpt-*) says it in ``ftype // 1000``
(``GGML_QNT_VERSION``). Types whose bytes match GGUF's get GGUF's names and dequantizers;
the others are listed with their sizes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Final

from modelport import dtypes
from modelport.formats.gguf.spec import GGMLType

MAGIC_GGML = b"lmgg"  # 0x67676d6c written as a little-endian int32
MAGIC_GGMF = b"fmgg"
MAGIC_GGJT = b"tjgg"
MAGIC_GGLA = b"algg"
CONTAINERS: Final = MappingProxyType(
    {MAGIC_GGML: "ggml", MAGIC_GGMF: "ggmf", MAGIC_GGJT: "ggjt", MAGIC_GGLA: "ggla"}
)
VERSIONS: Final = MappingProxyType({MAGIC_GGMF: (1,), MAGIC_GGJT: (1, 2, 3), MAGIC_GGLA: (1,)})
ALIGNMENT = 32
QNT_VERSION_FACTOR = 1000  # GGML_QNT_VERSION_FACTOR: ftype = qnt_version * 1000 + ftype


class Vocab(Enum):
    """How a layout stores its vocabulary."""

    NONE = "none"
    COUNTED = "counted"  # an int32 count first
    HPARAM = "n_vocab"  # as many tokens as the first hparam says


class Quantization(IntEnum):
    """The block layouts of an era, named by ``GGML_QNT_VERSION``."""

    ORIGINAL = 0  # ggml, ggmf, ggjt v1: float32 Q4/Q8 scales, interleaved nibbles
    REORDERED = 1  # ggjt v2: nibbles reordered (Q5 as GGUF has it), Q4/Q8 scales still float32
    CURRENT = 2  # ggjt v3: GGUF's block layouts


@dataclass(frozen=True)
class Layout:
    """One writer's header, between the magic (and version) and the first tensor."""

    name: str
    magic: bytes
    hparams: tuple[str, ...]
    vocab: Vocab
    scores: bool = False  # a float32 score after each token
    mel_filters: bool = False
    aligned: bool = False  # tensor data starts at a multiple of ALIGNMENT bytes
    plain_only: bool = False  # only F32/F16 tensors (LoRA adapters)
    model_type: bool = False  # a length-prefixed model type precedes the hparams
    layer_hparams: tuple[str, ...] = ()  # repeated as many times as the last hparam says
    tail_hparams: tuple[str, ...] = ()  # after the repeated ones

    @property
    def qnt_in_ftype(self) -> bool:
        """ggml-examples files carry their quantization era in ``ftype // 1000``."""
        return self.magic == MAGIC_GGML and self.name != "llama"


_LLAMA = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
_WHISPER = (
    *("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer"),
    *("n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "n_mels", "ftype"),
)
_GPT = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
_SILERO = ("major", "minor", "patch", "n_window", "n_context", "n_encoder_layers")
_SILERO_LAYER = ("encoder_in_channels", "encoder_out_channels", "kernel_size")
_SILERO_TAIL = ("lstm_input_size", "lstm_hidden_size", "final_conv_in", "final_conv_out")

LAYOUTS: Final = (
    Layout("whisper", MAGIC_GGML, _WHISPER, Vocab.COUNTED, mel_filters=True),
    Layout("gpt-j", MAGIC_GGML, (*_GPT, "n_rot", "ftype"), Vocab.COUNTED),
    Layout("gpt-2", MAGIC_GGML, (*_GPT, "ftype"), Vocab.COUNTED),
    Layout("llama", MAGIC_GGML, _LLAMA, Vocab.HPARAM),
    Layout("gpt-neox", MAGIC_GGML, (*_GPT, "n_rot", "par_res", "ftype"), Vocab.HPARAM),
    Layout("llama", MAGIC_GGMF, _LLAMA, Vocab.HPARAM, scores=True),
    Layout("llama", MAGIC_GGJT, _LLAMA, Vocab.HPARAM, scores=True, aligned=True),
    Layout(
        "llama-lora", MAGIC_GGLA, ("r", "lora_alpha"), Vocab.NONE, aligned=True, plain_only=True
    ),
    Layout("llama-lora", MAGIC_GGLA, (), Vocab.NONE, aligned=True, plain_only=True),
    Layout(
        "silero-vad",
        MAGIC_GGML,
        _SILERO,
        Vocab.NONE,
        plain_only=True,
        model_type=True,
        layer_hparams=_SILERO_LAYER,
        tail_hparams=_SILERO_TAIL,
    ),
)


@dataclass(frozen=True)
class ElementType:
    """A stored type: GGML's name, modelport's dtype (None when no GGUF type has these
    bytes: ``era`` then says whose they are), and (elements, bytes) per block (1 element
    for plain types)."""

    ggml_name: str
    dtype: str | None
    block: tuple[int, int]
    era: str = ""

    def nbytes(self, numel: int) -> int:
        elements, size = self.block
        return numel // elements * size


ERA_NAMES: Final = MappingProxyType(
    {
        Quantization.ORIGINAL: "original block layouts (before llama.cpp #1405)",
        Quantization.REORDERED: "ggjt v2 block layouts (llama.cpp #1405)",
        Quantization.CURRENT: "ggjt v3 block layouts, as GGUF has them",
    }
)

_PLAIN: Final = MappingProxyType(
    {
        GGMLType.F32: ElementType("F32", "float32", (1, 4)),
        GGMLType.F16: ElementType("F16", "float16", (1, 2)),
    }
)
# Blocks laid out as no GGUF type is: (code, name, elements, bytes) per era.
_OLD_BLOCKS: Final = MappingProxyType(
    {
        Quantization.ORIGINAL: (
            *((2, "Q4_0", 32, 4 + 16), (3, "Q4_1", 32, 4 + 4 + 16)),
            *((4, "Q4_2", 16, 2 + 8), (5, "Q4_3", 16, 2 + 2 + 8)),
            *((6, "Q5_0", 32, 2 + 4 + 16), (7, "Q5_1", 32, 2 + 2 + 4 + 16)),
            (8, "Q8_0", 32, 4 + 32),
        ),
        Quantization.REORDERED: (
            *((2, "Q4_0", 32, 4 + 16), (3, "Q4_1", 32, 4 + 4 + 16), (8, "Q8_0", 32, 4 + 32)),
        ),
        Quantization.CURRENT: (),
    }
)
# Codes whose blocks are byte for byte GGUF's, per era. The integer types (I8, I16, I32:
# codes 10-12 until the K-quants took those in June 2023, 16-18 after, other blocks in GGUF)
# never held weights in these files and are not read.
_GGUF_BLOCKS: Final = MappingProxyType(
    {
        Quantization.ORIGINAL: (),
        Quantization.REORDERED: (GGMLType.Q5_0, GGMLType.Q5_1),
        Quantization.CURRENT: tuple(GGMLType(code) for code in (2, 3, 6, 7, 8, 9, *range(10, 16))),
    }
)


def element_type(code: int, era: Quantization | None) -> ElementType | None:
    """What type ``code`` meant in ``era`` (None: plain types only); None when unknown."""
    if code in _PLAIN:
        return _PLAIN[GGMLType(code)]
    if era is None:
        return None
    for old, name, elements, size in _OLD_BLOCKS[era]:
        if old == code:
            return ElementType(name, None, (elements, size), ERA_NAMES[era])
    for kind in _GGUF_BLOCKS[era]:
        if kind == code:
            return ElementType(kind.name, kind.name, dtypes.GGML_BLOCKS[kind.name])
    return None
