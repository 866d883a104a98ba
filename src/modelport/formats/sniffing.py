"""Which reader of a given list takes a path, decided by its bytes; and what a path is when
it is not a model.

The extension never decides. It only produces a warning when it names another format than
the content. Before the format sniffers run, the common non-models are recognised by name:
an empty file, a Git LFS pointer (the weights were never pulled), an HTML page (a login or
error page saved under the model's name).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from modelport.errors import (
    ModelFileNotFoundError,
    ModelportError,
    NotAModelError,
    UnknownFormatError,
)
from modelport.formats._zip import LOCAL_SIGNATURE, ZipDirectory
from modelport.formats.protocol import FormatReader, Probe

LFS_PREFIX = b"version https://git-lfs.github.com/spec/"
_LFS_OID = re.compile(rb"^oid sha256:([0-9a-f]{64})$", re.M)
_LFS_SIZE = re.compile(rb"^size (\d+)$", re.M)


def identify(
    path: Path | str, readers: Sequence[FormatReader]
) -> tuple[FormatReader, Probe, list[str]]:
    """The first of ``readers`` that takes ``path``, the probe it was chosen on, and
    warnings about the name."""
    probe = probe_model(path)
    for reader in readers:
        if reader.sniff(probe):
            return reader, probe, extension_warnings(probe.path, reader, lambda: readers)
    raise unrecognised(probe)


def probe_model(path: Path | str) -> Probe:
    """The probe of an existing path that is not one of the common non-models."""
    path = Path(path)
    if not path.exists():
        raise ModelFileNotFoundError(path)
    probe = Probe.of(path)
    if not probe.is_dir:
        reject_non_models(probe)
    return probe


def unrecognised(probe: Probe) -> ModelportError:
    """The error for a probe no reader took: a zip's precise damage when it is one."""
    if probe.head.startswith(LOCAL_SIGNATURE):
        ZipDirectory.read(probe.path)  # raises the precise reason a zip is unreadable
    if probe.is_dir:
        return UnknownFormatError(
            "directory holds no model modelport recognises (expected config.json with weights, "
            "a *.index.json, a torch.distributed.checkpoint .metadata, a saved_model.pb or a "
            "TensorFlow checkpoint's .index)",
            path=probe.path,
        )
    return UnknownFormatError(
        f"unrecognised content (first bytes {probe.head[:16].hex(' ')}); "
        "modelport reads safetensors, torch, pickle, numpy, ONNX, GGUF and GGML, HDF5, Keras, "
        "TFLite, ExecuTorch, TensorFlow checkpoints and SavedModels, and Flax msgpack",
        path=probe.path,
    )


def reject_non_models(probe: Probe) -> None:
    """Raise ``NotAModelError`` for an empty file, a Git LFS pointer or an HTML page."""
    head = probe.head
    if probe.size == 0:
        raise NotAModelError("empty file (0 bytes)", kind="empty", path=probe.path)
    if head.startswith(LFS_PREFIX):
        oid = _LFS_OID.search(head)
        size = _LFS_SIZE.search(head)
        described = f"{int(size.group(1)):,}-byte file" if size else "file"
        oid_text = f" (oid sha256:{oid.group(1).decode()})" if oid else ""
        raise NotAModelError(
            f"Git LFS pointer to a {described}{oid_text}, not the file itself: "
            "run `git lfs pull` in its repository to fetch the weights",
            kind="git-lfs-pointer",
            path=probe.path,
        )
    start = head[:512].lstrip().lower()
    if (
        start.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml"))
        or b"<html" in start[:256]
    ):
        raise NotAModelError(
            "an HTML page, not a model: the download probably saved an error or login page",
            kind="html",
            path=probe.path,
        )


def extension_warnings(
    path: Path, reader: FormatReader, every_reader: Callable[[], Sequence[FormatReader]]
) -> list[str]:
    """A warning when the name's extension belongs to another format than the content's.
    ``every_reader`` is asked only then, so a well-named file imports no other reader."""
    suffix = path.suffix.lower()
    if not suffix or path.is_dir() or suffix in reader.extensions:
        return []
    owners = [r.format.value for r in every_reader() if suffix in r.extensions]
    if not owners:
        return []
    return [
        f"extension {suffix} suggests {' or '.join(owners)}, but the content is {reader.format}"
    ]
