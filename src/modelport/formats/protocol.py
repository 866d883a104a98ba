"""The one small protocol every format module implements.

A format module exposes ``READER = FormatReader(...)``: a ``sniff`` that decides from a
``Probe`` (the first bytes, the size, a zip directory if the file is a zip) and a ``read``
that returns ``Contents``: the file's object tree with ``TensorRef`` leaves, plus metadata.
``read`` parses headers only; tensor bytes stay on disk until someone asks for them.

Formats modelport can write also give ``write``: it receives an unbuffered, seekable file
and a ``WritePlan`` (the tensors in order, with dtypes already decided, and string
metadata) and streams each tensor with ``streaming.write_tensor``. ``holds`` says which
dtypes the format can store, so impossible conversions are refused before writing. A
writer whose imports reading does not need lives in a module of its own, as a copy of its
reader with ``write`` given (``registry.WRITER_SLOTS``, found by ``every_writer``).

``Probe`` and ``Contents`` are plain classes and ``FormatReader`` a named tuple, not
dataclasses: every command on one file defines them, and defining a dataclass costs more
than reading a small file's header.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, NamedTuple

from modelport.errors import FileError, ModelportError, NotAModelError
from modelport.formats._zip import EOCD_SIGNATURE, LOCAL_SIGNATURE, ZipDirectory

if TYPE_CHECKING:  # a reader's module never needs the plan of a write: only writers import it
    from modelport.transfer.write_plan import WritePlan

HEAD_BYTES = 64 * 1024


class Format(str, Enum):
    """What a file is, by content. Values are the names ``inspect --json`` reports."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch-export"
    PICKLE = "pickle"
    NPY = "npy"
    NPZ = "npz"
    ONNX = "onnx"
    GGUF = "gguf"
    GGML = "ggml"
    HDF5 = "hdf5"
    KERAS = "keras"
    TFLITE = "tflite"
    TF_CHECKPOINT = "tf-checkpoint"
    TF_SAVEDMODEL = "tf-savedmodel"
    FLAX_MSGPACK = "flax-msgpack"
    EXECUTORCH_PTE = "executorch-pte"
    HF_DIR = "hf-dir"
    DCP = "dcp"
    DEEPSPEED_ZERO = "deepspeed-zero"

    def __str__(self) -> str:
        return self.value


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def refuse_special_file(path: Path) -> None:
    """Only regular files are read: a FIFO or a device never ends (or blocks forever), so it
    gets a typed error at once instead of a hang."""
    mode = path.stat().st_mode
    for test, kind in _SPECIAL_FILES:
        if test(mode):
            raise NotAModelError(
                f"a {kind}, not a file: modelport reads regular files and directories",
                kind="special-file",
                path=path,
            )


class Probe:
    """What sniffers look at: path, size and first bytes, plus the zip directory on demand.
    ``held`` is a view of the whole file where its maker holds one (the scanner does): the
    zip directory is parsed there rather than from the file opened again."""

    def __init__(
        self, path: Path, size: int, head: bytes, is_dir: bool, held: memoryview | None = None
    ) -> None:
        self.path: Final = path
        self.size: Final = size
        self.head: Final = head
        self.is_dir: Final = is_dir
        self.held: Final = held

    def __repr__(self) -> str:
        return f"Probe({str(self.path)!r}, size={self.size}, is_dir={self.is_dir})"

    @classmethod
    def of(cls, path: Path) -> Probe:
        if path.is_dir():
            return cls(path, 0, b"", True)
        refuse_special_file(path)
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
        return cls(path, path.stat().st_size, head, False)

    @cached_property
    def zip(self) -> ZipDirectory | None:
        """The parsed zip directory, or None if not a zip."""
        if self.is_dir or not self.head.startswith((LOCAL_SIGNATURE, EOCD_SIGNATURE)):
            return None
        try:
            return ZipDirectory.read(self.path, held=self.held)
        except ModelportError:
            return None

    @cached_property
    def zipfile_zip(self) -> ZipDirectory | None:
        """The zip directory as Python's zipfile reads it (numpy.load, Keras), which can
        differ from torch's (``formats/_zip_ends``), or None if not a zip it reads."""
        if self.zip is None:
            return None
        try:
            return self.zip.zipfile_view()
        except ModelportError:
            return None

    def zip_directory(self) -> ZipDirectory:
        """The zip directory, for a reader whose sniffer took the file as a zip: the parsed
        one, or the precise reason it cannot be read."""
        return self.zip if self.zip is not None else ZipDirectory.read(self.path, held=self.held)


class Contents:
    """A file as read: its object tree (``TensorRef`` leaves), metadata and format details.

    ``tree`` is what loading the file would give, with tensors as references: a dict for
    state_dicts and checkpoints, a module record for a pickled ``nn.Module``. ``metadata`` is
    the format's own key/value metadata; ``details`` holds other facts worth showing (ONNX
    opset and graph summary, GGUF version, zip prefix); ``code`` is TorchScript source text;
    ``close`` releases handles a reader keeps open (HDF5).
    """

    def __init__(
        self,
        format: Format,
        tree: Any,
        metadata: dict[str, Any] | None = None,
        details: dict[str, Any] | None = None,
        code: dict[str, str] | None = None,
        warnings: list[str] | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.format = format
        self.tree = tree
        self.metadata: dict[str, Any] = {} if metadata is None else metadata
        self.details: dict[str, Any] = {} if details is None else details
        self.code: dict[str, str] = {} if code is None else code
        self.warnings: list[str] = [] if warnings is None else warnings
        self.close = close


class FormatReader(NamedTuple):
    """One format: how to recognise it, read it and (optionally) write it. ``extensions``
    only feed the warning when a file's name contradicts its content, and choose a
    conversion's target from its output name; they never decide what a file is."""

    format: Format
    sniff: Callable[[Probe], bool]
    read: Callable[[Path, Probe], Contents]
    extensions: tuple[str, ...] = ()
    write: Callable[[BinaryIO, WritePlan], None] | None = None
    holds: Callable[[str], bool] | None = None
    shares_storage: bool = False  # can two names point at one stored tensor (torch zip)?
    records_aliases: bool = False  # does its reader restore ``alias -> kept`` metadata?

    def contents(self, probe: Probe) -> Contents:
        """``read`` on the probed path; an error from deep inside the format names the file."""
        try:
            return self.read(probe.path, probe)
        except FileError as exc:
            exc.locate(probe.path)
            raise
