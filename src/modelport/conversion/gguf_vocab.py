"""A Hugging Face folder's tokenizer as GGUF vocabulary keys (``tokenizer.ggml.*``).

llama.cpp builds its tokenizer from the file alone and refuses a model without one. A
byte-level BPE ``tokenizer.json`` (GPT-2's, Llama 3's) is written as llama.cpp's converter
writes it: ``tokenizer.ggml.model`` ``"gpt2"``, ``tokens`` in id order (ids the tokenizer
leaves free up to the model's vocabulary size are ``[PAD{id}]``, of type unused), one
``token_type`` per token (normal; added special tokens control, other added tokens user
defined), ``merges`` as ``"left right"`` strings, and the bos/eos ids of ``config.json``.

``tokenizer.ggml.pre`` names the pre-tokenizer (how text is split before the merges) as
llama.cpp's converter names it (``get_vocab_base_pre``): the tokenizer encodes a fixed check
text (special tokens added as its post-processor adds them, as ``AutoTokenizer.encode``
does), the sha256 of the ids' Python list names it in a table. The tokenizer is run by the
``tokenizers`` library from ``tokenizer.json``, data only. The table here holds the
tokenizers of the architectures modelport maps (GPT-2's, Llama 3's, SmolLM's and Mistral
Nemo's); any other gets ``"default"`` and a note that llama.cpp may split text otherwise
(its converter refuses the model until the hash is added to its table). The exception is a
tokenizer that splits text exactly as GPT-2 does whatever its merges (no normalizer, a
``ByteLevel`` pre-tokenizer with its regex and no prefix space, merges applied to every word:
what the ``tokenizers`` library trains by default): it is named ``"gpt-2"``, since llama.cpp's
``"default"`` splits otherwise (digits in threes, punctuation apart).

A SentencePiece ``tokenizer.model`` (Llama 2, Mistral) comes first, as in llama.cpp's
converter, when the ``sentencepiece`` package is installed: ``tokenizer.ggml.model``
``"llama"``, every piece with its score and type (normal, unknown, control, unused, byte),
ids past the pieces up to the vocabulary size ``[PAD{id}]`` (score -10000, unused), added
tokens of ``tokenizer.json`` placed at their ids, and the unknown id. The file is parsed
(``LoadFromSerializedProto``), nothing in it runs.

Either way the special tokens follow as llama.cpp's converter takes them (gguf-py's
``SpecialVocab``): the bos/eos/unk/sep/pad/cls/mask ids of tokenizer_config.json (else
config.json), whether llama.cpp adds a BOS / EOS / SEP when it tokenizes
(``add_bos_token``...; else read from the post-processor), and the chat template, which
llama.cpp's chat functions format conversations with (tokenizer_config.json's, else
``chat_template.jinja`` / ``chat_template.json``).

Other tokenizers (BPE with byte fallback and no ``tokenizer.model``, Unigram, WordPiece)
are not converted: the file gets no vocabulary and a note says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from modelport.errors import ModelportError
from modelport.formats import _hf_folder
from modelport.transfer.write_plan import TypedMetadata

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
MAX_CHAT_TEMPLATE = 16 << 20  # templates run to tens of KB
# gguf-py SpecialVocab's token types -> their keys, tokenizer.ggml.* (gguf-py's spelling)
SPECIAL_KEYS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "sep": "seperator_token_id",
    "pad": "padding_token_id",
    "cls": "cls_token_id",
    "mask": "mask_token_id",
}
# llama.cpp's token types (gguf-py's TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNSCORED = -10000.0  # the score llama.cpp's converter gives padding ids
MAX_SENTENCEPIECE_BYTES = 64 << 20  # a 256k-piece model is a few MB
NOT_RUNNABLE = "llama.cpp needs a vocabulary to run the file"
# the text llama.cpp's converter tokenizes to tell pre-tokenizers apart
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) "
    "\u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 of str(ids of CHECK_TEXT) -> llama.cpp's pre-tokenizer name (from its converter)
PRE_TOKENIZERS = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Nemo
}
UNKNOWN_PRE = "default"
SPACE_IN_MERGE = chr(ord(" ") + 256)  # "Ġ", as gguf-py's SpecialVocab writes it
GPT2_PRE = "gpt-2"  # llama.cpp's name for GPT-2's split, whatever the merges


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
    pre, notes = pre_tokenizer(path, tokenizer)
    metadata = [
        TypedMetadata("tokenizer.ggml.model", "string", "gpt2"),
        TypedMetadata("tokenizer.ggml.pre", "string", pre),
        TypedMetadata("tokenizer.ggml.tokens", "string", tuple(tokens)),
        TypedMetadata("tokenizer.ggml.token_type", "int32", tuple(types)),
        TypedMetadata("tokenizer.ggml.merges", "string", tuple(merges)),
    ]
    return Vocabulary((*metadata, *special_tokens(folder, tokenizer, config, len(tokens))), notes)


def check_hash(ids: list[int]) -> str:
    """llama.cpp's converter's hash of the check text's token ids."""
    return hashlib.sha256(str(ids).encode()).hexdigest()


