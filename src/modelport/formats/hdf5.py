"""HDF5 files: Keras 2 ``.h5`` models and weights, Keras 3 ``.weights.h5``, ``tf_model.h5``.

Layout (HDF5 File Format Specification 3.0):

- the superblock MUST start with ``\\x89HDF\\r\\n\\x1a\\n`` at byte 0 or, after a user block,
  at 512, 1024, 2048, ... (the offsets the library searches); its end-of-file address MUST
  NOT pass the end of the file (a shorter file is a truncated download); ``_hdf5_raw``
  parses it before h5py opens anything;
- everything else (object headers, B-trees, heaps, filters) is parsed by h5py, the
  reference library, an optional extra imported inside functions only.

What modelport makes of it:

- every dataset reached through hard links becomes a ``TensorRef`` named by its path
  without the leading ``/`` (``model_weights/dense/dense/kernel:0``); the walk is iterative,
  bounded in objects and depth, and visits each group once (hard-link cycles end there);
- a contiguous, unfiltered dataset whose type is exactly the little-endian numpy type is a
  zero-copy ``Storage`` at ``dset.id.get_offset()`` (checked against the file size); chunked,
  compressed, compact, big-endian or not-yet-allocated datasets get a ``reader`` that reads
  through h5py, which decodes the filter pipeline (``_hdf5_source``); a chunked dataset
  whose pipeline holds a filter the library lacks is read chunk by chunk when modelport
  undoes every filter itself (blosc, with deflate, shuffle, fletcher32: ``_hdf5_chunks``),
  else listed with a note and a warning, and reading it raises ``UnsupportedVersionError``
  naming the filter;
- soft links are reported, never followed (their target is reached by its hard link);
  external links, virtual datasets and datasets with external raw storage name other files:
  they are reported and never opened or read;
- float16/32/64, (u)int8-64, bool (h5py's enum), complex64/128 and bfloat16 (a 2-byte
  opaque type: Keras 3 tags it with a ``dtype="bfloat16"`` attribute; an untagged one is
  read as bfloat16 with a warning) are tensors, when their type equals the standard one;
  so are 8-64-bit bitfields (PyTables' bool), as the unsigned ints h5py reads them as;
  strings, variable-length, compound, reference, malformed and null-dataspace datasets are
  listed in ``details["skipped"]``;
- root attributes become metadata (bytes decoded); a Keras ``model_config`` is parsed into
  details, and ``details["layout"]`` names the writer: ``keras2-full-model``,
  ``keras2-weights``, ``keras3-weights``, ``hf-tf`` or ``plain``; attributes are read
  defensively (``_hdf5_attrs``: standard types only, variable-length strings only after
  ``_hdf5_raw`` checked their global heap, whose malformed forms hang the library).

Edge cases: the HDF5 C library is not hardened against hostile files; modelport checks the
superblock, types and global heaps itself before the library converts anything, but a
malformed B-tree or object header is still parsed by the library, not by modelport.

The h5py file stays open while the ``ModelFile`` does (``Contents.close`` closes it; a
finalizer closes it at exit). Readers use that handle, or reopen the file for one read
after it was closed, so tensors stay readable after the model file is closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError, TruncatedFileError
from modelport.formats import _keras_names
from modelport.formats._hdf5_attrs import AttributeReader, layout_details
from modelport.formats._hdf5_chunks import chunk_reader, own_pipeline
from modelport.formats._hdf5_raw import HeapGuard, RawReader, find_superblock, read_superblock
from modelport.formats._hdf5_source import H5Source as H5Source  # the .keras reader's too
from modelport.formats._hdf5_source import (
    dataset_reader,
    numeric_type,
    refusing_reader,
    undecodable_filters,
)
from modelport.formats._hdf5_source import h5_errors as h5_errors
from modelport.formats._hdf5_source import import_h5py as import_h5py
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.tensors import Storage, TensorRef

if TYPE_CHECKING:
    import numpy as np

MAX_REPORTED = 200  # entries per list in details
BFLOAT16_ATTR = "bfloat16"
GUESSED_BFLOAT16 = "untagged 2-byte opaque type read as bfloat16"


# --------------------------------------------------------------------------- sniff / superblock


def sniff(probe: Probe) -> bool:
    return not probe.is_dir and find_superblock(probe.head, probe.size, probe.path) is not None


# --------------------------------------------------------------------------- the walk


@dataclass
class Walk:
    """Datasets found in one HDF5 file, and what was left out or pointed elsewhere."""

    tensors: dict[str, TensorRef] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    soft_links: list[dict[str, str]] = field(default_factory=list)
    external: list[dict[str, str]] = field(default_factory=list)
    zero_copy: int = 0
    through_h5py: int = 0
    decoded_here: int = 0  # chunks h5py cannot decode (blosc), undone by modelport
    guessed_bfloat16: int = 0
    compression: dict[str, int] = field(default_factory=dict)
    undecodable: list[dict[str, str]] = field(default_factory=list)  # filters h5py lacks

    def details(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "datasets": len(self.tensors) + len(self.skipped),
            "zero_copy": self.zero_copy,
            "read_through_h5py": self.through_h5py,
        }
        if self.decoded_here:
            found["decoded_by_modelport"] = self.decoded_here
        for key, items in (
            ("skipped", self.skipped),
            ("soft_links", self.soft_links),
            ("external_references", self.external),
            ("undecodable", self.undecodable),
        ):
            if items:
                found[key] = items[:MAX_REPORTED]
                if len(items) > MAX_REPORTED:
                    found[f"{key}_count"] = len(items)
        if self.compression:
            found["compression"] = self.compression
        return found

    def warnings(self) -> list[str]:
        notes = [
            f"{item['kind']} {item['name']!r} points outside this file ({item['target']}); "
            "modelport did not follow it"
            for item in self.external[:MAX_REPORTED]
        ]
        if len(self.external) > MAX_REPORTED:
            notes.append(f"{len(self.external)} references to other files in all")
        if self.undecodable:
            filters = sorted({item["filters"] for item in self.undecodable})
            names = ", ".join(repr(item["name"]) for item in self.undecodable[:5])
            more = f" and {len(self.undecodable) - 5} more" if len(self.undecodable) > 5 else ""
            notes.append(
                f"{len(self.undecodable)} dataset(s) compressed with {'; '.join(filters)}, "
                f"a filter this HDF5 library lacks, are listed but not readable: {names}{more}"
            )
        if self.guessed_bfloat16:
            notes.append(
                f"{self.guessed_bfloat16} dataset(s) of an untagged 2-byte opaque type read as "
                "bfloat16 (how h5py stores ml_dtypes.bfloat16, e.g. Keras' legacy .h5 writer)"
            )
        return notes


@dataclass(frozen=True)
class Place:
    """Where the HDF5 bytes lie: ``path`` from ``base`` for ``size`` bytes (zero-copy if flat)."""

    path: Path
    base: int
    size: int
    flat: bool = True  # False when the HDF5 bytes are not stored plainly (deflated member)


def walk(handle: Any, source: H5Source, place: Place, attrs: AttributeReader) -> Walk:
    """Every dataset reached by hard links, as ``TensorRef``s; nothing outside is opened.

    Pre-order, links in name order (h5py's ``visititems`` order); each group is entered once.
    """
    h5py = attrs.h5py
    found = Walk()
    storages: dict[int, TensorRef | None] = {}
    visited = {int(h5py.h5o.get_info(handle.id).addr)}
    # (path of the link, group holding it, link name or None to list the group, depth)
    stack: list[tuple[str, Any, str | None, int]] = [("", handle, None, 0)]
    links = 0
    while stack:
        full, group, name, depth = stack.pop()
        if name is None:
            if depth > limits.MAX_DEPTH:
                raise LimitExceededError("HDF5 group nesting depth", limits.MAX_DEPTH, depth)
            names = list(group)
            links += len(names)
            if links > limits.MAX_HDF5_OBJECTS:
                raise LimitExceededError("HDF5 objects", limits.MAX_HDF5_OBJECTS, links)
            stack.extend((f"{full}{n}", group, n, depth) for n in reversed(names))
            continue
        followed = _follow(h5py, group, name, full, found)
        if followed is None:
            continue
        item, address = followed
        if isinstance(item, h5py.Group):
            if address not in visited:
                visited.add(address)
                stack.append((f"{full}/", item, None, depth + 1))
        elif isinstance(item, h5py.Dataset):
            if address not in storages:
                storages[address] = _dataset(attrs, item, full, source, place, found)
            known = storages[address]
            if known is not None:
                found.tensors[full] = known
    return found


def _follow(h5py: Any, group: Any, name: str, full: str, found: Walk) -> tuple[Any, int] | None:
    """The object behind a hard link and its address; other links are recorded, not
    followed (an external link would open another file)."""
    if "/" in name or name in (".", ""):
        found.skipped.append({"name": full, "reason": "link name holds a path"})
        return None
    encoded = name.encode("utf-8", "surrogateescape")
    info = group.id.links.get_info(encoded)
    if info.type == h5py.h5l.TYPE_SOFT:
        link = group.get(name, getlink=True)
        found.soft_links.append({"name": full, "target": str(link.path)})
        return None
    if info.type == h5py.h5l.TYPE_EXTERNAL:
        link = group.get(name, getlink=True)
        target = f"{link.filename}:{link.path}"
        found.external.append({"kind": "external link", "name": full, "target": target})
        return None
    if info.type != h5py.h5l.TYPE_HARD:
        found.skipped.append({"name": full, "reason": "user-defined link"})
        return None
    opened = h5py.h5o.open(group.id, encoded)
    if isinstance(opened, h5py.h5g.GroupID):
        return h5py.Group(opened), int(info.u)
    if isinstance(opened, h5py.h5d.DatasetID):
        return h5py.Dataset(opened), int(info.u)
    return None  # a committed datatype


def _dataset(
    attrs: AttributeReader, dset: Any, name: str, source: H5Source, place: Place, found: Walk
) -> TensorRef | None:
    import numpy as np  # h5py has loaded it already

    h5py = attrs.h5py
    plist = dset.id.get_create_plist()
    if dset.is_virtual:
        targets = ", ".join(f"{s.file_name}:{s.dset_name}" for s in dset.virtual_sources()[:4])
        found.external.append({"kind": "virtual dataset", "name": name, "target": targets})
        return None
    if plist.get_external_count() > 0:
        target = plist.get_external(0)[0].decode("utf-8", "replace")
        found.external.append({"kind": "external storage of", "name": name, "target": target})
        return None
    shape = dset.shape
    if shape is None:
        found.skipped.append({"name": name, "reason": "null dataspace (no data)"})
        return None
    kind = _element_type(attrs, dset)
    if isinstance(kind, str):
        found.skipped.append({"name": name, "reason": kind})
        return None
    dtype_name, numpy_dtype, exact, note = kind
    if note:
        found.guessed_bfloat16 += 1
    nbytes = int(np.prod(shape, dtype=np.uint64)) * numpy_dtype.itemsize
    for index in range(plist.get_nfilters()):
        filter_name = plist.get_filter(index)[3].decode("ascii", "replace") or "unknown"
        found.compression[filter_name] = found.compression.get(filter_name, 0) + 1
    missing = undecodable_filters(h5py, plist)
    pipeline = own_pipeline(h5py, plist) if missing and nbytes else None
    if pipeline is not None:
        found.decoded_here += 1
        stored = numpy_dtype if exact else numpy_dtype.newbyteorder(">")
        reader = chunk_reader(source, name, tuple(shape), stored, dtype_name, pipeline, place.path)
        storage = Storage(place.path, 0, nbytes, key=name, reader=reader)
        note = "; ".join(filter(None, [note, f"{', '.join(missing)} decoded by modelport"]))
        return TensorRef(dtype_name, tuple(shape), storage, note=note)
    if missing and nbytes:
        return _undecodable(name, tuple(shape), dtype_name, nbytes, missing, place, found)
    contiguous = plist.get_layout() == h5py.h5d.CONTIGUOUS and plist.get_nfilters() == 0 and exact
    if nbytes == 0:
        found.zero_copy += 1
        return TensorRef(dtype_name, tuple(shape), Storage(place.path, 0, 0, key=name), note=note)
    if contiguous and place.flat and dset.id.get_storage_size() == nbytes:
        offset = dset.id.get_offset()
        if offset is not None and offset >= 0:
            if offset + nbytes > place.size:
                raise TruncatedFileError(
                    f"dataset {name!r} ends at byte {place.base + offset + nbytes}, past the end "
                    f"of the HDF5 data ({place.base + place.size} bytes; truncated download?)",
                    expected=place.base + offset + nbytes,
                    actual=place.base + place.size,
                    path=place.path,
                )
            found.zero_copy += 1
            storage = Storage(place.path, place.base + offset, nbytes, key=name)
            return TensorRef(dtype_name, tuple(shape), storage, note=note)
    found.through_h5py += 1
    reader = dataset_reader(source, name, tuple(shape), numpy_dtype, dtype_name, nbytes, place.path)
    storage = Storage(place.path, 0, nbytes, key=name, reader=reader)
    note = "; ".join(filter(None, [note, "read through h5py"]))
    return TensorRef(dtype_name, tuple(shape), storage, note=note)


def _undecodable(
    name: str,
    shape: tuple[int, ...],
    dtype_name: str,
    nbytes: int,
    filters: list[str],
    place: Place,
    found: Walk,
) -> TensorRef:
    """A dataset listed as it is, whose reading raises an error naming its filters."""
    found.undecodable.append({"name": name, "filters": ", ".join(filters)})
    storage = Storage(
        place.path, 0, nbytes, key=name, reader=refusing_reader(name, filters, place.path)
    )
    note = f"compressed with {', '.join(filters)}, which this HDF5 library lacks: not readable"
    return TensorRef(dtype_name, shape, storage, note=note)


ElementType: TypeAlias = "tuple[str, np.dtype[Any], bool, str]"  # name, LE dtype, exact, note


def _element_type(attrs: AttributeReader, dset: Any) -> ElementType | str:
    """(dtype name, little-endian numpy dtype, stored exactly so, note) or why it is no tensor.

    Only types equal to a standard HDF5 type (either byte order) are tensors: the library's
    conversions of malformed type messages are not safe to run (they can crash the process).
    bfloat16 has no HDF5 type: h5py stores ``ml_dtypes.bfloat16`` as a 2-byte opaque type with
    an empty tag; Keras 3 adds ``dtype="bfloat16"`` (``.weights.h5``), its legacy ``.h5``
    writer does not, so an untagged 2-byte opaque type is read as bfloat16 with a note.
    """
    import numpy as np  # h5py has loaded it already

    h5py = attrs.h5py
    file_type = dset.id.get_type()
    if file_type.get_class() == h5py.h5t.OPAQUE and file_type.get_size() == 2:
        declared = attrs.get(dset, "dtype", missing=None)
        if declared == BFLOAT16_ATTR:
            return "bfloat16", np.dtype(np.uint16), True, ""
        if declared is None and file_type.get_tag() == b"":
            return "bfloat16", np.dtype(np.uint16), True, GUESSED_BFLOAT16
        return "opaque data"
    kind = numeric_type(h5py, file_type)
    if isinstance(kind, str):
        return kind
    stored, exact = kind
    if stored.kind == "b":
        return "bool", stored, exact, ""
    names = {"f": "float", "i": "int", "u": "uint", "c": "complex"}
    return f"{names[stored.kind]}{stored.itemsize * 8}", stored.newbyteorder("<"), exact, ""


# --------------------------------------------------------------------------- read


def read(path: Path, probe: Probe) -> Contents:
    offset = find_superblock(probe.head, probe.size, path)
    if offset is None:
        raise CorruptFileError("no HDF5 superblock signature", path=path)
    with open(path, "rb") as handle:
        handle.seek(offset)
        block = handle.read(128)
    superblock = read_superblock(block, offset, probe.size, path)
    h5py = import_h5py()
    source = H5Source(lambda: (h5py.File(path, "r"), []))
    place = Place(path, 0, probe.size)
    guard = superblock.heap_guard(file_reader(path), probe.size)
    what = "reading the HDF5 file"
    contents = read_contents(source, place, guard, Format.HDF5, what)
    attrs = AttributeReader(h5py, guard)
    _keras_names.name_variables(contents, source.file, attrs, h5_errors(what, path))
    contents.details["superblock_version"] = superblock.version
    if offset:
        contents.details["userblock_bytes"] = offset
    return contents


def file_reader(path: Path, start: int = 0) -> RawReader:
    """Reads ``length`` bytes at ``offset`` of the HDF5 data beginning at ``start`` of ``path``."""

    def read_raw(offset: int, length: int) -> bytes:
        with open(path, "rb") as handle:
            handle.seek(start + offset)
            return handle.read(length)

    return read_raw


def read_contents(
    source: H5Source, place: Place, guard: HeapGuard | None, fmt: Format, what: str
) -> Contents:
    """Open ``source`` and turn it into ``Contents`` (shared with the ``.keras`` reader)."""
    attrs = AttributeReader(import_h5py(), guard)
    translate = h5_errors(what, place.path)
    try:
        handle = source.get()
        found = walk(handle, source, place, attrs)
        warnings: list[str] = []
        metadata = attrs.root_metadata(handle, warnings)
        details, keras_warnings = layout_details(attrs, handle, metadata, list(found.tensors))
    except Exception as exc:
        source.close()
        if isinstance(exc, (MemoryError, RecursionError)):
            raise CorruptFileError(f"HDF5 structure too large to read: {exc}") from None
        raise translate(exc) from None
    details.update(found.details())
    return Contents(
        fmt,
        dict(found.tensors),
        metadata=metadata,
        details=details,
        warnings=[*keras_warnings, *found.warnings(), *warnings],
        close=source.close,
    )


READER = FormatReader(Format.HDF5, sniff, read, (".h5", ".hdf5", ".hdf", ".he5"))
