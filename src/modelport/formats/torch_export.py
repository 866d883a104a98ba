"""``torch.export`` archives: the ``.pt2`` zips ``torch.export.save`` writes (PT2 archive).

Layout (torch/export/pt2_archive; the prefix is the file's stem, ``package`` for buffers):

- ``<prefix>/archive_format`` holds ``pt2``; ``archive_version``, ``byteorder`` (MUST be
  ``little`` when present) and ``.data/version`` are bookkeeping;
- ``<prefix>/models/<name>.json`` MUST hold each serialized ``ExportedProgram`` (graph,
  signature, opset and schema versions); one program is named ``model``;
- ``<prefix>/data/weights/<name>_weights_config.json`` maps each state_dict name to
  ``{"path_name", "is_param", "use_pickle", "tensor_meta": {"dtype", "sizes", "strides",
  "storage_offset", "requires_grad", "device", "layout"}}``; ``data/weights/<path_name>``
  holds the raw bytes of a whole storage (tensors sharing a storage share the file), or
  with ``use_pickle`` a ``torch.save`` of the tensor (tensor subclasses);
- ``<prefix>/data/constants/<name>_constants_config.json`` does the same for constants
  (``tensor_*`` files; ``custom_obj_*`` torchbind objects and ``opaque_obj_*`` pickles are
  listed, never loaded);
- older archives MAY instead hold ``data/weights/<name>.pt`` and ``data/constants/<name>.pt``
  (a ``torch.save`` of the whole dict); ``data/sample_inputs/<name>.pt``, ``extra/``,
  ``data/aotinductor/`` MAY be present.

The tree names tensors as ``ExportedProgram`` does: the state_dict's names at the top
(``conv.weight``), ``constants.<name>`` for ``program.constants`` and
``example_inputs.args.<i>`` / ``example_inputs.kwargs.<name>`` for ``program.example_inputs``;
those two groups are marked ``Apart``: listed, never taken for the model weights. An archive
with several programs has one such tree per program name.

A tensor is ``as_strided(flat storage, sizes, strides, storage_offset)`` where the flat
storage has the dtype of the first entry naming that file, as torch's loader does; an
empty file with a non-empty shape loads as zeros. Stored payloads are zero-copy ranges of
the archive; nested ``torch.save`` blobs go through modelport's own readers.
"""

from __future__ import annotations

import json
from collections import Counter
from enum import IntEnum
from pathlib import Path
from typing import Any

from modelport import dtypes, limits
from modelport.errors import CorruptFileError, ModelportError, UnsupportedVersionError
from modelport.formats._torch_blob import read_torch_blob
from modelport.formats._zip import ZipDirectory, ZipEntry
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.formats.torch_zip import check_byte_order
from modelport.formats.torchscript import extra_files
from modelport.pickles.torch_types import TypedStorage, tensor_from_storage
from modelport.tensors import NDArray, Storage, byte_array
from modelport.tree.weights import Apart

STRIDED = 7
TOP_OPS = 20
CONSTANTS = "constants"  # the groups listed beside the state_dict's names
EXAMPLE_INPUTS = "example_inputs"


class ScalarType(IntEnum):
    """torch._export.serde.schema.ScalarType: the dtype codes of ``tensor_meta``."""

    BYTE = 1
    CHAR = 2
    SHORT = 3
    INT = 4
    LONG = 5
    HALF = 6
    FLOAT = 7
    DOUBLE = 8
    COMPLEXHALF = 9
    COMPLEXFLOAT = 10
    COMPLEXDOUBLE = 11
    BOOL = 12
    BFLOAT16 = 13
    UINT16 = 28
    FLOAT8E4M3FN = 29
    FLOAT8E5M2 = 30
    FLOAT8E4M3FNUZ = 31
    FLOAT8E5M2FNUZ = 32
    FLOAT8E8M0FNU = 33
    UINT32 = 34
    UINT64 = 35


DTYPE_NAMES = {
    ScalarType.BYTE: "uint8",
    ScalarType.CHAR: "int8",
    ScalarType.SHORT: "int16",
    ScalarType.INT: "int32",
    ScalarType.LONG: "int64",
    ScalarType.HALF: "float16",
    ScalarType.FLOAT: "float32",
    ScalarType.DOUBLE: "float64",
    ScalarType.COMPLEXHALF: "complex32",
    ScalarType.COMPLEXFLOAT: "complex64",
    ScalarType.COMPLEXDOUBLE: "complex128",
    ScalarType.BOOL: "bool",
    ScalarType.BFLOAT16: "bfloat16",
    ScalarType.UINT16: "uint16",
    ScalarType.FLOAT8E4M3FN: "float8_e4m3fn",
    ScalarType.FLOAT8E5M2: "float8_e5m2",
    ScalarType.FLOAT8E4M3FNUZ: "float8_e4m3fnuz",
    ScalarType.FLOAT8E5M2FNUZ: "float8_e5m2fnuz",
    ScalarType.FLOAT8E8M0FNU: "float8_e8m0fnu",
    ScalarType.UINT32: "uint32",
    ScalarType.UINT64: "uint64",
}


