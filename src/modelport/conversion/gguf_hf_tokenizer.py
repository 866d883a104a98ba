"""A GGUF file's vocabulary (``tokenizer.ggml.*``) as a Hugging Face ``tokenizer.json`` and
``tokenizer_config.json``: the inverse of ``gguf_vocab``, built with the ``tokenizers``
library so the file is one it writes itself.

- ``tokenizer.ggml.model`` ``"gpt2"``: byte-level BPE. ``tokens`` in id order are the
  vocabulary (``[PAD{id}]`` fillers included, so ids stay those of the embedding rows),
  ``merges`` the ``"left right"`` pairs. Tokens typed control become special added tokens,
  user-defined ones plain added tokens. ``tokenizer.ggml.pre`` picks the split: GPT-2's
  byte-level regex for ``gpt-2`` and ``default``, Llama 3's split then bytes for
  ``llama-bpe`` / ``llama3`` / ``llama-v3``; other pre-tokenizers are not written (a note
  says so), since their split is not known here.
- ``"llama"``: SentencePiece, as transformers' Llama tokenizer lays it out in
  ``tokenizer.json``: BPE with byte fallback over the pieces, merges recovered from the
  pieces and their scores (a merge of two pieces that form a third ranks by that third's
  score, best first), ``▁`` for spaces and one prepended, and the unknown piece.
- ``add_bos_token`` / ``add_eos_token`` (llama.cpp's defaults: BOS for SentencePiece, none
  for byte-level BPE) become a template post-processor, so the ids match llama.cpp's.

``tokenizer_config.json`` names ``PreTrainedTokenizerFast``, which loads ``tokenizer.json``
as it is (a model-specific class would bring its own normalizer), with the special tokens,
the context length and the chat template the file carries.

The full token arrays are read with gguf-py's reader (the metadata modelport keeps for
inspection holds only their first items).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelport.conversion.gguf_vocab import CONTROL, NORMAL, USER_DEFINED

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPACE = "\u2581"  # SentencePiece's visible space
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex text is split by before bytes (None: GPT-2's byte-level one)
SPLITS = {
    "gpt-2": None,
    "default": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
}
_ARRAYS = tuple(f"tokenizer.ggml.{name}" for name in ("tokens", "token_type", "merges", "scores"))


@dataclass(frozen=True)
class TokenizerFiles:
    files: dict[str, bytes] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def files(source: Path, metadata: dict[str, Any], vocab_size: int) -> TokenizerFiles:
    """``tokenizer.json`` and ``tokenizer_config.json`` for the GGUF file's vocabulary;
    none, with a note, when it has none or one not rebuilt here."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        return _none("the GGUF file carries no vocabulary (tokenizer.ggml.model)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if kind not in ("gpt2", "llama"):
        return _none(f"its {kind!r} vocabulary is not rebuilt (modelport rebuilds gpt2, llama)")
    if kind == "gpt2" and pre not in SPLITS:
        return _none(f"its pre-tokenizer {pre!r} splits text in a way not known here")
    try:
        import tokenizers
    except ImportError:
        return _none("writing tokenizer.json needs the tokenizers package")
    arrays = _arrays(source)
    tokens = [str(t) for t in arrays.get("tokenizer.ggml.tokens", ())]
    types = list(arrays.get("tokenizer.ggml.token_type", ())) or [NORMAL] * len(tokens)
    if len(types) != len(tokens) or len(set(tokens)) != len(tokens):
        return _none("its token list has duplicates or a token_type per token is missing")
    notes = []
    if len(tokens) != vocab_size:
        notes.append(f"the vocabulary has {len(tokens)} tokens for {vocab_size} embedding rows")
    specials = _special_tokens(metadata, tokens)
    if kind == "gpt2":
        merges = [str(m) for m in arrays.get("tokenizer.ggml.merges", ())]
        tokenizer = _byte_level(tokenizers, tokens, merges, SPLITS[str(pre)])
    else:
        scores = [float(s) for s in arrays.get("tokenizer.ggml.scores", ())] or [0.0] * len(tokens)
        tokenizer = _sentencepiece(tokenizers, tokens, types, scores, specials.get("unk_token"))
    _add_tokens(tokenizers, tokenizer, tokens, types)
    added = _added_ends(metadata, kind == "llama")
    _post_process(tokenizers, tokenizer, specials, added, byte_level=kind == "gpt2")
    config = _tokenizer_config(metadata, specials, added)
    written = {
        TOKENIZER_JSON: tokenizer.to_str(pretty=True).encode(),
        TOKENIZER_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }
    notes.append(f"tokenizer.json rebuilt from the GGUF's {kind} vocabulary ({len(tokens)} tokens)")
    return TokenizerFiles(written, tuple(notes))


