"""A Hugging Face model card for a model file, written from its content.

The card is ``README.md`` text: YAML front matter the hub reads (``library_name``, ``tags``,
``pipeline_tag`` and ``base_model`` when a config beside the file tells them), then what the
file holds (format by content, size, sha256, the weights digest, tensors, parameters by
dtype, the top of its module tree, checkpoint extras), the code that loads it with its
format's reference library (run from the card's folder), the scan verdict with its
findings, and where the file came from.

Like ``inspect`` and ``report``, a card refuses nothing and runs nothing from the file: an
unsafe file gets a card that says so. The same file gives the same card (no dates): a card
can be checked in beside its model and compared.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from modelport._version import __version__
from modelport.comparing.fingerprint import SCHEME, fingerprint
from modelport.conversion.converting import ConvertReport
from modelport.conversion.options import ConvertOptions
from modelport.errors import ModelportError, SuspiciousModelWarning, UsageError
from modelport.loading import model_file, weights_only
from modelport.reporting import _card_markdown as md
from modelport.reporting._card_hub import HubConfig, front_matter, hub_config, yaml_text
from modelport.reporting._card_loading import LoadingCode, loading_code
from modelport.reporting._card_modules import dtype_rows, module_lines
from modelport.reporting.html_parts import human_bytes
from modelport.reporting.model_report import FileDigest, file_digests
from modelport.scanning.findings import ScanReport
from modelport.scanning.scanner import scan
from modelport.transfer.hashing import sha256_of
from modelport.tree import names as trees

MAX_LISTED: Final = 20  # extras, metadata and details entries shown
_MODELPORT_KEY: Final = "modelport."  # metadata keys ``convert`` writes (its provenance)


@dataclass(frozen=True)
class Provenance:
    """Where a model file came from, as the command that made it knows: the source and its
    digests, the recipe (code that makes the file again) and how the result was checked."""

    source: str
    source_format: str = ""
    source_sha256: str = ""
    source_weights_digest: str = ""
    recipe: str = ""  # Python (or a shell command) that makes this file from the source
    verification: str = ""
    notes: tuple[str, ...] = ()

    @classmethod
    def of(cls, value: Provenance | Mapping[str, Any]) -> Provenance:
        """A ``Provenance`` from itself or a plain dict with the same keys."""
        if isinstance(value, Provenance):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown or "source" not in value:
            raise UsageError(
                f"provenance takes the keys {', '.join(sorted(known))} ('source' required); "
                f"got {', '.join(map(str, unknown)) or 'no source'}"
            )
        found = dict(value)
        found["notes"] = tuple(found.get("notes", ()))
        return cls(**found)


@dataclass(frozen=True)
class Card:
    """A model card: the hub's metadata and the Markdown body; ``text`` is the file."""

    front_matter: dict[str, Any]
    body: str
    notes: tuple[str, ...] = field(default=())

    @property
    def text(self) -> str:
        return f"---\n{yaml_text(self.front_matter)}---\n\n{self.body}"

    def to_json(self) -> dict[str, Any]:
        return {"card": self.text, "front_matter": self.front_matter}


def card(
    path: str | Path,
    *,
    provenance: Provenance | Mapping[str, Any] | None = None,
    relative_to: str | Path | None = None,
    digests: bool = True,
) -> str:
    """The model card of ``path`` as ``README.md`` text (see ``build_card``)."""
    return build_card(path, provenance=provenance, relative_to=relative_to, digests=digests).text


def build_card(
    path: str | Path,
    *,
    provenance: Provenance | Mapping[str, Any] | None = None,
    relative_to: str | Path | None = None,
    digests: bool = True,
) -> Card:
    """The card of a model file or folder. Its code names the file relative to
    ``relative_to`` (the folder the card will sit in; default: the file's own folder) and runs
    from there. ``digests`` reads the whole file twice more: its sha256 and the weights
    digest ``modelport hash`` gives."""
    target = Path(path)
    made = None if provenance is None else Provenance.of(provenance)
    config, config_note = hub_config(target)
    verdict = scan(target)
    checksums = file_digests(target) if digests else None
    weights = _weights_digest(target) if digests else ""
    with model_file.open(target) as model:
        name = _named(model.path, relative_to)
        loading = loading_code(model, name, config, verdict.verdict)
        holds = _holdings(model, config, checksums, weights)
        recorded = {k: v for k, v in model.metadata.items() if str(k).startswith(_MODELPORT_KEY)}
        notes = tuple(model.warnings) + ((config_note,) if config_note else ())
        title = model.path.name
        fmt = model.format.value
    body = "\n".join(
        [
            f"# {md.escaped(title)}\n",
            f"Model card written by modelport {__version__} from the file's content; "
            "nothing in the file was run to write it.\n",
            holds,
            _loading_section(loading, name),
            _scan_section(verdict),
            _provenance_section(made, recorded, weights),
        ]
    )
    return Card(front_matter(config, fmt), body, notes)