def export_prefix(directory: ZipDirectory) -> str | None:
    """The folder holding ``archive_format`` or ``models/*.json``."""
    marked: dict[str, None] = {}
    for name in directory.names():
        parts = name.split("/")
        if (len(parts) == 2 and parts[1] == "archive_format") or (
            len(parts) == 3 and parts[1] == "models" and parts[2].endswith(".json")
        ):
            marked.setdefault(parts[0])
    if not marked:
        return None
    first = directory.entries[0].name.split("/", 1)[0]
    return first if first in marked else next(iter(marked))


def sniff(probe: Probe) -> bool:
    return probe.zip is not None and export_prefix(probe.zip) is not None


# -- JSON helpers ------------------------------------------------------------------------------
def _load_json(directory: ZipDirectory, entry: ZipEntry, path: Path) -> Any:
    try:
        return json.loads(directory.read_member(entry, limits.MAX_PT2_JSON).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{entry.name} is not valid JSON ({exc})", path=path) from None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _seq(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _int_field(value: Any, what: str, path: Path) -> int:
    """``{"as_int": n}`` (symbolic sizes cannot describe stored weights)."""
    number = value.get("as_int") if isinstance(value, dict) else None
    if type(number) is not int or number < 0:
        raise CorruptFileError(f"{what} is not a non-negative integer: {value!r:.80}", path=path)
    return number


def _dtype_name(code: Any, path: Path) -> str:
    try:
        return DTYPE_NAMES[ScalarType(code)]
    except (ValueError, KeyError, TypeError):
        raise CorruptFileError(f"unknown tensor dtype code {code!r:.20}", path=path) from None


# -- payloads ---------------------------------------------------------------------------------
class _Payloads:
    """The tensors of one payload config: flat storages shared by ``path_name``."""

    def __init__(self, directory: ZipDirectory, folder: str, path: Path) -> None:
        self.directory = directory
        self.folder = folder
        self.path = path
        self.flat: dict[str, TypedStorage] = {}
        self.warnings: list[str] = []
        # first of duplicate names wins, as in torch's reader (and ZipDirectory.find)
        self.index = {e.name: e for e in reversed(directory.entries) if e.name.startswith(folder)}

    def member(self, name: Any) -> ZipEntry:
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise CorruptFileError(f"bad payload file name {name!r:.80}", path=self.path)
        entry = self.index.get(self.folder + name)
        if entry is None:
            raise CorruptFileError(f"payload {self.folder}{name} is missing", path=self.path)
        return entry

    def tensor(self, fqn: str, meta: Any) -> Any:
        meta = _obj(meta)
        if meta.get("use_pickle"):
            return self._pickled(self.member(meta.get("path_name")))
        tensor_meta = meta.get("tensor_meta")
        if not isinstance(tensor_meta, dict):
            raise CorruptFileError(f"{fqn}: raw payload without tensor_meta", path=self.path)
        layout = tensor_meta.get("layout", STRIDED)
        if layout != STRIDED:
            raise CorruptFileError(f"{fqn}: layout {layout!r:.20} is not strided", path=self.path)
        dtype = _dtype_name(tensor_meta.get("dtype"), self.path)
        sizes = [_int_field(v, f"{fqn} size", self.path) for v in _seq(tensor_meta.get("sizes"))]
        strides = [
            _int_field(v, f"{fqn} stride", self.path) for v in _seq(tensor_meta.get("strides"))
        ]
        offset = _int_field(tensor_meta.get("storage_offset", {"as_int": 0}), "offset", self.path)
        flat = self._flat(meta.get("path_name"), dtype, sizes, strides, offset, tensor_meta)
        if flat.dtype != dtype:
            self.warnings.append(f"{fqn}: stored as {dtype} but shares a {flat.dtype} file")
        return tensor_from_storage(flat, offset, sizes, strides)

    def _flat(
        self,
        name: Any,
        dtype: str,
        sizes: list[int],
        strides: list[int],
        offset: int,
        tensor_meta: dict[str, Any],
    ) -> TypedStorage:
        entry = self.member(name)
        cached = self.flat.get(entry.name)
        if cached is not None:
            return cached
        itemsize = dtypes.dtype(dtype).itemsize
        device = _obj(tensor_meta.get("device"))
        location = str(device.get("type", "cpu"))
        if entry.size == 0:
            needed = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=False)) + 1
            numel = needed if all(sizes) and len(sizes) == len(strides) else 0
            if numel:
                self.warnings.append(f"{entry.name} is empty: its tensor reads as zeros")
            zeros = numel * itemsize
            storage = Storage(
                None, 0, zeros, key=entry.name, reader=lambda: byte_array(bytes(zeros))
            )
        else:
            if entry.size % itemsize:
                raise CorruptFileError(
                    f"{entry.name} holds {entry.size} bytes, not a multiple of {dtype}'s "
                    f"{itemsize}",
                    path=self.path,
                )
            numel = entry.size // itemsize
            if entry.is_stored:
                storage = Storage(self.path, entry.data_offset, entry.size, key=entry.name)
            else:
                storage = Storage(None, 0, entry.size, key=entry.name, reader=self._inflate(entry))
        typed = TypedStorage(storage, dtype, numel, location)
        self.flat[entry.name] = typed
        return typed

    def _inflate(self, entry: ZipEntry) -> Any:
        def read_bytes() -> NDArray:
            return byte_array(self.directory.read_member(entry))

        return read_bytes

    def _pickled(self, entry: ZipEntry) -> Any:
        data = memoryview(self.directory.read_member(entry))
        stored = entry.is_stored
        value, _ = read_torch_blob(
            data,
            path=self.path if stored else None,
            file_offset=entry.data_offset if stored else None,
        )
        return value