def _none(reason: str) -> TokenizerFiles:
    return TokenizerFiles(notes=(f"no tokenizer written: {reason}",))


def _arrays(source: Path) -> dict[str, list[Any]]:
    """The vocabulary's arrays in full, read by gguf-py."""
    import gguf

    reader = gguf.GGUFReader(source)
    return {name: list(reader.fields[name].contents()) for name in _ARRAYS if name in reader.fields}


def _special_tokens(metadata: dict[str, Any], tokens: list[str]) -> dict[str, str]:
    found = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            found[f"{name}_token"] = tokens[token_id]
    return found


def _byte_level(tokenizers: Any, tokens: list[str], merges: list[str], split: str | None) -> Any:
    from tokenizers import decoders, models, pre_tokenizers

    pairs = [(left, right) for left, _, right in (m.partition(" ") for m in merges if " " in m)]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[Any]:
    """The BPE merges a SentencePiece vocabulary implies: each normal piece split in two
    pieces of the vocabulary, ranked by the joined piece's score (best first), then by the
    left piece's length, as transformers recovers them."""
    ids = {token: i for i, token in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    ranked = []
    for token, index in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[index], -len(left), -len(right), ids[left], ids[right]))
    ranked.sort()
    return [(tokens[left], tokens[right]) for *_, left, right in ranked]


def _sentencepiece(
    tokenizers: Any, tokens: list[str], types: list[int], scores: list[float], unk: str | None
) -> Any:
    from tokenizers import decoders, models, normalizers

    vocab = {token: i for i, token in enumerate(tokens)}
    merges = sentencepiece_merges(tokens, types, scores)
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tokenizer


def _add_tokens(tokenizers: Any, tokenizer: Any, tokens: list[str], types: list[int]) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens,
    each kept whole in the text (llama.cpp matches both before splitting)."""
    special = [
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == CONTROL
    ]
    plain = [
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def _added_ends(metadata: dict[str, Any], sentencepiece: bool) -> dict[str, bool]:
    """Whether llama.cpp adds BOS and EOS to each text: the file's flags, else its defaults."""
    bos = metadata.get("tokenizer.ggml.add_bos_token", sentencepiece)
    eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    return {"add_bos_token": bos is True, "add_eos_token": eos is True}


def _post_process(
    tokenizers: Any,
    tokenizer: Any,
    specials: dict[str, str],
    added: dict[str, bool],
    *,
    byte_level: bool,
) -> None:
    from tokenizers import processors

    steps: list[Any] = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    ends = [(specials.get(f"{end}_token"), added[f"add_{end}_token"]) for end in ("bos", "eos")]
    around = [token if wanted else None for token, wanted in ends]
    if any(around):
        bos, eos = around

        def sequence(text: str, kind: int) -> list[str]:
            return [f"{t}:{kind}" for t in (bos, text, eos) if t]

        known = {t: tokenizer.token_to_id(t) for t in around if t}
        steps.append(
            processors.TemplateProcessing(
                single=sequence("$A", 0),
                pair=[*sequence("$A", 0), *sequence("$B", 1)],
                special_tokens=list(known.items()),
            )
        )
    if len(steps) == 1:
        tokenizer.post_processor = steps[0]
    elif steps:
        tokenizer.post_processor = processors.Sequence(steps)


def _tokenizer_config(
    metadata: dict[str, Any], specials: dict[str, str], added: dict[str, bool]
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        **specials,
        **added,
    }
    arch = metadata.get("general.architecture")
    context = metadata.get(f"{arch}.context_length")
    if isinstance(context, int):
        config["model_max_length"] = context
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return config
