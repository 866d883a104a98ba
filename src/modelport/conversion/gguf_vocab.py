"""A Hugging Face folder's tokenizer as GGUF vocabulary keys (``tokenizer.ggml.*``).

llama.cpp builds its tokenizer from the file alone and refuses a model without one. A
byte-level BPE ``tokenizer.json`` (GPT-2's, Llama 3's) is written as llama.cpp's converter
writes it: ``tokenizer.ggml.model`` ``"gpt2"``, ``tokens`` in id order (ids the tokenizer
leaves free up to the model's vocabulary size are ``[PAD{id}]``, of type unused), one
``token_type`` per token (normal; added special tokens control, other added tokens user
defined), ``merges`` as ``"left right"`` strings, and the bos/eos ids of ``config.json``.
``tokenizer.ggml.pre`` is ``"gpt-2"`` when the pre-tokenizer is GPT-2's plain byte-level
split, else ``"default"``: llama.cpp's converter names it by hashing what the tokenizer
makes of a probe text, which needs the tokenizer to run.

A SentencePiece ``tokenizer.model`` (Llama 2, Mistral) comes first, as in llama.cpp's
converter, when the ``sentencepiece`` package is installed: ``tokenizer.ggml.model``
``"llama"``, every piece with its score and type (normal, unknown, control, unused, byte),
ids past the pieces up to the vocabulary size ``[PAD{id}]`` (score -10000, unused), added
tokens of ``tokenizer.json`` placed at their ids, and the unknown id. The file is parsed
(``LoadFromSerializedProto``), nothing in it runs.

Other tokenizers (BPE with byte fallback and no ``tokenizer.model``, Unigram, WordPiece)
are not converted: the file gets no vocabulary and a note says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport.errors import ModelportError
from modelport.formats import _hf_folder
from modelport.transfer.write_plan import TypedMetadata

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
# llama.cpp's token types (gguf-py's TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNSCORED = -10000.0  # the score llama.cpp's converter gives padding ids
MAX_SENTENCEPIECE_BYTES = 64 << 20  # a 256k-piece model is a few MB
NOT_RUNNABLE = "llama.cpp needs a vocabulary to run the file"


@dataclass(frozen=True)
class Vocabulary:
    metadata: tuple[TypedMetadata, ...] = ()
    notes: tuple[str, ...] = ()


def read(folder: Path, config: dict[str, Any], vocab_size: int) -> Vocabulary:
    """The vocabulary keys for ``folder``'s tokenizer, sized to the model's ``vocab_size``
    (0: as many tokens as the tokenizer has); none, with a note, when it cannot be read."""
    path = folder / TOKENIZER_JSON
    tokenizer: dict[str, Any] = {}
    try:
        tokenizer = _hf_folder.load_json(path) if path.is_file() else {}
    except (ModelportError, OSError) as exc:
        return _none(f"tokenizer.json could not be read ({exc})")
    if (folder / SENTENCEPIECE_MODEL).is_file():
        return _sentencepiece(folder / SENTENCEPIECE_MODEL, tokenizer, config, vocab_size)
    if not tokenizer:
        return _none("the folder has no tokenizer.json or tokenizer.model")
    model = tokenizer.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") if isinstance(model, dict) else None
        fallback = (
            " with byte fallback" if isinstance(model, dict) and model.get("byte_fallback") else ""
        )
        return _none(f"its tokenizer is {kind or 'of no known type'}{fallback} (not converted)")
    try:
        tokens, types = _tokens(model, tokenizer.get("added_tokens") or [], vocab_size)
        merges = _merges(model.get("merges") or [])
    except _BadVocabulary as exc:
        return _none(f"tokenizer.json: {exc}")
    metadata = [
        TypedMetadata("tokenizer.ggml.model", "string", "gpt2"),
        TypedMetadata("tokenizer.ggml.pre", "string", _pre_tokenizer(tokenizer)),
        TypedMetadata("tokenizer.ggml.tokens", "string", tuple(tokens)),
        TypedMetadata("tokenizer.ggml.token_type", "int32", tuple(types)),
        TypedMetadata("tokenizer.ggml.merges", "string", tuple(merges)),
    ]
    return Vocabulary((*metadata, *_special_ids(config, len(tokens))))


def _special_ids(config: dict[str, Any], count: int) -> list[TypedMetadata]:
    """config.json's bos and eos ids (the first of a list), where they name a token."""
    found = []
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        token_id = config.get(key)
        if isinstance(token_id, list) and token_id:
            token_id = token_id[0]
        if isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < count:
            found.append(TypedMetadata(f"tokenizer.ggml.{name}_token_id", "uint32", token_id))
    return found


