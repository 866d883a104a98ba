"""Check ``--model`` before anything heavy is imported: a typo is refused in milliseconds,
not after the seconds torch takes to import.

A spec that names an existing file or directory is left to ``building.resolve_model``.
Otherwise it must read ``pkg.module:Name`` (dotted identifiers on both sides), and the
module must be findable: the top-level package through ``importlib.util.find_spec`` on
``sys.path`` plus the working directory (as ``resolve_model`` extends it), each submodule
with ``importlib.machinery.PathFinder`` in its parent's search locations. Nothing is
imported: a finder only looks at the file system. A module imported already passes, and
below a plain module (``os.path``) the check stops: the import itself decides there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from modelport.errors import ModelSpecError

_EXPECTED = "expected pkg.module:Name, a directory with config.json, or a model file"


def check_model_spec(spec: str) -> None:
    """Raise ``ModelSpecError`` when ``spec`` cannot name a model: a path that does not
    exist, a malformed ``pkg.module:Name`` or a module that is nowhere to be found."""
    if Path(spec).exists():
        return
    module_name, sep, attribute = spec.partition(":")
    if not sep:
        raise ModelSpecError(
            f"--model {spec!r}: no such file or directory (code is named pkg.module:Name)"
        )
    if not _dotted(module_name) or not _dotted(attribute):
        if _looks_like_path(module_name):
            raise ModelSpecError(f"--model {spec!r}: no such file or directory")
        raise ModelSpecError(f"--model {spec!r}: {_EXPECTED}")
    missing = _missing_module(module_name)
    if missing is not None:
        raise ModelSpecError(
            f"--model {spec!r}: cannot import {module_name}: no module named {missing!r} "
            f"(on sys.path or in {Path.cwd()})"
        )


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).suffix not in ("", ".")


def _missing_module(module_name: str) -> str | None:
    """The first part of ``module_name`` no finder knows, or None (found, or not
    decidable without importing)."""
    if module_name in sys.modules:
        return None
    parts = module_name.split(".")
    search = [*sys.path, str(Path.cwd())]
    spec = importlib.machinery.PathFinder.find_spec(parts[0], search)
    if spec is None:
        try:
            spec = importlib.util.find_spec(parts[0])  # built-in, frozen, import hooks
        except (ImportError, ValueError):
            spec = None
    if spec is None:
        return parts[0]
    for depth, part in enumerate(parts[1:], start=2):
        locations = spec.submodule_search_locations
        if locations is None:
            return None  # a plain module, whose attributes the import fills in: decide there
        spec = importlib.machinery.PathFinder.find_spec(part, list(locations))
        if spec is None:
            return ".".join(parts[:depth])
    return None