def _named(path: Path, relative_to: str | Path | None) -> str:
    base = Path(relative_to) if relative_to is not None else path.parent
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _weights_digest(path: Path) -> str:
    """The weights digest, or "" when the weights cannot be hashed (the card says so)."""
    with warnings.catch_warnings():  # the verdict is in the card; no warning on the side
        warnings.simplefilter("ignore", SuspiciousModelWarning)
        try:
            return fingerprint(path, allow_unsafe=True).digest
        except ModelportError:
            return ""


def _holdings(
    model: model_file.ModelFile,
    config: HubConfig | None,
    checksums: tuple[FileDigest, ...] | None,
    weights: str,
) -> str:
    """The "what the file holds" section."""
    selection = model.weights()
    rows = _identity_rows(model, checksums, weights)
    rows.append(
        ("tensors", _tensor_count(len(model.tensors), len(selection.tensors), selection.note))
    )
    rows.append(("parameters", md.count(trees.parameter_count(selection.tensors))))
    if config is not None and (config.class_name or config.model_type):
        kind = f"model type {md.code(config.model_type)}; " if config.model_type else ""
        described = md.code(config.class_name) + " " if config.class_name else ""
        rows.append(("architecture", f"{described}({kind}{config.library}, {config.config_file})"))
    parts = ["## What the file holds\n", md.table(("", ""), rows)]
    if checksums is not None and len(checksums) > 1:
        files = [(md.code(f.name), human_bytes(f.size), md.code(f.sha256)) for f in checksums]
        parts += ["Files:\n", md.table(("file", "size", "sha256"), files[:100])]
    parts += ["Parameters by dtype (the weights):\n"]
    parts.append(
        md.table(("dtype", "tensors", "parameters", "bytes"), dtype_rows(selection.tensors))
    )
    lines = module_lines(selection.tensors, model.module_tree())
    if lines:
        parts += ["Modules (top levels):\n", "\n".join(lines) + "\n"]
    parts += _listed("Checkpoint extras", _extras(model.tree))
    shown = {k: v for k, v in model.metadata.items() if not str(k).startswith(_MODELPORT_KEY)}
    parts += _listed("Metadata", shown)
    parts += _listed("Format details", {k: v for k, v in model.details.items() if k != "modules"})
    return "\n".join(parts)


def _identity_rows(
    model: model_file.ModelFile, checksums: tuple[FileDigest, ...] | None, weights: str
) -> list[tuple[str, str]]:
    rows = [
        ("format", f"{md.code(model.format.value)} (detected from the content)"),
        ("size", human_bytes(model.size_bytes)),
    ]
    if checksums is not None and len(checksums) == 1:
        rows.append(("sha256", md.code(checksums[0].sha256)))
    if checksums is not None:
        digest = f"{md.code(weights)} ({SCHEME}, as `modelport hash` gives)" if weights else ""
        rows.append(("weights digest", digest or "not computed: the weights could not be read"))
    return rows


def _tensor_count(total: int, weights: int, note: str) -> str:
    if weights == total and not note:
        return md.count(total)
    return f"{md.count(total)} in the file; the weights: {md.count(weights)} ({md.escaped(note)})"


def _extras(tree: Any) -> dict[str, Any]:
    """A checkpoint's values beside its tensors (a pickled module's tree is shown above)."""
    if weights_only.module_weights(tree) or weights_only.all_tensors(tree):
        return {}
    found = trees.extras(tree)
    if isinstance(found, dict):
        return {str(k): v for k, v in found.items()}
    return {"": found} if found else {}


def _listed(title: str, items: Mapping[str, Any]) -> list[str]:
    if not items:
        return []
    entries = list(items.items())
    lines = [f"- {md.code(str(k))}: {md.value_text(v)}" for k, v in entries[:MAX_LISTED]]
    if len(entries) > MAX_LISTED:
        lines.append(f"- … and {len(entries) - MAX_LISTED} more")
    return [f"{title}:\n", "\n".join(lines) + "\n"]