def pre_tokenizer(
    path: Path, tokenizer: dict[str, Any] | None = None
) -> tuple[str, tuple[str, ...]]:
    """``tokenizer.ggml.pre`` for the tokenizer.json at ``path`` (``tokenizer``: its parsed
    contents), and a note when it is ``"default"`` for want of a name."""
    named, reason = _named_by_hash(path)
    if named is not None:
        return named, ()
    if tokenizer is not None and splits_like_gpt2(tokenizer):
        return GPT2_PRE, ()
    return UNKNOWN_PRE, (_unnamed(reason),)


def splits_like_gpt2(tokenizer: dict[str, Any]) -> bool:
    """Whether the tokenizer.json splits text before its merges exactly as GPT-2 does, which
    is llama.cpp's ``"gpt-2"`` pre-tokenizer: no normalizer, a bare ``ByteLevel``
    pre-tokenizer with its regex (the default) and no prefix space, and a BPE model that
    does not look whole words up before merging (``ignore_merges``)."""
    split = tokenizer.get("pre_tokenizer")
    model = tokenizer.get("model")
    return (
        tokenizer.get("normalizer") is None
        and isinstance(split, dict)
        and split.get("type") == "ByteLevel"
        and split.get("add_prefix_space") is False
        and split.get("use_regex", True) is True
        and isinstance(model, dict)
        and not model.get("ignore_merges")
    )


def _named_by_hash(path: Path) -> tuple[str | None, str]:
    """llama.cpp's name for the tokenizer's check-text hash, or why there is none."""
    try:
        import tokenizers
    except ImportError:
        return None, "naming it needs the tokenizers package (pip install it)"
    try:
        ids = tokenizers.Tokenizer.from_file(str(path)).encode(CHECK_TEXT).ids
    except Exception as exc:  # the tokenizers library raises plain Exception
        return None, f"the tokenizers library could not run it ({exc})"
    digest = check_hash(ids)
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest], ""
    return None, f"llama.cpp's converter does not know its hash {digest}"


def _unnamed(reason: str) -> str:
    return (
        f"tokenizer.ggml.pre is {UNKNOWN_PRE!r}: {reason}; llama.cpp may split text into "
        "tokens differently than the tokenizer does"
    )


def special_tokens(
    folder: Path, tokenizer: dict[str, Any], config: dict[str, Any], count: int
) -> list[TypedMetadata]:
    """The special token ids, whether llama.cpp adds a BOS / EOS / SEP when it tokenizes, and
    the chat template, as llama.cpp's converter reads them (gguf-py's ``SpecialVocab``): ids
    from tokenizer_config.json's ``{type}_token`` (looked up among the added tokens) before
    config.json's ``{type}_token_id`` (the first of a list); ``add_*_token`` from
    tokenizer_config.json, else from the tokenizer's post-processor."""
    settings = _optional_json(folder / TOKENIZER_CONFIG)
    added: dict[Any, Any] = {}
    for item in tokenizer.get("added_tokens") or []:
        if isinstance(item, dict):
            added.setdefault(item.get("content"), item.get("id"))
    found = []
    for kind, key in SPECIAL_KEYS.items():
        named = _content(settings.get(f"{kind}_token"))
        token_id = added.get(named) if named is not None else None
        if not _is_id(token_id, count):
            token_id = config.get(f"{kind}_token_id")
            token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        if _is_id(token_id, count):
            found.append(TypedMetadata(f"tokenizer.ggml.{key}", "uint32", token_id))
    flags = _added_by_post_processor(tokenizer.get("post_processor"), settings)
    for kind in ("bos", "eos", "sep"):
        if isinstance(settings.get(f"add_{kind}_token"), bool):
            flags[kind] = settings[f"add_{kind}_token"]
        if kind in flags:
            found.append(TypedMetadata(f"tokenizer.ggml.add_{kind}_token", "bool", flags[kind]))
    return [*found, *(_chat_templates(folder, settings) if settings else [])]


