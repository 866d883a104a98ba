"""Which tensors of a GGUF target take the type ``--gguf-type`` asks for, as llama.cpp's
``convert_hf_to_gguf.py`` decides (``prepare_tensors``).

``convert`` plans every floating tensor in the type asked; this settles the plan:

- under llama.cpp's names (a Hugging Face folder of an architecture modelport maps, or a GGUF
  source), float32 for what its converter always keeps in float32, whatever the type: tensors
  of one dimension, norms (``*_norm.weight``), anything not named ``*.weight``, and the
  position and token-type embeddings (``position_embd``, ``token_types``);
- with a ternary type (``TQ1_0``, ``TQ2_0``), ``token_embd`` and ``output`` in float16, as its
  converter keeps them;
- under other names, tensors of one dimension stay float (``--dtype``, else float32) rather
  than quantized;
- a matrix whose rows are not a whole number of the type's blocks stays float (``--dtype``,
  else float32; llama.cpp's converter falls back to float16) and a note names it, since
  gguf-py's quantizer refuses it too.

Integers, and tensors already in a block type (from a GGUF source), are left as planned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from modelport import dtypes
from modelport.formats.gguf.quantizing import QUANTIZERS
from modelport.transfer.write_plan import OutputTensor

# --gguf-type's names -> the dtype each writes
GGUF_TYPES = {
    "f32": "float32",
    "f16": "float16",
    "bf16": "bfloat16",
    **{block_type.lower(): block_type for block_type in QUANTIZERS},
}
ALWAYS_FLOAT32 = ("position_embd", "token_types")  # llama.cpp's tensor names
TERNARY = ("TQ1_0", "TQ2_0")
BESIDE_TERNARY = ("token_embd", "output")  # kept float16 in a ternary file
LISTED = 5  # tensor names a note lists before counting the rest


@dataclass(frozen=True)
class Settled:
    tensors: tuple[OutputTensor, ...]
    notes: tuple[str, ...] = ()


def settled(tensors: Iterable[OutputTensor], fallback: str, llama_names: bool) -> Settled:
    """``tensors`` in the types llama.cpp's converter would store them as (see the module
    docstring); ``fallback`` is the float type of a tensor that is not quantized after all,
    and ``llama_names`` says the tensors carry llama.cpp's names."""
    result: list[OutputTensor] = []
    uneven: dict[str, list[str]] = {}
    beside_ternary: list[str] = []
    for tensor in tensors:
        source = dtypes.dtype(tensor.source.dtype)
        if not source.is_floating or source.block is not None:
            result.append(tensor)
            continue
        stored = _stored_type(tensor, fallback, llama_names)
        if stored is None:
            stored = fallback
            uneven.setdefault(tensor.dtype, []).append(tensor.name)
        if stored == "float16" and tensor.dtype in TERNARY:
            beside_ternary.append(tensor.name)
        result.append(tensor if stored == tensor.dtype else replace(tensor, dtype=stored))
    notes = [_uneven_note(block_type, names, fallback) for block_type, names in uneven.items()]
    if beside_ternary:
        notes.append(
            f"{_listed(beside_ternary)} {_stay(beside_ternary)} float16 beside the ternary "
            "blocks, as llama.cpp's converter keeps the token embedding and the output matrix"
        )
    return Settled(tuple(result), tuple(notes))


def _stored_type(tensor: OutputTensor, fallback: str, llama_names: bool) -> str | None:
    """The type ``tensor`` is stored as; None for a matrix whose rows do not hold whole
    blocks of its planned type."""
    block = dtypes.dtype(tensor.dtype).block
    if llama_names:
        base = tensor.name.rsplit(".", 1)[0]
        if (
            len(tensor.shape) <= 1
            or tensor.name.endswith("_norm.weight")
            or not tensor.name.endswith(".weight")
            or base in ALWAYS_FLOAT32
        ):
            return "float32"
        if tensor.dtype in TERNARY and base in BESIDE_TERNARY:
            return "float16"
    elif block is not None and len(tensor.shape) <= 1:
        return fallback
    if block is not None and tensor.shape[-1] % block[0]:
        return None
    return tensor.dtype


def _uneven_note(block_type: str, names: list[str], fallback: str) -> str:
    per_block = dtypes.GGML_BLOCKS[block_type][0]
    return (
        f"{_listed(names)} {_stay(names)} {fallback}, not {block_type}: their rows are not a whole "
        f"number of {block_type} blocks of {per_block} values"
    )


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def _stay(names: list[str]) -> str:
    return "stays" if len(names) == 1 else "stay"
