"""HDF5 attributes read defensively, and what Keras' attributes say about a file's writer.

The HDF5 library converts whatever type an attribute message declares, and some malformed
declarations crash it or loop forever. So only these are read: fixed-length strings with a
valid charset and padding; variable-length strings whose global heap collection passes
``_hdf5_raw.HeapGuard``; and types equal to a standard numeric type. Anything else is
described (``{"hdf5_type": ..., "shape": ...}``), never converted.

Keras layouts recognised (``details["layout"]``):

- ``keras2-full-model``: root ``model_config`` (JSON text) and a ``model_weights`` group
  with ``layer_names``; each layer group lists ``weight_names``;
- ``keras2-weights``: ``layer_names`` on the root (``model.save_weights('w.h5')``);
- ``hf-tf``: the same, written by transformers (``tf_model.h5``): weight names under a
  ``tf_<model>`` scope, or sharded files whose ``layer_names`` are weight paths;
- ``keras3-weights``: datasets named ``.../vars/<index>`` (``.weights.h5``, ``.keras``);
- ``plain``: anything else.

Keras splits list attributes larger than 64 KiB into ``name0``, ``name1``, ...
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError
from modelport.formats import _keras_config
from modelport.formats._hdf5_raw import HeapGuard

if TYPE_CHECKING:
    import numpy as np

MAX_ATTR_ELEMENTS = 4096  # larger numeric attributes are summarised
KERAS3_VAR = re.compile(r"(^|/)vars/\d+$")
_MISSING = object()


@functools.cache
def numeric_types() -> tuple[np.dtype[Any], ...]:
    """The standard numeric types, each byte order, and bool (numpy loads with the file's h5py)."""
    import numpy as np

    codes = ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "c8", "c16")
    return (*(np.dtype(order + code) for code in codes for order in "<>"), np.dtype(bool))


def standard_type(h5py: Any, file_type: Any) -> tuple[np.dtype[Any], bool] | str:
    """(numpy dtype, stored little-endian) when ``file_type`` equals a standard numeric
    type (h5py's bool enum and complex compound included); otherwise why it is not one."""
    names = {
        h5py.h5t.STRING: "string",
        h5py.h5t.VLEN: "variable-length",
        h5py.h5t.REFERENCE: "object reference",
        h5py.h5t.ARRAY: "array-typed elements",
        h5py.h5t.OPAQUE: "opaque data",
        h5py.h5t.BITFIELD: "bitfield",
        h5py.h5t.TIME: "time",
    }
    type_class = file_type.get_class()
    if type_class in names:
        return str(names[type_class])
    size = file_type.get_size()
    for candidate in numeric_types():
        if candidate.itemsize == size and file_type.equal(h5py.h5t.py_create(candidate)):
            return candidate, candidate.byteorder in ("<", "|", "=")
    # numpy keeps no byte order for one byte, so ">i1" above is little-endian to the library;
    # PyTables writes its big-endian arrays' int8 as STD_I8BE, the same bytes
    import numpy as np  # h5py has loaded it already

    for code, big_endian in (("i1", h5py.h5t.STD_I8BE), ("u1", h5py.h5t.STD_U8BE)):
        if file_type.equal(big_endian):
            return np.dtype(code), True
    return "compound" if type_class == h5py.h5t.COMPOUND else "non-standard numeric type"


def _text(value: Any) -> Any:
    import numpy as np

    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