def _content(entry: Any) -> str | None:
    entry = entry.get("content") if isinstance(entry, dict) else entry
    return entry if isinstance(entry, str) else None


def _is_id(token_id: Any, count: int) -> TypeGuard[int]:
    return isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < count


def _optional_json(path: Path) -> dict[str, Any]:
    try:
        return _hf_folder.load_json(path) if path.is_file() else {}
    except (ModelportError, OSError):
        return {}


def _added_by_post_processor(processor: Any, settings: dict[str, Any]) -> dict[str, bool]:
    """What the post-processor adds around one sequence, read as crudely as gguf-py reads it:
    RoBERTa's adds BOS, EOS and SEP; a template's leading special token is the BOS (when it
    is tokenizer_config.json's bos or cls token) and its trailing one the EOS."""
    flags: dict[str, bool] = {}
    steps = processor.get("processors", [processor]) if isinstance(processor, dict) else []
    for step in (s for s in steps if isinstance(s, dict)):
        if step.get("type") == "RobertaProcessing":
            flags |= {"bos": True, "eos": True, "sep": True}
        single = step.get("single") if step.get("type") == "TemplateProcessing" else None
        if not isinstance(single, list) or len(single) < 2:
            continue
        first, last = (_special_in(part) for part in (single[0], single[-1]))
        bos = {_content(settings.get(k)) for k in ("bos_token", "cls_token")} - {None}
        if first is not None:
            flags["bos"] = not settings or first in bos
        if last is not None and (not settings or last == _content(settings.get("eos_token"))):
            flags["eos"] = True
    return flags


def _special_in(part: Any) -> str | None:
    special = part.get("SpecialToken") if isinstance(part, dict) else None
    return _content(special.get("id")) if isinstance(special, dict) else None


def _chat_templates(folder: Path, settings: dict[str, Any]) -> list[TypedMetadata]:
    """``tokenizer.chat_template`` from tokenizer_config.json, else chat_template.jinja or
    chat_template.json; a list of named templates as gguf-py writes it (the one named
    ``default`` under the plain key, the others under ``tokenizer.chat_template.{name}``)."""
    template = settings.get("chat_template")
    jinja = folder / CHAT_TEMPLATE_JINJA
    if template is None and jinja.is_file() and jinja.stat().st_size <= MAX_CHAT_TEMPLATE:
        template = jinja.read_bytes().decode("utf-8", errors="replace")
    elif template is None:
        template = _optional_json(folder / CHAT_TEMPLATE_JSON).get("chat_template")
    if isinstance(template, str):
        return [TypedMetadata("tokenizer.chat_template", "string", template)]
    named: dict[str, str] = {}
    for choice in template if isinstance(template, list) else []:
        name = str(choice.get("name", "")) if isinstance(choice, dict) else ""
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in name)
        if name and isinstance(choice.get("template"), str):
            named[name] = choice["template"]
    found = [
        TypedMetadata(f"tokenizer.chat_template.{name}", "string", text)
        for name, text in named.items()
        if name != "default"
    ]
    if found:
        others = tuple(name for name in named if name != "default")
        found.append(TypedMetadata("tokenizer.chat_templates", "string", others))
    if "default" in named:
        found.append(TypedMetadata("tokenizer.chat_template", "string", named["default"]))
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
    special = special_tokens(path.parent, tokenizer, config, size)
    unknown = "tokenizer.ggml.unknown_token_id"
    if 0 <= processor.unk_id() < size and all(entry.key != unknown for entry in special):
        metadata.append(TypedMetadata(unknown, "uint32", processor.unk_id()))
    return Vocabulary((*metadata, *special))


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
            # a space inside a part would read as the separator: gguf-py's stand-in for it
            result.append(" ".join(part.replace(" ", SPACE_IN_MERGE) for part in merge))
        else:
            raise _BadVocabulary(f"merge {merge!r} is not a pair")
    return result
