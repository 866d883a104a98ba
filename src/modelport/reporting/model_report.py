"""Everything the HTML report shows, gathered once: for each file its identity (checksums,
weights digest), the scanner's findings, what ``inspect`` reads and the statistics of every
tensor; for two files, their diff; for the output of ``export`` or ``rebuild``, how it was
made and verified. ``to_json`` is the data the page carries for tools.

Checksums and the weights digest read every byte once more, so they are taken on two side
threads while the statistics run (``hashlib`` releases the GIL).

With ``model`` (``report --model``, a spec as ``check`` takes it), each file's weights are
checked against that model as ``check`` checks them (``load_state_dict(strict=True)``'s
answer, names and shapes only); the model is built once, on the meta device when it can be.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from modelport._version import __version__
from modelport.comparing.diffing import DiffReport, diff
from modelport.comparing.fingerprint import HashReport, fingerprint
from modelport.errors import SuspiciousModelWarning
from modelport.formats import _hf_folder
from modelport.loading.inspect_report import InspectReport
from modelport.loading.model_file import inspect, stats
from modelport.measuring.stats_records import StatsReport
from modelport.reporting.verification import Verification
from modelport.scanning.findings import ScanReport
from modelport.scanning.scanner import scan
from modelport.torch_models.building import build_model
from modelport.torch_models.checking import CheckReport, check
from modelport.transfer.hashing import sha256_of

MAX_CONFIG_TEXT: Final = 128 << 10  # bytes of a config.json carried by the page


@dataclass(frozen=True)
class ConfigFile:
    """The ``config.json`` of a Hugging Face folder, as text: the folder the report is on,
    or the one a weights file sits in. ``text`` is its first ``MAX_CONFIG_TEXT`` bytes
    (``truncated`` says whether that is all), decoded as UTF-8 with a replacement mark for
    what is not, and shown as it is written: no parse stands between the file and the page."""

    path: str
    size: int
    text: str
    truncated: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "text": self.text,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class FileDigest:
    """A file's sha256: the file itself, or each file of a model directory (shards)."""

    name: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class FileSection:
    """One file's part of a report. ``weights`` and ``files`` are None when digests were not
    asked for (they read the whole file once more)."""

    path: str
    inspect: InspectReport
    scan: ScanReport
    stats: StatsReport
    files: tuple[FileDigest, ...] | None
    weights: HashReport | None
    config: ConfigFile | None = None
    fit: CheckReport | None = None  # with a model to check the weights against

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "files": None if self.files is None else [f.to_json() for f in self.files],
            "weights": None if self.weights is None else self.weights.to_json(tensors=False),
            "scan": self.scan.to_json(),
            "inspect": self.inspect.to_json(),
            "stats": self.stats.to_json(),
            "config": None if self.config is None else self.config.to_json(),
            "check": None if self.fit is None else self.fit.to_json(),
        }


@dataclass(frozen=True)
class Report:
    """A report on one file, or on two and how their weights differ (``diff``);
    ``verification`` is what made the file and how it was checked, when a command that
    wrote it (``export``, ``rebuild``) asks for the page."""

    sections: tuple[FileSection, ...]
    diff: DiffReport | None
    version: str
    created: str  # ISO 8601, UTC
    verification: Verification | None = None
    model: str | None = None  # the spec the weights were checked against

    def to_json(self) -> dict[str, Any]:
        """Strict JSON: NaN and Inf anywhere (a checkpoint's ``best_loss``) become strings."""
        found = {
            "modelport": self.version,
            "created": self.created,
            "files": [s.to_json() for s in self.sections],
            "diff": None if self.diff is None else self.diff.to_json(),
            "model": self.model,
        }
        if self.verification is not None:
            found["verification"] = self.verification.to_json()
        safe: dict[str, Any] = _finite(found)
        return safe


def build(
    paths: Sequence[str | Path],
    *,
    threads: int | None = None,
    digests: bool = True,
    verification: Verification | None = None,
    model: str | None = None,
    init: str | None = None,
) -> Report:
    """The report on one or two model files. Like ``inspect`` it refuses nothing: an unsafe
    file is read with modelport's own readers, executing nothing, and its verdict shown.
    ``verification``: the facts of the command that wrote the file, shown first. ``model``
    and ``init``: the model to check each file's weights against (``check``'s spec; it
    runs the code the spec names, never code from the files)."""
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"a report covers one or two files, got {len(paths)}")
    built = None if model is None else build_model(model, init, meta=True)
    with warnings.catch_warnings():  # the verdict is on the page; no warning on the side
        warnings.simplefilter("ignore", SuspiciousModelWarning)
        sections = tuple(_section(Path(p), threads, digests) for p in paths)
        if built is not None:
            fits = [check(p, built, allow_unsafe=True) for p in paths]
            sections = tuple(replace(s, fit=f) for s, f in zip(sections, fits, strict=True))
        compared = diff(paths[0], paths[1], allow_unsafe=True) if len(paths) == 2 else None
    return Report(
        sections=sections,
        diff=compared,
        version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        verification=verification,
        model=model,
    )


def _section(path: Path, threads: int | None, digests: bool) -> FileSection:
    with ThreadPoolExecutor(2, thread_name_prefix="modelport-digest") as side:
        checksums = side.submit(file_digests, path) if digests else None
        weights = side.submit(fingerprint, path, allow_unsafe=True) if digests else None
        summary = inspect(path)
        verdict = scan(path)
        measured = stats(path, threads=threads)
        return FileSection(
            path=summary.path,
            inspect=summary,
            scan=verdict,
            stats=measured,
            files=None if checksums is None else checksums.result(),
            weights=None if weights is None else weights.result(),
            config=config_file(path),
        )


def config_file(path: Path) -> ConfigFile | None:
    """The ``config.json`` of the folder ``path`` is, or of the model folder a weights file
    lies in (a folder ``open`` would read as one model); None without one."""
    folder = path if path.is_dir() else path.parent
    found = folder / _hf_folder.CONFIG_NAME
    if not found.is_file() or (not path.is_dir() and not _hf_folder.sniff_folder(folder)):
        return None
    with found.open("rb") as handle:
        head = handle.read(MAX_CONFIG_TEXT + 1)
    size = found.stat().st_size
    shown = head[:MAX_CONFIG_TEXT]
    return ConfigFile(
        path=str(found),
        size=size,
        text=shown.decode("utf-8", "replace"),
        truncated=len(head) > MAX_CONFIG_TEXT or size > len(shown),
    )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def file_digests(path: Path) -> tuple[FileDigest, ...]:
    """sha256 of the file, or of every file under a directory, by relative name."""
    if not path.is_dir():
        return (FileDigest(path.name, path.stat().st_size, sha256_of(path)),)
    found = sorted(p for p in path.rglob("*") if p.is_file())
    return tuple(
        FileDigest(p.relative_to(path).as_posix(), p.stat().st_size, sha256_of(p)) for p in found
    )
