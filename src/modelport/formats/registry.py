"""Every reader modelport has, and the one way to decide a path's format by content."""

from __future__ import annotations

from pathlib import Path

from modelport.formats import dcp, hf_dir, tf_bundle, tf_savedmodel
from modelport.formats.file_formats import FILE_READERS
from modelport.formats.protocol import FormatReader, Probe
from modelport.formats.sniffing import identify

# Folders that are one model: read, hashed and inspected as a whole.
FOLDER_READERS: tuple[FormatReader, ...] = (
    dcp.READER,  # directories holding a torch.distributed.checkpoint .metadata
    hf_dir.READER,  # directories with config.json + weights, or a *.index.json
    tf_savedmodel.READER,  # directories with a saved_model.pb
    tf_bundle.FOLDER_READER,  # directories holding TensorFlow checkpoints (<prefix>.index)
)
READERS: tuple[FormatReader, ...] = (*FILE_READERS, *FOLDER_READERS)


def detect(path: Path | str) -> tuple[FormatReader, Probe, list[str]]:
    """The reader for ``path``, the probe it was chosen on, and warnings about the name."""
    return identify(path, READERS)