def _loading_section(loading: LoadingCode, name: str) -> str:
    if name == ".":
        where = "Run it in the model's folder."
    elif "/" in name:
        where = "Run it in the folder this card sits in."
    else:
        where = f"Run it in the folder that holds {md.code(name)}."
    parts = ["## How to load it\n", where + "\n"]
    parts += [note + "\n" for note in loading.notes]
    parts.append(md.fenced(loading.code))
    for sentence, code in loading.more:
        parts += [sentence + "\n", md.fenced(code)]
    return "\n".join(parts)


def _scan_section(report: ScanReport) -> str:
    serious = report.serious
    summary = f"`modelport scan` verdict: **{report.verdict}**"
    if not serious:
        return f"## Scan\n\n{summary}, with no findings.\n"
    rows = [
        (
            f.severity.value,
            md.code(f.rule),
            md.code(f.member + (f" @ {f.offset}" if f.offset is not None else "")),
            md.escaped(f.message),
            md.escaped(f.fix),
        )
        for f in serious[:50]
    ]
    more = (
        f"\n{len(serious) - 50} more findings: run `modelport scan`.\n" if len(serious) > 50 else ""
    )
    table = md.table(("severity", "rule", "where", "finding", "fix"), rows)
    return f"## Scan\n\n{summary}.\n\n{table}{more}"


def _provenance_section(made: Provenance | None, recorded: Mapping[str, Any], weights: str) -> str:
    if made is None:
        return "## Provenance\n\n" + _recorded_provenance(recorded)
    rows = [
        (
            "source",
            md.code(made.source)
            + (f" ({md.code(made.source_format)})" if made.source_format else ""),
        )
    ]
    if made.source_sha256:
        rows.append(("source sha256", md.code(made.source_sha256)))
    if made.source_weights_digest:
        same = " (the same as this file's: the weights are the source's, bit for bit)"
        rows.append(
            (
                "source weights digest",
                md.code(made.source_weights_digest)
                + (same if made.source_weights_digest == weights else ""),
            )
        )
    if made.verification:
        rows.append(("verification", md.escaped(made.verification)))
    parts = ["## Provenance\n", md.table(("", ""), rows)]
    parts += [f"- {md.escaped(note)}" for note in made.notes]
    if made.notes:
        parts.append("")
    if made.recipe:
        parts += ["Made with:\n", md.fenced(made.recipe)]
    return "\n".join(parts)


def _recorded_provenance(recorded: Mapping[str, Any]) -> str:
    """What a file modelport wrote says of its source, in its own metadata."""
    if not recorded:
        return "Nothing in the file records where it came from.\n"
    lines = [
        f"- {md.code(str(k))}: {md.value_text(v, 300)}"
        for k, v in list(recorded.items())[:MAX_LISTED]
    ]
    return (
        "The file's metadata records its making (modelport wrote it):\n\n" + "\n".join(lines) + "\n"
    )


def conversion_provenance(
    report: ConvertReport, options: ConvertOptions, *, digests: bool = True
) -> Provenance:
    """The provenance of a conversion's output: the source with its digests, the call that
    repeats the conversion, and what verification found."""
    source = Path(report.source)
    changed = {
        f.name: getattr(options, f.name)
        for f in fields(options)
        if f.name not in ("overwrite", "fsync", "dry_run") and getattr(options, f.name) != f.default
    }
    arguments = ", ".join(f"{key}={value!r}" for key, value in changed.items())
    extra = f", modelport.ConvertOptions({arguments})" if arguments else ""
    named = f"{json.dumps(source.name)}, {json.dumps(Path(report.target).name)}"
    recipe = f"import modelport\n\nmodelport.convert({named}{extra})\n"
    if report.verified:
        verification = "every tensor written was read back and compared with the source " + (
            "(after the same cast)" if report.casts else "bit for bit"
        )
    else:
        verification = "not verified" if report.verified is None else "verification failed"
    notes = (f"took: {report.selection}", *report.notes)
    if report.left_out:
        notes += (f"left out: {', '.join(report.left_out)}",)
    weights = ""
    if digests:
        weights = fingerprint(source, allow_unsafe=options.allow_unsafe).digest
    return Provenance(
        source=source.name,
        source_format=report.source_format,
        source_sha256=sha256_of(source) if digests else "",
        source_weights_digest=weights,
        recipe=recipe,
        verification=verification,
        notes=notes,
    )
