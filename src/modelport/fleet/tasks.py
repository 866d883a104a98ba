"""What a worker does with one input: the command's own call on one path, its result as
JSON, or the error it raised as a type and a one-line message (an ``Outcome``).

The calls are the ones each command makes for one file (``scanning.scanner.scan_file`` as
``scan`` makes it for a file of a folder; ``comparing.fingerprint.fingerprint``;
``loading.model_file.inspect``; ``convert_manifest.convert_entry``, one manifest entry), so a
record's result is what the command alone would print for that file. Nothing here imports
torch; a file whose reading needs it imports it then. The conversion path is imported by the
first conversion a worker makes, through ``importlib``: the workers of scan, hash and inspect
never pay for it.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from modelport import errors
from modelport.errors import ModelportWarning
from modelport.fleet.records import Failure, Identity, Outcome
from modelport.formats import registry
from modelport.pickles.symbols import Severity
from modelport.scanning.findings import Finding
from modelport.scanning.scanner import scan_file
from modelport.transfer import remote

# The modules each command needs besides the scanner (which every worker has); a scan of
# an object behind a URL imports its own on its first.
_MODULES: Final = {
    "scan_url": "modelport.scanning.remote_inputs",
    "hash": "modelport.comparing.fingerprint",
    "inspect": "modelport.loading.model_file",
    "convert": "modelport.fleet.convert_manifest",
}
# The parts of a scan that the scanner imports on the first file calling for them: zips,
# pickle streams and what tells a pickle's kind. With every file reader (a plain pickle
# reaches them all before its own), a worker has what a mixed folder's first files would
# import, about 0.1 s of a core, before it says it is ready.
_SCAN_PARTS: Final = (
    "modelport.scanning.archives",
    "modelport.scanning.streams",
    "modelport.scanning.content_kinds",
)


def preload(commands: Iterable[str]) -> None:
    """Import what ``commands`` need, so that a worker's start-up, not its first file's
    time budget, pays for it."""
    for command in commands:
        if command in _MODULES:
            _module(command)
        if command == "scan":
            registry.every_reader(registry.FILE_SLOTS)
            for name in _SCAN_PARTS:
                importlib.import_module(name)


def _module(command: str) -> ModuleType:
    return importlib.import_module(_MODULES[command])


def perform(command: str, path: str, options: dict[str, Any]) -> Outcome:
    """Run ``command`` on ``path``. The file's identity is taken before it is read and
    checked after, so a record never pairs one version's identity with another's result."""
    started = time.perf_counter()
    identity = Identity.of(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModelportWarning)  # every file says its own
        try:
            fmt, result = _COMMANDS[command](path, options)
            error = None
            if Identity.of(path) != identity:
                error = Failure(
                    "SourceChangedError",
                    f"{path}: the file changed while it was read; it will be read again "
                    "by the next run",
                )
        except MemoryError:
            raise  # the worker's heap may be spent: it answers, then gives way to a new one
        except Exception as exc:
            if isinstance(exc, ImportError) and _MAP_FAILED in str(exc):
                raise MemoryError(str(exc)) from exc  # a library past the memory budget
            fmt, result, error = "", None, Failure(type(exc).__name__, describe(exc))
    said = tuple(dict.fromkeys(str(w.message) for w in caught))
    return Outcome(identity, fmt, result, error, said, time.perf_counter() - started)


# What the dynamic loader says when ``RLIMIT_AS`` leaves no room for a library it loads.
_MAP_FAILED = "failed to map segment from shared object"


def describe(exc: BaseException) -> str:
    """A one-line message for a failed file, as the CLI words it; an unexpected exception
    is named as an internal error, and the run goes on."""
    said = errors.describe(exc)
    if said is not None:
        return said
    return (
        f"internal error ({type(exc).__name__}: {exc}); please report it with the file's "
        "first bytes"
    )


def _scan(path: str, options: dict[str, Any]) -> tuple[str, Any]:
    segments = options.get("segments")
    if remote.is_url(path):
        report = _module("scan_url").scan_url(path, scan_file)
        return report.format, report.to_json()
    report = scan_file(
        Path(path),
        [(offset, length) for offset, length in segments] if segments is not None else None,
        in_folder=bool(options.get("in_folder")),
        aliases=tuple(Path(alias) for alias in options.get("aliases", ())),
    )
    if "outside" in options:  # the note ``scan DIR`` adds to a link leaving the folder
        target, root = options["outside"]
        report = report.noted(
            Finding(
                Severity.INFO,
                "link-outside",
                "",
                f"a symbolic link to {target}, outside {root}: a loader reads that file, so it "
                "was judged there",
            )
        )
    return report.format, report.to_json()


def _hash(path: str, options: dict[str, Any]) -> tuple[str, Any]:
    report = _module("hash").fingerprint(path, allow_unsafe=bool(options.get("allow_unsafe")))
    return report.format, report.to_json()


def _inspect(path: str, options: dict[str, Any]) -> tuple[str, Any]:
    model_file = _module("inspect")
    report = model_file.inspect(path)
    payload = report.to_json()
    if options.get("code"):
        with model_file.open(path) as model:
            payload["code"] = model.code
    return report.format, jsonable(payload)


def _convert(path: str, options: dict[str, Any]) -> tuple[str, Any]:
    converted: tuple[str, Any] = _module("convert").convert_entry(path, options)
    return converted


def jsonable(value: Any) -> Any:
    """``value`` with the odd values a report may carry made JSON (as ``cli._output.
    json_default`` renders them: sets as lists, bytes as their length, records by repr)."""
    if isinstance(value, dict):
        return {_key(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": len(value)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _key(key: Any) -> Any:
    return key if isinstance(key, (str, int, float, bool)) or key is None else repr(key)


_COMMANDS: dict[str, Callable[[str, dict[str, Any]], tuple[str, Any]]] = {
    "scan": _scan,
    "hash": _hash,
    "inspect": _inspect,
    "convert": _convert,
}
