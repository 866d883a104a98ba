"""Every reader modelport has, where each one lives, and the one way to decide a path's
format by content.

Single-file formats are listed in the order sniffers are tried.

Order matters only where one format is a special case of another's container: TorchScript
and ``torch.export`` archives are zips that also hold a ``data.pkl``, so they come before the
plain torch zip reader. The directory formats read their members through the file list,
so a shard of a Hugging Face folder is recognised exactly as the file alone would be.

A reader's module is imported the first time a probe reaches it (``ReaderSlot.reader``):
deciding that a file is safetensors imports two format modules, not twenty, which is most of
what a one-file command's start-up costs. ``Needs`` is the cheap test that comes first: a
zip-based reader is never imported for a file that is not a zip, nor a folder reader for a
file.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import NamedTuple

from modelport.formats.protocol import FormatReader, Probe
from modelport.formats.sniffing import extension_warnings, probe_model, unrecognised


class Needs(Enum):
    """What a probe must be before a reader's own sniffer is worth importing."""

    FILE = "file"
    ZIP = "zip"  # a file whose zip directory parses
    FOLDER = "folder"

    def admits(self, probe: Probe) -> bool:
        if self is Needs.FOLDER:
            return probe.is_dir
        if self is Needs.ZIP:
            return probe.zip is not None
        return not probe.is_dir


class ReaderSlot(NamedTuple):
    """One reader: the module that defines it, the name it has there, and what it needs.
    (A named tuple: defining a dataclass costs a one-file command more than its readers.)"""

    module: str
    needs: Needs = Needs.FILE
    attribute: str = "READER"

    def reader(self) -> FormatReader:
        """The reader itself, importing its module on first use."""
        found = getattr(importlib.import_module(self.module), self.attribute)
        if not isinstance(found, FormatReader):
            raise TypeError(f"{self.module}.{self.attribute} is not a FormatReader")
        return found


def _slot(name: str, needs: Needs = Needs.FILE, attribute: str = "READER") -> ReaderSlot:
    return ReaderSlot(f"modelport.formats.{name}", needs, attribute)


FILE_SLOTS: tuple[ReaderSlot, ...] = (
    _slot("adapters"),  # safetensors naming a LoRA (kohya, PEFT): details added
    _slot("safetensors"),
    _slot("torchscript", Needs.ZIP),  # zips with code/ or constants.pkl: before torch_zip
    _slot("torch_export", Needs.ZIP),  # zips with archive_format or models/*.json
    _slot("torch_zip", Needs.ZIP),
    _slot("torch_legacy"),  # pickle stream opening with torch's magic number, or 0.x tar
    _slot("npz", Needs.ZIP),  # zips whose members are all *.npy: after the torch archives
    _slot("npy"),
    _slot("gguf.reader"),
    _slot("ggml"),  # GGUF's predecessors: ggml, ggmf, ggjt, ggla magics
    _slot("tflite"),  # "TFL3" at bytes 4..8
    _slot("executorch_pte"),  # "ET12" at bytes 4..8
    _slot("tf_bundle"),  # a TensorFlow checkpoint .index: 00 00 first, a LevelDB table magic last
    _slot("keras", Needs.ZIP),  # zips with config.json + model.weights.h5
    _slot("hdf5"),  # signature at 0 or 512*2^k: late, a tar of an .h5 also has one at 512
    _slot("onnx"),  # strict protobuf sniff (ir_version, known ModelProto fields, then a graph)
    _slot("tf_savedmodel", attribute="FILE_READER"),  # saved_model.pb, keras_metadata.pb
    _slot("flax_msgpack"),  # a msgpack map holding an ext-1 array: no magic, before pickles
    _slot("pickle_file"),  # plain pickles and joblib: after every binary format with a magic
)

# Folders that are one model: read, hashed and inspected as a whole.
FOLDER_SLOTS: tuple[ReaderSlot, ...] = (
    _slot("dcp", Needs.FOLDER),  # a torch.distributed.checkpoint .metadata
    _slot("hf_dir", Needs.FOLDER),  # config.json + weights, or a *.index.json
    _slot("deepspeed_zero", Needs.FOLDER),  # ZeRO *_optim_states.pt: after hf_dir
    _slot("tf_savedmodel", Needs.FOLDER),  # a saved_model.pb
    _slot("tf_bundle", Needs.FOLDER, "FOLDER_READER"),  # TensorFlow checkpoints (<prefix>.index)
)
SLOTS: tuple[ReaderSlot, ...] = (*FILE_SLOTS, *FOLDER_SLOTS)
# Writers kept apart from their readers, so that reading a file imports no byte mover; each
# is its format's reader with ``write`` given, and comes before the readers in ``every_writer``.
WRITER_SLOTS: tuple[ReaderSlot, ...] = (_slot("safetensors_writer", attribute="WRITER"),)


def candidates(probe: Probe, slots: Sequence[ReaderSlot] = SLOTS) -> Iterator[FormatReader]:
    """The readers of ``slots`` that ``probe`` could be, in order, each imported only when
    the probe reaches it."""
    for slot in slots:
        if slot.needs.admits(probe):
            yield slot.reader()


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a folder that one of the folder readers takes as one model."""
    probe = Probe.of(path)
    return any(reader.sniff(probe) for reader in candidates(probe, FOLDER_SLOTS))


def every_reader(slots: Sequence[ReaderSlot] = SLOTS) -> tuple[FormatReader, ...]:
    """All of them, imported: for choosing a conversion's target or naming the formats an
    extension belongs to."""
    return tuple(slot.reader() for slot in slots)


def every_writer() -> tuple[FormatReader, ...]:
    """Every format modelport writes, as the reader that carries its ``write``: for choosing
    a conversion's target."""
    return tuple(r for r in every_reader((*WRITER_SLOTS, *SLOTS)) if r.write is not None)


def detect(
    path: Path | str, slots: Sequence[ReaderSlot] = SLOTS
) -> tuple[FormatReader, Probe, list[str]]:
    """The reader for ``path`` (the first of ``slots`` that takes it), the probe it was
    chosen on, and warnings about the name."""
    probe = probe_model(path)
    for reader in candidates(probe, slots):
        if reader.sniff(probe):
            return reader, probe, extension_warnings(probe.path, reader, every_reader)
    raise unrecognised(probe)
