"""The readers of formats that carry no code, run for a scan: their readers check every size
and offset, ``content_checks`` rates what they report, and the configs they find (a Keras
``model_config``) are searched for embedded objects. Kept apart from ``scanner``, which
decides when a file calls for them, so the two stay small enough to read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from modelport.errors import EscapingReferenceError, ModelportError
from modelport.formats._zip import ZipDirectory
from modelport.formats.protocol import HEAD_BYTES, Contents, Format, Probe
from modelport.formats.registry import FILE_SLOTS, ReaderSlot, candidates
from modelport.scanning import content_checks
from modelport.scanning.scan_state import ScanState
from modelport.severity import Severity

# Formats whose readers check a file that holds no pickle; the scanner reads the others.
CODE_FREE = frozenset(
    (
        Format.SAFETENSORS,
        Format.GGUF,
        Format.GGML,
        Format.ONNX,
        Format.HDF5,
        Format.TFLITE,
        Format.KERAS,
        Format.TF_CHECKPOINT,
        Format.TF_SAVEDMODEL,
        Format.FLAX_MSGPACK,
        Format.EXECUTORCH_PTE,
    )
)

# HDF5 sits behind a user block of any bytes (at 512, 1024, ...): a file that reads as a torch
# zip, an npz or safetensors may be one h5py (and Keras) opens all the same. Its reader runs
# whatever else the file is, a reading of its own, never as a zip's reader; past the first
# 64 KiB its sniff reads 8 bytes an offset.
FOUND_BEHIND = frozenset((Format.HDF5,))
FOUND_BEHIND_SLOTS = (ReaderSlot("modelport.formats.hdf5"),)


def scan_with_reader(
    scan: ScanState,
    *,
    zip_only: bool = False,
    passing: frozenset[Format] = frozenset(),
    behind: ZipDirectory | None = None,
    slots: Sequence[ReaderSlot] = FILE_SLOTS,
) -> str | None:
    """The first reader of ``slots`` of a code-free format (or, inside a zip, any reader but
    those of ``passing``) that takes the file; its format's name, or None when none does.
    ``behind``: a zip behind other bytes, for its readers (Keras and numpy open it)."""
    head = bytes(scan.data[:HEAD_BYTES])
    probe = Probe(scan.path, len(scan.data), head, False, held=scan.data)  # as read
    if behind is not None:
        probe.zip = behind
    passing = passing | FOUND_BEHIND if zip_only else passing
    for reader in candidates(probe, slots):
        skip = (not zip_only and reader.format not in CODE_FREE) or reader.format in passing
        if skip or not reader.sniff(probe):
            continue
        if scan.format in ("unknown", "zip"):
            scan.format = reader.format.value
        if scan.read is not None and scan.read.format is reader.format:
            _judge_contents(scan, scan.read)
            return reader.format.value
        try:
            contents = reader.contents(probe)
        except EscapingReferenceError as exc:
            scan.add(Severity.HIGH, "reaches-outside", "", str(exc))
            return reader.format.value
        except ModelportError as exc:
            scan.error(f"damaged or not a {reader.format} file: {exc}", "")
            return reader.format.value
        _judge_contents(scan, contents)
        if contents.close is not None:
            contents.close()
        return reader.format.value
    return None


def _judge_contents(scan: ScanState, contents: Contents) -> None:
    # a .keras config was judged once already, as the zip member Keras reads on its own
    met = set(scan.findings)
    scan.findings.extend(f for f in content_checks.findings(contents) if f not in met)
    scan.data_files = tuple(str(n) for n in contents.details.get("external_data") or ())
    for document in _configs_of(contents):
        scan.scan_embedded(document, "")


def _configs_of(contents: Contents) -> list[Any]:
    """The model configurations a reader found (a Keras ``model_config``, parsed or as the
    JSON text an HDF5 attribute holds)."""
    found: list[Any] = []
    for source in (contents.details.get("model_config"), contents.metadata.get("model_config")):
        if isinstance(source, str):
            try:
                source = json.loads(source)
            except (ValueError, RecursionError):
                continue
        if isinstance(source, (dict, list)):
            found.append(source)
    return found
