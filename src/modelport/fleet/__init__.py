"""Many files at once: a command run over lists and folders of inputs, each file in a worker
process of its own with a time and memory budget, one JSON Lines record per file written as
it finishes, and a rerun with the same output resuming where the last one stopped.

The work unit is one path. ``inputs`` expands the paths, folders and lists a user names
into inputs (and picks this machine's shard); ``journal`` is the JSONL output (locked,
appended to, synced in batches, a cut last line repaired); ``pool`` keeps ``--jobs``
worker processes (``worker``, running ``tasks``) busy and turns a worker that dies or
overruns into that file's record; ``dask_runner`` sends the same tasks to a Dask cluster
instead (``--scheduler``); ``dedupe`` judges the same bytes under the same name once
(``--dedupe``); ``convert_manifest`` reads ``convert --from-file`` manifests (an input is
then a source and its target); ``running`` ties them together and resumes; ``summary``
rebuilds a command's summary from a JSONL file. ``records`` is the record and its schema.

Imports comparing, loading, scanning, formats and below; only ``cli`` imports it.
"""

from __future__ import annotations

from modelport.fleet.records import SCHEMA_VERSION as SCHEMA_VERSION
from modelport.fleet.records import Record as Record
from modelport.fleet.summary import Summary as Summary
from modelport.fleet.summary import summarize as summarize

__all__ = ["SCHEMA_VERSION", "Record", "Summary", "summarize"]