def _sentencepiece(
    path: Path, tokenizer: dict[str, Any], config: dict[str, Any], vocab_size: int
) -> Vocabulary:
    try:
        import sentencepiece
    except ImportError:
        return _none("its tokenizer.model needs the sentencepiece package (pip install it)")
    if path.stat().st_size > MAX_SENTENCEPIECE_BYTES:
        return _none(f"tokenizer.model is over {MAX_SENTENCEPIECE_BYTES} bytes")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except (RuntimeError, OSError) as exc:
        return _none(f"tokenizer.model could not be read ({exc})")
    pieces = processor.vocab_size()
    size = vocab_size or pieces
    if pieces > size:
        return _none(f"tokenizer.model has {pieces} pieces for {size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores, types = [UNSCORED] * size, [UNUSED] * size
    for i in range(pieces):
        tokens[i], scores[i] = processor.IdToPiece(i), float(processor.GetScore(i))
        flags = (
            (processor.IsUnknown(i), UNKNOWN),
            (processor.IsControl(i), CONTROL),
            (processor.IsUnused(i), UNUSED),
            (processor.IsByte(i), BYTE),
        )
        types[i] = next((kind for flag, kind in flags if flag), NORMAL)
    for item in tokenizer.get("added_tokens") or []:
        token_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(token_id, int) and pieces <= token_id < size:
            tokens[token_id] = str(item.get("content"))
            types[token_id] = CONTROL if item.get("special") else USER_DEFINED
    metadata = [
        TypedMetadata("tokenizer.ggml.model", "string", "llama"),
        TypedMetadata("tokenizer.ggml.tokens", "string", tuple(tokens)),
        TypedMetadata("tokenizer.ggml.scores", "float32", tuple(scores)),
        TypedMetadata("tokenizer.ggml.token_type", "int32", tuple(types)),
    ]
    if 0 <= processor.unk_id() < size:
        metadata.append(
            TypedMetadata("tokenizer.ggml.unknown_token_id", "uint32", processor.unk_id())
        )
    return Vocabulary((*metadata, *_special_ids(config, size)))


class _BadVocabulary(Exception):
    """A tokenizer.json whose vocabulary cannot be laid out by id."""


def _none(reason: str) -> Vocabulary:
    return Vocabulary(notes=(f"no vocabulary written: {reason}; {NOT_RUNNABLE}",))


def _tokens(
    model: dict[str, Any], added: list[Any], vocab_size: int
) -> tuple[list[str], list[int]]:
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise _BadVocabulary("its BPE model has no vocab")
    entries = [(token, token_id, NORMAL) for token, token_id in vocab.items()]
    for item in added:
        if isinstance(item, dict):
            kind = CONTROL if item.get("special") else USER_DEFINED
            entries.append((item.get("content"), item.get("id"), kind))
    ids = [token_id for _, token_id, _ in entries]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise _BadVocabulary("a token id is not a non-negative integer")
    size = vocab_size or (max(ids) + 1 if ids else 0)
    if ids and max(ids) >= size:
        raise _BadVocabulary(f"token id {max(ids)} is beyond the model's {size} embeddings")
    tokens: list[str | None] = [None] * size
    types = [UNUSED] * size
    for token, token_id, kind in entries:
        if not isinstance(token, str):
            raise _BadVocabulary(f"token {token_id} is not a string")
        if tokens[token_id] is not None and tokens[token_id] != token:
            raise _BadVocabulary(f"id {token_id} names both {tokens[token_id]!r} and {token!r}")
        tokens[token_id] = token
        types[token_id] = kind  # added tokens come after the vocabulary, and win
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


def _merges(merges: list[Any]) -> list[str]:
    result = []
    for merge in merges:
        if isinstance(merge, str) and merge.count(" ") == 1:
            result.append(merge)
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(m, str) for m in merge):
            result.append(f"{merge[0]} {merge[1]}")
        else:
            raise _BadVocabulary(f"merge {merge!r} is not a pair")
    return result


def _pre_tokenizer(tokenizer: dict[str, Any]) -> str:
    pre = tokenizer.get("pre_tokenizer")
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"
