"""Keras v3 ``.keras`` archives: a zip of JSON config and an HDF5 weights file.

Layout (keras/src/saving/saving_lib.py, ``_save_model_to_fileobj``):

- ``metadata.json`` SHOULD be a JSON object (``keras_version``, ``date_saved``); Keras
  never reads it back, so a malformed one is only a warning here;
- ``config.json`` MUST be the serialized model: ``{"module", "class_name", "config",
  "registered_name", "build_config", "compile_config"}``; layers sit in ``config.layers``;
- ``model.weights.h5`` holds the variables in Keras 3's layout (``layers/<name>/vars/<i>``,
  ``optimizer/vars/<i>``, ``vars``); Keras 2.13-2.15 wrote ``_layer_checkpoint_dependencies``
  instead of ``layers``; ``weights_format="npz"`` writes ``model.weights.npz`` instead;
  the layers' variables are named as Keras names them (``dense/kernel``), from the layer
  classes and configs of ``config.json`` (``_keras_names``);
- ``assets/...`` MAY hold files a layer saved (vocabularies, lookup tables).

Keras writes every member STORED (``zipfile.ZipFile`` defaults), so the weights file is a
plain byte range of the archive: h5py opens it through a read-only window onto that range,
and contiguous datasets become zero-copy storages at ``member offset + dataset offset``. A
compressed weights member (re-zipped by another tool: deflate, bzip2 or LZMA, the methods
``zipfile`` reads) is inflated into memory (bounded) and its datasets are read through h5py.

Edge cases: Python's ``zipfile`` (what Keras uses) takes the LAST member of a duplicated
name, so this reader does too and warns; Lambda layers and serialized lambdas (code Keras
runs on load) and custom objects (``module`` outside keras) are reported.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from modelport import limits
from modelport.errors import CorruptFileError, ModelportError
from modelport.formats import _keras_config, _keras_names, hdf5
from modelport.formats._hdf5_attrs import AttributeReader
from modelport.formats._hdf5_raw import (
    FIRST_USERBLOCK,
    RawReader,
    Superblock,
    find_superblock,
    read_superblock,
)
from modelport.formats._zip import ZIPFILE_METHODS, ZipDirectory, ZipEntry
from modelport.formats.protocol import Contents, Format, FormatReader, Probe

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS_MEMBERS = ("model.weights.h5", "variables.h5")  # Keras 3 / early Keras 2 saving_lib
NPZ_WEIGHTS = "model.weights.npz"
ASSETS = "assets/"
MAX_LISTED_MEMBERS = 1000


def sniff(probe: Probe) -> bool:
    directory: ZipDirectory | None = probe.zipfile_zip  # Keras opens it with zipfile
    if directory is None:
        return False
    names = set(directory.names())
    if CONFIG in names and (names & {*WEIGHTS_MEMBERS, NPZ_WEIGHTS}):
        return True
    entry = directory.find(METADATA)
    if entry is None or entry.size > limits.MAX_KERAS_SNIFF_METADATA:
        return False
    try:
        return b'"keras_version"' in directory.read_member(
            entry, limits.MAX_KERAS_SNIFF_METADATA, ZIPFILE_METHODS
        )
    except ModelportError:
        return False


def _last(directory: ZipDirectory, name: str, warnings: list[str]) -> ZipEntry | None:
    """The member Keras would read: Python's zipfile keeps the last of duplicated names."""
    matches = [entry for entry in directory.entries if entry.name == name]
    if len(matches) > 1:
        warnings.append(
            f"archive holds {len(matches)} members named {name!r}; Keras reads the last one, "
            "and so does modelport (other zip readers may read the first)"
        )
    return matches[-1] if matches else None