class AttributeReader:
    """Reads attributes of one open file, under the checks described above."""

    def __init__(self, h5py: Any, guard: HeapGuard | None) -> None:
        self.h5py = h5py
        self.guard = guard

    def get(self, obj: Any, name: str, missing: Any = _MISSING) -> Any:
        """One attribute as JSON-ready data (``missing`` for an absent one, when given)."""
        import numpy as np  # h5py has loaded it already

        h5py = self.h5py
        encoded = name.encode("utf-8")
        if missing is not _MISSING and not h5py.h5a.exists(obj.id, encoded):
            return missing
        attr = h5py.h5a.open(obj.id, encoded)
        file_type = attr.get_type()
        shape = attr.shape
        if shape is None:
            return None
        size = int(np.prod(shape, dtype=np.uint64)) * file_type.get_size()
        if size > limits.MAX_HDF5_ATTR_BYTES:
            raise LimitExceededError(
                f"HDF5 attribute {name!r} size", limits.MAX_HDF5_ATTR_BYTES, size
            )
        problem = self._problem(obj, name, file_type)
        if problem:
            return {"hdf5_type": problem, "shape": list(shape)}
        value = obj.attrs[name]
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "SOU":
                return [_text(v) for v in value.reshape(-1)[:MAX_ATTR_ELEMENTS].tolist()]
            if value.size > MAX_ATTR_ELEMENTS:
                return {"dtype": str(value.dtype), "shape": list(value.shape)}
            return [[v.real, v.imag] if isinstance(v, complex) else v for v in value.tolist()]
        value = _text(value)
        if isinstance(value, complex):
            return [value.real, value.imag]
        return value if isinstance(value, (str, int, float, bool)) else repr(value)[:200]

    def _problem(self, obj: Any, name: str, file_type: Any) -> str:
        """Why this attribute must not be converted by the library ("" when it may)."""
        h5py = self.h5py
        if file_type.get_class() != h5py.h5t.STRING:
            kind = standard_type(h5py, file_type)
            return kind if isinstance(kind, str) else ""
        charset = file_type.get_cset() in (h5py.h5t.CSET_ASCII, h5py.h5t.CSET_UTF8)
        padding = file_type.get_strpad() in (
            h5py.h5t.STR_NULLTERM,
            h5py.h5t.STR_NULLPAD,
            h5py.h5t.STR_SPACEPAD,
        )
        if not (charset and padding):
            return "malformed string"
        if file_type.is_variable_str():
            address = h5py.h5o.get_info(obj.id).addr
            if self.guard is None or not self.guard.vlen_attribute_ok(address, name):
                return "variable-length string that failed modelport's global heap check"
        return ""

    def keras_list(self, obj: Any, name: str) -> list[str] | None:
        """A Keras list attribute, whole (``name``) or split (``name0``, ``name1``, ...)."""
        attrs = obj.attrs
        if name in attrs:
            chunks = [name]
        else:
            chunks = []
            while f"{name}{len(chunks)}" in attrs and len(chunks) < limits.MAX_HDF5_ATTRS:
                chunks.append(f"{name}{len(chunks)}")
            if not chunks:
                return None
        values: list[str] = []
        for chunk in chunks:
            value = self.get(obj, chunk)
            if isinstance(value, list):
                values.extend(str(v) for v in value)
            elif isinstance(value, str):
                values.append(value)
        return values

    def root_metadata(self, handle: Any, warnings: list[str]) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        names = list(handle.attrs)
        if len(names) > limits.MAX_HDF5_ATTRS:
            raise LimitExceededError("HDF5 root attributes", limits.MAX_HDF5_ATTRS, len(names))
        for name in names:
            try:
                metadata[name] = value = self.get(handle, name)
            except LimitExceededError as exc:
                warnings.append(f"root attribute {name!r} left out: {exc}")
                if name in _keras_config.LOADED_ATTRIBUTES:  # present all the same
                    metadata[name] = {"left_out": str(exc)}
                continue
            if isinstance(value, dict) and "failed" in str(value.get("hdf5_type")):
                warnings.append(f"root attribute {name!r} not read: {value['hdf5_type']}")
        return metadata


def layout_details(
    attrs: AttributeReader, handle: Any, metadata: dict[str, Any], names: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """The writer's layout and, for Keras models, what the model config declares."""
    h5py = attrs.h5py
    details: dict[str, Any] = {}
    warnings: list[str] = []
    _judge_configs(metadata, details, warnings)
    weights = handle.get("model_weights", getlink=True)
    if "model_config" in metadata and isinstance(weights, h5py.HardLink):
        layer_names = attrs.keras_list(handle["model_weights"], "layer_names")
        layout = "keras2-full-model" if layer_names is not None else "plain"
    else:
        layer_names = attrs.keras_list(handle, "layer_names")
        if layer_names is not None:
            layout = (
                "hf-tf" if _looks_transformers(attrs, handle, layer_names) else "keras2-weights"
            )
        elif any(KERAS3_VAR.search(name) for name in names):
            layout = "keras3-weights"
        else:
            layout = "plain"
    details["layout"] = layout
    if layer_names is not None:
        details["layer_names"] = layer_names[: _keras_config.MAX_LISTED]
    return details, warnings


def _judge_configs(metadata: dict[str, Any], details: dict[str, Any], warnings: list[str]) -> None:
    """Every root attribute Keras deserializes, judged. One present but not read (in dense
    attribute storage, which the heap check does not follow; past the size read; not text;
    not JSON) goes to ``unread_configs``: Keras may run what it holds, so the scanner calls
    the file not analysed rather than trusting a description of it."""
    unread: list[dict[str, str]] = []
    for name in _keras_config.LOADED_ATTRIBUTES:
        value = metadata.get(name, _MISSING)
        if value is _MISSING:
            continue
        if not isinstance(value, str):
            unread.append({"name": name, "why": f"not read as text ({value})"})
            continue
        try:
            config = _keras_config.parse_json(value, f"Keras {name} attribute")
            facts = _keras_config.analyse(config)
        except (CorruptFileError, LimitExceededError) as exc:
            unread.append({"name": name, "why": str(exc)})
            continue
        found = facts.details()
        if name == "model_config":
            details["model_config"] = config
            details.update(found)
        else:  # of the others, what runs code counts
            for key in ("lambda_layers", "lambda_functions", "custom_objects"):
                if found.get(key):
                    details[key] = [*details.get(key, []), *found[key]]
        warnings.extend(facts.warnings)
    if unread:
        details["unread_configs"] = unread
        warnings.extend(f"Keras {u['name']} attribute not read: {u['why']}" for u in unread)


def _looks_transformers(attrs: AttributeReader, handle: Any, layer_names: list[str]) -> bool:
    h5py = attrs.h5py
    if any("/" in name for name in layer_names):
        return True
    for layer in layer_names[:16]:
        if not layer or layer in (".", ".."):
            continue
        if not isinstance(handle.get(layer, getlink=True), h5py.HardLink):
            continue
        group = handle[layer]
        if isinstance(group, h5py.Group):
            weight_names = attrs.keras_list(group, "weight_names") or []
            if any(name.split("/", 1)[0].startswith("tf_") for name in weight_names):
                return True
    return False
