"""Many files at once: a command run over lists and folders of inputs, each file in a worker
process of its own with a time and memory budget, one JSON Lines record per file written as
it finishes, and a rerun with the same output resuming where the last one stopped.

The work unit is one path. ``inputs`` expands the paths, folders and lists a user names
into inputs (and picks this machine's shard); ``journal`` is the JSONL output (locked,
appended to, synced in batches, a cut last line repaired); ``pool`` keeps ``--jobs`` worker
processes (``worker``, running ``tasks``; forked from the parent where ``forking`` finds
that safe) busy and turns a worker that dies or overruns into that file's record;
``dask_runner`` sends the same tasks to a Dask cluster instead (``--scheduler``);
``dedupe`` judges the same bytes under the same name once (``--dedupe``);
``convert_manifest`` reads ``convert --from-file`` manifests (an input is then a source and
its target); ``running`` ties them together and resumes; ``summary`` rebuilds a command's
summary from a JSONL file. ``records`` is the record and its schema.

The names below are imported from their modules on first use: every worker process imports
this package, and a worker needs no summary or journal.

Imports comparing, loading, scanning, formats and below; only ``cli`` imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelport.fleet.records import SCHEMA_VERSION as SCHEMA_VERSION
    from modelport.fleet.records import Record as Record
    from modelport.fleet.summary import Summary as Summary
    from modelport.fleet.summary import summarize as summarize

# public name -> the module that defines it
_PUBLIC: dict[str, str] = {
    "SCHEMA_VERSION": "modelport.fleet.records",
    "Record": "modelport.fleet.records",
    "Summary": "modelport.fleet.summary",
    "summarize": "modelport.fleet.summary",
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'modelport.fleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__all__ = ["SCHEMA_VERSION", "Record", "Summary", "summarize"]
