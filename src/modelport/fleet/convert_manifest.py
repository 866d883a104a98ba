"""``convert --from-file MANIFEST``: many conversions, one JSON object a line, each
``{"source": ..., "target": ..., ...options}``, run as the fleet runs scan, hash and inspect.

The options are spelled as ``ConvertOptions`` names them (``take_all``, ``verify``,
``renames``) or as the command line does (``all``, ``no_verify``, ``rename``, ``from_tf``;
``strip-prefix`` with its dash works too), and an entry's option replaces the one the command
line gave every entry. Every line is read and checked before anything runs: a key that is no
option, a value of the wrong kind, or two entries that would write the same output (or one
that would write another's source, or inside another's output folder) is a ``UsageError``
naming its line, so a typo on line 90,000 costs no half-finished run.

The parent reads the manifest (``read``, ``check_outputs``); a worker converts one entry
(``convert_entry``) with ``conversion.converting.convert``, so every entry keeps what
``convert SRC DST`` guarantees: a temporary file beside the target, verified before one
rename puts it in place, and an existing target replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from modelport import dtypes
from modelport.conversion.converting import CASTS, GGUF_TYPES, TARGETS, convert, gguf_type_name
from modelport.conversion.options import ConvertOptions
from modelport.errors import UsageError
from modelport.fleet.records import Identity, plain
from modelport.torch_models import tf_names

FROM_TF: Final = ("auto", "off")
_FLAGS: Final = frozenset(
    {
        "dequantize",
        "sha256",
        "take_all",
        "drop_unrepresentable",
        "materialize_ties",
        "ema",
        "overwrite",
        "fsync",
        "verify",
        "dry_run",
        "allow_unsafe",
    }
)
_TEXTS: Final = frozenset({"extract", "strip_prefix", "add_prefix"})
_GLOBS: Final = frozenset({"include", "exclude"})


@dataclass(frozen=True)
class Entry:
    """One line of a manifest: what to convert into what, the options the line sets (in
    ``ConvertOptions``' names, as JSON holds them), and where the line is, for messages."""

    source: str
    target: str
    options: dict[str, Any]
    where: str


def read(manifest: str) -> list[Entry]:
    """The entries of ``manifest`` (``-``: standard input), blank lines skipped."""
    if manifest == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with open(manifest, encoding="utf-8", errors="surrogateescape") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read --from-file {manifest}: {exc.strerror or exc}") from exc
    name = "standard input" if manifest == "-" else manifest
    return [
        entry(line, f"{name} line {number}")
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]


def entry(line: str, where: str) -> Entry:
    """One manifest line as an ``Entry``; anything else is a ``UsageError`` naming ``where``."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise UsageError(f"{where}: not a JSON object ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a JSON object with source and target")
    paths = [data.pop(key, None) for key in ("source", "target")]
    for key, value in zip(("source", "target"), paths, strict=True):
        if not isinstance(value, str) or not value:
            raise UsageError(f"{where}: {key} must be a path (a non-empty string)")
    options: dict[str, Any] = {}
    for key, value in data.items():
        try:
            name, checked = option(key.replace("-", "_"), value)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
        options[name] = checked
    return Entry(paths[0], paths[1], plain(options), where)


def option(key: str, value: Any) -> tuple[str, Any]:
    """An entry's option in ``ConvertOptions``' name, checked as the command line checks
    its flag; raises ValueError saying what is wrong."""
    if key in _SPELLINGS:
        name, read_value = _SPELLINGS[key]
        return name, read_value(value)
    if key in _FLAGS:
        return key, _flag(key, value)
    if key in _TEXTS:
        return key, _text(key, value)
    if key in _GLOBS:
        return key, _globs(key, value)
    if key in _CHOICES:
        choose, allowed = _CHOICES[key]
        text = _text(key, value)
        chosen = None if text is None else choose(text)
        if chosen is not None and chosen not in allowed:
            raise ValueError(f"{key} {value!r}: choose from {', '.join(sorted(allowed))}")
        return key, chosen
    if key == "shard_size":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
            raise ValueError("shard_size is a size such as '2GB' or a number of bytes")
        return key, value
    known = sorted({*_FLAGS, *_TEXTS, *_GLOBS, *_CHOICES, *_SPELLINGS, "shard_size"})
    raise ValueError(f"unknown key {key!r}; an entry takes source, target and {', '.join(known)}")


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} is true or false, not {value!r}")
    return value


def _text(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} is a string, not {value!r}")
    return value


def _globs(key: str, value: Any) -> list[str]:
    listed = [value] if isinstance(value, str) else value
    if not isinstance(listed, list) or not all(isinstance(v, str) for v in listed):
        raise ValueError(f"{key} is a glob or a list of globs, not {value!r}")
    return listed


def _renames(value: Any) -> list[list[str]]:
    """``renames`` as pairs ``[REGEX, REPL]``."""
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in value
    ):
        raise ValueError(f"renames is a list of [REGEX, REPL] pairs, not {value!r}")
    return [list(p) for p in value]


def _rename_rules(value: Any) -> list[list[str]]:
    """``rename`` as the command line writes it, ``REGEX=REPL`` (one, or a list)."""
    rules = _globs("rename", value)
    pairs = []
    for rule in rules:
        pattern, sep, replacement = rule.partition("=")
        if not sep:
            raise ValueError(f"rename {rule!r}: expected REGEX=REPL")
        pairs.append([pattern, replacement])
    return pairs


def _not_verify(value: Any) -> bool:
    return not _flag("no_verify", value)


_SPELLINGS: Final[dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "all": ("take_all", lambda v: _flag("all", v)),
    "no_verify": ("verify", _not_verify),
    "rename": ("renames", _rename_rules),
    "renames": ("renames", _renames),
}
_CHOICES: Final[dict[str, tuple[Callable[[str], str], Iterable[str]]]] = {
    "to": (str, tuple(TARGETS)),
    "dtype": (dtypes.canonical_name, CASTS),
    "gguf_type": (gguf_type_name, tuple(GGUF_TYPES)),
    "from_tf": (str, FROM_TF),
}


def command_line(options: ConvertOptions, from_tf: str) -> dict[str, Any]:
    """What the command line gives every entry, in the names and form entries use."""
    given = {f.name: getattr(options, f.name) for f in fields(options) if f.name != "name_map"}
    converted: dict[str, Any] = plain({**given, "from_tf": from_tf})
    return converted


def check_outputs(entries: list[Entry]) -> None:
    """Refuse, before anything runs, a manifest in which an output would be written twice:
    two entries with one target, a target that is another entry's source, or a target
    inside another's output folder (paths compared with links and ``..`` resolved)."""
    targets: dict[Path, Entry] = {}
    for item in entries:
        resolved = Path(item.target).resolve()
        earlier = targets.setdefault(resolved, item)
        if earlier is not item:
            raise UsageError(
                f"{item.where}: target {item.target} is also the target of {earlier.where}; "
                "no output may be written twice"
            )
    for item in entries:
        reader = targets.get(Path(item.source).resolve())
        if reader is not None and reader is not item:
            raise UsageError(
                f"{reader.where}: target {reader.target} is the source of {item.where}; "
                "convert them in two runs"
            )
    for resolved, item in targets.items():
        outer = next((targets[p] for p in resolved.parents if p in targets), None)
        if outer is not None:
            raise UsageError(
                f"{item.where}: target {item.target} lies inside the target of {outer.where}"
            )


def convert_entry(source: str, options: dict[str, Any]) -> tuple[str, Any]:
    """Convert one entry (its merged options, target included), as ``convert SRC DST``
    would; the result is the conversion's report without its per-tensor lists, and the
    identity of what was written, by which a rerun knows the output still stands."""
    chosen = conversion_options(options)
    path: str | Path = source
    if options.get("from_tf", "auto") == "auto" and not (chosen.extract or chosen.take_all):
        path, chosen = pytorch_names(Path(source), chosen)
    report = convert(path, options["target"], chosen)
    result = report.to_json()
    del result["tensors"]
    casts = result.pop("casts")
    result["cast_count"] = len(casts)
    result["max_cast_error"] = max((c["max_abs_error"] for c in casts), default=None)
    result["overflowed"] = sum(c["overflow"] for c in casts)
    written = None if report.dry_run else Identity.of(options["target"])
    result["target_identity"] = None if written is None else vars(written)
    return report.source_format, result


def conversion_options(options: dict[str, Any]) -> ConvertOptions:
    """The ``ConvertOptions`` of an entry's merged options."""
    names = {f.name for f in fields(ConvertOptions)}
    given = {k: v for k, v in options.items() if k in names}
    for key in _GLOBS:
        if key in given:
            given[key] = tuple(given[key])
    if "renames" in given:
        given["renames"] = tuple((p, r) for p, r in given["renames"])
    return ConvertOptions(**given)


def pytorch_names(source: Path, options: ConvertOptions) -> tuple[str, ConvertOptions]:
    """A transformers ``tf_model.h5`` with its ``config.json`` converted under the PyTorch
    model's names and layouts, as ``convert SRC DST`` converts it; other sources as named."""
    h5_path = tf_names.tf_weights_file(source)
    if h5_path is None:
        return str(source), options
    name_map = tf_names.pytorch_layout(h5_path, options.include, options.exclude)
    return str(h5_path), replace(options, name_map=name_map)