def read(path: Path, probe: Probe) -> Contents:
    directory: ZipDirectory | None = probe.zipfile_zip
    if directory is None:
        raise CorruptFileError("not a readable zip archive", path=path)
    warnings = [f"zip member name escapes the archive: {name!r}" for name in directory.unsafe_names]
    metadata: dict[str, Any] = {}
    details: dict[str, Any] = {}
    entry = _last(directory, METADATA, warnings)
    if entry is not None:  # Keras never reads it back: a bad one is a warning, not an error
        try:
            parsed = _json_member(directory, entry, limits.MAX_KERAS_METADATA, path)
        except ModelportError as exc:
            parsed = exc
        if isinstance(parsed, dict):
            metadata = parsed
        else:
            warnings.append(f"{METADATA} is not a JSON object ({parsed}); ignored")
    entry = _last(directory, CONFIG, warnings)
    if entry is not None:
        config = _json_member(directory, entry, limits.MAX_KERAS_CONFIG_BYTES, path)
        facts = _keras_config.analyse(config)
        details["model_config"] = config
        details.update(facts.details())
        warnings.extend(facts.warnings)
    else:
        warnings.append(f"archive has no {CONFIG}: the model's architecture is unknown")
    assets = [name for name in directory.names() if name.startswith(ASSETS)]
    if assets:
        details["assets"] = assets[:MAX_LISTED_MEMBERS]
    weights = next(
        (e for e in (_last(directory, n, warnings) for n in WEIGHTS_MEMBERS) if e is not None),
        None,
    )
    if weights is None:
        npz = directory.find(NPZ_WEIGHTS) is not None
        warnings.append(
            f"weights are in {NPZ_WEIGHTS}, which this reader does not open yet"
            if npz
            else "archive holds no model.weights.h5: no tensors"
        )
        return Contents(Format.KERAS, {}, metadata=metadata, details=details, warnings=warnings)
    contents = _read_weights(directory, weights, path, details.get("model_config"))
    weights_details = dict(contents.details)
    details["weights_member"] = weights.name
    details["weights_stored"] = weights.is_stored
    details["weights_layout"] = weights_details.pop("layout", "plain")
    details.update({k: v for k, v in weights_details.items() if k not in details})
    if contents.metadata:
        details["weights_attributes"] = contents.metadata
    contents.metadata = metadata
    contents.details = details
    contents.warnings = [*warnings, *contents.warnings]
    return contents


def _json_member(directory: ZipDirectory, entry: ZipEntry, limit: int, path: Path) -> Any:
    try:
        return _keras_config.parse_json(
            directory.read_member(entry, limit, ZIPFILE_METHODS), entry.name
        )
    except CorruptFileError as exc:
        raise CorruptFileError(str(exc), path=path) from None


def _read_weights(
    directory: ZipDirectory, entry: ZipEntry, path: Path, model_config: Any
) -> Contents:
    """The weights member's tensors, under the names Keras gives its variables."""
    h5py = hdf5.import_h5py()
    if entry.is_stored:
        if entry.size != entry.compressed_size:
            raise CorruptFileError(
                f"stored member {entry.name!r} declares {entry.size} bytes but holds "
                f"{entry.compressed_size}",
                path=path,
            )
        start, size = entry.data_offset, entry.size
        raw = hdf5.file_reader(path, start)

        def open_window() -> tuple[Any, list[Any]]:
            window = MemberWindow(path, start, size)
            try:
                return h5py.File(window, "r"), [window]
            except BaseException:
                window.close()
                raise

        source = hdf5.H5Source(open_window)
        place = hdf5.Place(path, start, size)
    else:
        # Inflated once and held while tensors may still be read through h5py.
        data = directory.read_member(entry, limits.MAX_KERAS_INFLATED_WEIGHTS, ZIPFILE_METHODS)

        def raw(offset: int, length: int) -> bytes:
            return data[offset : offset + length]

        def open_inflated() -> tuple[Any, list[Any]]:
            buffer = io.BytesIO(data)
            return h5py.File(buffer, "r"), [buffer]

        source = hdf5.H5Source(open_inflated)
        place = hdf5.Place(path, 0, entry.size, flat=False)
    superblock = _superblock(raw, entry, path)
    guard = superblock.heap_guard(raw, entry.size)
    what = f"reading {entry.name}"
    contents = hdf5.read_contents(source, place, guard, Format.KERAS, what)
    attrs = AttributeReader(h5py, guard)
    translate = hdf5.h5_errors(what, path)
    _keras_names.name_variables(contents, source.file, attrs, translate, model_config)
    return contents


def _superblock(raw: RawReader, entry: ZipEntry, path: Path) -> Superblock:
    head = raw(0, min(entry.size, FIRST_USERBLOCK + 128))
    offset = find_superblock(head, len(head))
    if offset is None:
        raise CorruptFileError(f"{entry.name} is not an HDF5 file", path=path)
    return read_superblock(head[offset:], offset, entry.size, path)


class MemberWindow(io.RawIOBase):
    """A read-only file object over bytes ``[start, start + size)`` of a file.

    h5py opens it like a file (its file-object driver seeks and reads through it), so the
    archive member is read in place, never extracted.
    """

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._start = start
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        origin = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}
        if whence not in origin:
            raise ValueError(f"invalid whence {whence}")
        position = origin[whence] + offset
        if position < 0:
            raise ValueError("negative seek position")
        self._position = position
        return position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._size - self._position))
        if count == 0:
            return 0
        self._file.seek(self._start + self._position)
        got = self._file.readinto(view[:count])
        self._position += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


READER = FormatReader(Format.KERAS, sniff, read, (".keras",))