def _payload_tree(
    directory: ZipDirectory, prefix: str, model: str, kind: str, path: Path, details: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The tensors of ``data/<kind>/`` for one program (``kind`` is weights or constants)."""
    folder = f"{prefix}/data/{kind}/"
    config_entry = directory.find(f"{folder}{model}_{kind}_config.json")
    if config_entry is None:
        legacy = directory.find(f"{folder}{model}.pt")
        if legacy is None:
            return {}, []
        payloads = _Payloads(directory, folder, path)
        value = payloads._pickled(legacy)
        details.setdefault("legacy_payloads", []).append(legacy.name)
        return (value if isinstance(value, dict) else {kind: value}), []
    config = _obj(_load_json(directory, config_entry, path)).get("config")
    if not isinstance(config, dict):
        raise CorruptFileError(f"{config_entry.name} has no config mapping", path=path)
    payloads = _Payloads(directory, folder, path)
    tensors: dict[str, Any] = {}
    objects: list[str] = []
    for fqn, meta in config.items():
        name = _obj(meta).get("path_name")
        if kind == "constants" and isinstance(name, str) and not name.startswith("tensor_"):
            objects.append(str(fqn))  # torchbind / opaque objects: never loaded
            continue
        tensors[str(fqn)] = payloads.tensor(str(fqn), meta)
    return tensors, payloads.warnings + (
        [f"{model}: custom objects not loaded: {', '.join(objects)}"] if objects else []
    )


def _example_inputs(
    directory: ZipDirectory, prefix: str, model: str, path: Path, warnings: list[str]
) -> Any:
    """``ExportedProgram.example_inputs``: ``(args, kwargs)`` from a nested ``torch.save``,
    read by modelport's restricted reader; None when absent or unreadable (with a warning:
    they are no weights, so they never stop the weights from being read)."""
    entry = directory.find(f"{prefix}/data/sample_inputs/{model}.pt")
    if entry is None:
        return None
    try:
        return _Payloads(directory, f"{prefix}/data/sample_inputs/", path)._pickled(entry)
    except ModelportError as exc:
        warnings.append(f"{model}: example inputs not read: {exc}")
        return None


def _program_tree(
    weights: dict[str, Any], constants: dict[str, Any], inputs: Any, model: str, warnings: list[str]
) -> dict[str, Any]:
    """The state_dict under its own names, then the constants and example inputs, each
    grouped under its name and marked ``Apart`` from the weights."""
    tree: dict[str, Any] = dict(weights)
    for group in (CONSTANTS, EXAMPLE_INPUTS):
        if group in tree or any(name.startswith(f"{group}.") for name in weights):
            warnings.append(f"{model}: a weight is named {group!r}: that group is not listed")
    if constants and CONSTANTS not in tree:
        tree[CONSTANTS] = Apart(constants)
    if inputs is not None and EXAMPLE_INPUTS not in tree:
        args, kwargs = inputs if isinstance(inputs, tuple) and len(inputs) == 2 else (inputs, {})
        tree[EXAMPLE_INPUTS] = Apart(args=args, kwargs=kwargs)
    return tree


# -- program summary ----------------------------------------------------------------------------
def _tensor_value(name: Any, values: dict[str, Any]) -> dict[str, Any]:
    meta = _obj(values.get(name)) if isinstance(name, str) else {}
    described: dict[str, Any] = {"name": name}
    code = meta.get("dtype")
    if isinstance(code, int) and code in ScalarType._value2member_map_:
        described["dtype"] = DTYPE_NAMES.get(ScalarType(code), str(code))
    if "sizes" in meta:
        described["shape"] = [_size(s) for s in _seq(meta.get("sizes"))]
    return described


def _size(value: Any) -> Any:
    value = _obj(value)
    if type(value.get("as_int")) is int:
        return value["as_int"]
    expr = _obj(value.get("as_expr"))
    return str(expr.get("expr_str", "?"))


def _argument(arg: Any, values: dict[str, Any]) -> dict[str, Any]:
    arg = _obj(arg)
    if "as_tensor" in arg:
        return _tensor_value(_obj(arg["as_tensor"]).get("name"), values)
    kind = next(iter(arg), "none")
    return {"kind": str(kind)}


def summarize_program(program: Any) -> dict[str, Any]:
    """Signature, versions and op counts of one serialized ``ExportedProgram``."""
    program = _obj(program)
    module = _obj(program.get("graph_module"))
    graph = _obj(module.get("graph"))
    signature = _obj(module.get("signature"))
    values = _obj(graph.get("tensor_values"))
    inputs, outputs = [], []
    input_kinds: Counter[str] = Counter()
    output_kinds: Counter[str] = Counter()
    for spec in _seq(signature.get("input_specs")):
        kind, body = next(iter(_obj(spec).items()), ("unknown", {}))
        input_kinds[str(kind)] += 1
        if kind == "user_input":
            inputs.append(_argument(_obj(body).get("arg"), values))
    for spec in _seq(signature.get("output_specs")):
        kind, body = next(iter(_obj(spec).items()), ("unknown", {}))
        output_kinds[str(kind)] += 1
        if kind == "user_output":
            outputs.append(_argument(_obj(body).get("arg"), values))
    ops: Counter[str] = Counter(
        str(_obj(node).get("target", "?")) for node in _seq(graph.get("nodes"))
    )
    schema = _obj(program.get("schema_version"))
    return {
        "inputs": inputs,
        "outputs": outputs,
        "input_kinds": dict(input_kinds),
        "output_kinds": dict(output_kinds),
        "nodes": sum(ops.values()),
        "op_counts": dict(ops.most_common(TOP_OPS)),
        "schema_version": f"{schema.get('major', '?')}.{schema.get('minor', '?')}",
        "torch_version": str(program.get("torch_version", "")),
        "opset_version": {str(k): v for k, v in _obj(program.get("opset_version")).items()},
    }


# -- entry point --------------------------------------------------------------------------------
def read(path: Path, probe: Probe) -> Contents:
    directory: ZipDirectory = probe.zip_directory()
    prefix = export_prefix(directory)
    if prefix is None:
        raise CorruptFileError("zip archive is not a torch.export archive", path=path)
    details: dict[str, Any] = {"archive_prefix": prefix}
    for member, key in (("archive_format", "archive_format"), ("archive_version", "version")):
        entry = directory.find(f"{prefix}/{member}")
        if entry is not None:
            details[key] = directory.read_member(entry, 64).decode("ascii", "replace").strip()
    if details.get("archive_format", "pt2") != "pt2":
        raise UnsupportedVersionError(
            f"archive_format {details['archive_format']!r} (expected 'pt2')", path=path
        )
    check_byte_order(directory, prefix, path, "torch.export archives")
    warnings = [f"zip member name escapes the archive: {name!r}" for name in directory.unsafe_names]
    models_dir = f"{prefix}/models/"
    programs: dict[str, Any] = {}
    trees: dict[str, Any] = {}
    for entry in directory.entries:
        name = entry.name
        if (
            not (name.startswith(models_dir) and name.endswith(".json"))
            or "/" in name[len(models_dir) :]
        ):
            continue
        model = name[len(models_dir) : -len(".json")]
        if model in programs:
            continue
        programs[model] = summarize_program(_load_json(directory, entry, path))
        weights, notes = _payload_tree(directory, prefix, model, "weights", path, details)
        constants, more = _payload_tree(directory, prefix, model, "constants", path, details)
        inputs = _example_inputs(directory, prefix, model, path, warnings)
        warnings += notes + more
        trees[model] = _program_tree(weights, constants, inputs, model, warnings)
    if not programs:
        warnings.append("the archive holds no exported program (models/*.json)")
    tree = next(iter(trees.values())) if len(trees) == 1 else trees
    details["programs"] = programs
    aoti = [e.name for e in directory.entries if e.name.startswith(f"{prefix}/data/aotinductor/")]
    if aoti:
        details["aotinductor_files"] = len(aoti)
    metadata = extra_files(directory, f"{prefix}/extra/")
    return Contents(
        Format.TORCH_EXPORT, tree, metadata=metadata, details=details, warnings=warnings
    )


READER = FormatReader(Format.TORCH_EXPORT, sniff, read, (".pt2",))
