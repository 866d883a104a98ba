"""TensorFlow SavedModel folders, as ``tf.saved_model.save`` and Keras 2's ``model.save`` write.

Layout (tensorflow/core/protobuf/saved_model.proto, meta_graph.proto; Keras 2's
``saving/saved_model``):

- ``saved_model.pb`` MUST hold a ``SavedModel``: ``saved_model_schema_version`` (1, varint,
  1 when set) and ``meta_graphs`` (2). A ``MetaGraphDef`` holds ``meta_info_def`` (1:
  ``tags`` 4, ``tensorflow_version`` 5), ``graph_def`` (2: ``node`` 1 of ``NodeDef`` with
  ``op`` 2, ``library`` 2 of ``FunctionDef`` whose ``node_def`` is 3), ``signature_def``
  (5: map entries, key 1) and ``object_graph_def`` (7: ``nodes`` 1 of ``SavedObject``, whose
  ``user_object`` 4 is ``{identifier 1, version 2, metadata 3}``: TF 2.0-2.4 kept Keras
  metadata there);
- ``variables/variables.index`` and its data shards form a tensor bundle (``tf_bundle``);
  a SavedModel without variables has none;
- ``keras_metadata.pb`` (Keras 2) holds ``SavedMetadata``: ``nodes`` (1) of ``{node_id 2,
  node_path 3, identifier 4, metadata 5 (JSON), version 6}``. A Lambda layer's JSON carries
  base64 marshal bytecode that ``load_model`` runs;
- ``fingerprint.pb`` holds a ``FingerprintDef``: hashes (1..5, varints), ``version`` (6)
  and ``uuid`` (7);
- a TF1 ``Saver`` writes ``<prefix>.meta`` beside its checkpoint: one ``MetaGraphDef``,
  whose ``meta_info_def`` opens with the op list, where the saver's ``SaveV2`` and
  ``RestoreV2`` ops are always named.

The folder, or ``saved_model.pb`` alone, reads as the variables' tensors (keys as the bundle
names them) plus ``details``: tags, signatures, op counts per meta graph and what the Keras
metadata declares (``lambda_layers``, ``custom_objects``, as for ``.keras`` and ``.h5``).
``keras_metadata.pb`` and ``fingerprint.pb`` alone read as details only; a ``.meta`` file as
its checkpoint's tensors (when the ``.index`` is beside it) plus its graph. Graph constants
are not listed, and nothing from the graph is executed.
"""

from __future__ import annotations

import mmap
from collections import Counter
from pathlib import Path
from typing import Any, Final

from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError, ModelportError
from modelport.formats import _keras_config, _tf_saver, tf_bundle
from modelport.formats._protobuf import Field, Message, WireType
from modelport.formats.protocol import Contents, Format, FormatReader, Probe

SAVED_MODEL_NAME: Final = "saved_model.pb"
KERAS_METADATA_NAME: Final = "keras_metadata.pb"
VARIABLES_INDEX: Final = Path("variables") / "variables.index"
# Fields walked in one saved_model.pb: each node and function body costs a handful; a large
# graph has a few million.
MAX_SAVEDMODEL_FIELDS: Final = 20_000_000
MAX_FINGERPRINT_BYTES: Final = 4096
# Keras 2 metadata: one JSON document per layer, each capped like a Keras config.
MAX_KERAS_METADATA_BYTES: Final = 1 << 30
_WHOLE_JSON: Final = limits.MAX_KERAS_CONFIG_BYTES + 1  # past the cap: parse_json refuses it
MAX_LISTED_OPS: Final = 200
# Ops that touch the file system when a graph function runs: the scanner rates them (writing
# as code reaching the machine). Writers: tf.io.write_file, a summary writer's logdir or
# database, tf.data's TFRecord writer, save and snapshot, and the V1 checkpoint writers Save
# and SaveSlices (tf.raw_ops.Save in a resource's _initialize writes where it says as
# tf.saved_model.load runs it). Restore is not listed.
WRITING_FILE_OPS: Final = frozenset(
    (
        "WriteFile",
        "Save",
        "SaveSlices",
        "CreateSummaryFileWriter",
        "CreateSummaryDbWriter",
        "DatasetToTFRecord",
        "SaveDataset",
        "SaveDatasetV2",
        "SnapshotDataset",
        "SnapshotDatasetV2",
    )
)
FILE_OPS: Final = frozenset(("ReadFile", "MatchingFiles")) | WRITING_FILE_OPS
# The V2 saver's writers, in every SavedModel's saver (which load never runs; it writes where
# its caller's file_prefix says): anywhere else they write a checkpoint where the graph says.
# ``_tf_saver`` tells the saver's own by the graph's structure.
SAVER_OPS: Final = frozenset(("SaveV2", "MergeV2Checkpoints"))
# Ops that write where an attribute says as they run: PrintV2's output_stream (a file:// URL
# is appended to; the process's own streams below are not files), the debug ops' debug_urls
# (file:// dumps every tensor they see, grpc:// sends it) and Copy's debug_ops_spec entries
# ("DebugIdentity;file:///dump;0").
OUTPUT_ATTRS: Final = {
    "PrintV2": "output_stream",
    "DebugIdentity": "debug_urls",
    "DebugIdentityV2": "debug_urls",
    "DebugIdentityV3": "debug_urls",
    "DebugNanCount": "debug_urls",
    "DebugNumericSummary": "debug_urls",
    "Copy": "debug_ops_spec",
    "CopyHost": "debug_ops_spec",
}
STREAMS: Final = frozenset(("stdout", "stderr", "log(info)", "log(warning)", "log(error)"))
_ATTR_TEXT: Final = 4096
_META_GRAPH_TAGS: Final = frozenset((0x0A, 0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A))  # fields 1..7
_FINGERPRINT_WIRES: Final = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 2, 7: 2}
_KERAS_NODE_WIRES: Final = {2: 0, 3: 2, 4: 2, 5: 2, 6: 2}
_META_INFO_WIRES: Final = {1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 2, 7: 0, 8: 2}


# -- sniffing ------------------------------------------------------------------------------------
def _tag_and_length(head: bytes, pos: int) -> tuple[int, int, int] | None:
    """(tag, value, position after) of a field at ``pos`` within the head, or None."""
    walker = Message(head, None, 1)
    try:
        tag, pos = walker.varint(pos, len(head))
        value, pos = walker.varint(pos, len(head))
    except ModelportError:
        return None
    return tag, value, pos


def is_saved_model(probe: Probe) -> bool:
    """Schema version 1 (optional), then a meta graph whose first field is a MetaGraphDef
    field holding a message that starts with a field tag."""
    head, pos = probe.head, 0
    if head.startswith(b"\x08\x01"):
        pos = 2
    found = _tag_and_length(head, pos)
    if found is None or found[0] != 0x12 or found[2] + found[1] > probe.size:
        return False
    inner = _tag_and_length(head, found[2])
    if inner is None or inner[0] not in _META_GRAPH_TAGS or inner[1] > found[1]:
        return False
    return inner[2] < len(head) and head[inner[2]] in (0x08, 0x0A, 0x12, 0x1A, 0x22)


def is_keras_metadata(probe: Probe) -> bool:
    """``SavedMetadata``: its first node's fields are node_id/path/identifier/metadata, and
    its identifiers are Keras' own (``_tf_keras_layer``, ``_tf_keras_network`` ...)."""
    head = probe.head
    found = _tag_and_length(head, 0)
    if found is None or found[0] != 0x0A or b"_tf_keras" not in head:
        return False
    end = min(found[2] + found[1], len(head))
    return _fields_match(head[found[2] : end], _KERAS_NODE_WIRES, partial=True)


def is_fingerprint(probe: Probe) -> bool:
    if probe.size > MAX_FINGERPRINT_BYTES or probe.size != len(probe.head):
        return False
    return _fields_match(probe.head, _FINGERPRINT_WIRES, partial=False, required=(1, 6))


def _fields_match(
    data: bytes, wires: dict[int, int], *, partial: bool, required: tuple[int, ...] = ()
) -> bool:
    """Whether ``data`` parses as fields of the given numbers and wire types only (a cut last
    field is allowed when ``partial``)."""
    seen = set()
    message = Message(data, None, 1000)
    try:
        for field in message.fields(0, len(data)):
            if wires.get(field.number) != field.wire:
                return False
            seen.add(field.number)
    except LimitExceededError:
        return False
    except ModelportError:
        if not partial or not seen:
            return False
    return bool(seen) and seen.issuperset(required)


def is_meta_graph(probe: Probe) -> bool:
    """A lone ``MetaGraphDef``: ``meta_info_def`` first, its fields all MetaInfoDef's, and
    the saver's ops named in the op list it opens with."""
    head = probe.head
    found = _tag_and_length(head, 0)
    if found is None or found[0] != 0x0A or found[2] + found[1] > probe.size:
        return False
    if b"RestoreV2" not in head and b"SaveV2" not in head:
        return False
    end = min(found[2] + found[1], len(head))
    return _fields_match(head[found[2] : end], _META_INFO_WIRES, partial=True)


def sniff_file(probe: Probe) -> bool:
    if probe.is_dir:
        return False
    return (
        is_saved_model(probe)
        or is_keras_metadata(probe)
        or is_fingerprint(probe)
        or is_meta_graph(probe)
    )


def sniff_folder(probe: Probe) -> bool:
    if not probe.is_dir:
        return False
    saved_model = probe.path / SAVED_MODEL_NAME
    return saved_model.is_file() and is_saved_model(Probe.of(saved_model))


# -- reading -------------------------------------------------------------------------------------
def read_file(path: Path, probe: Probe) -> Contents:
    if is_saved_model(probe):
        return read_saved_model(path.parent, path)
    if is_meta_graph(probe):
        return read_meta_graph(path)
    if is_keras_metadata(probe):
        contents = Contents(Format.TF_SAVEDMODEL, {}, details={"part": "keras metadata"})
        _add_keras_metadata(contents, path)
        return contents
    details = {"part": "fingerprint", **_fingerprint(path)}
    return Contents(Format.TF_SAVEDMODEL, {}, details=details)


def read_folder(path: Path, probe: Probe) -> Contents:
    return read_saved_model(path, path / SAVED_MODEL_NAME)


def read_saved_model(folder: Path, graph: Path) -> Contents:
    """The variables beside ``graph`` as tensors; the graph and Keras metadata as details."""
    index = folder / VARIABLES_INDEX
    if index.is_file():
        contents = tf_bundle.read_bundle(index, Format.TF_SAVEDMODEL)
        shards = contents.details.pop("external_data")
        contents.details["external_data"] = [f"variables/{name}" for name in shards]
    else:
        contents = Contents(Format.TF_SAVEDMODEL, {})
        contents.warnings.append("no variables/variables.index: the SavedModel holds no variables")
    summary, legacy_metadata = _summary(graph)
    contents.details.update(summary)
    keras_file = folder / KERAS_METADATA_NAME
    if keras_file.is_file():
        _add_keras_metadata(contents, keras_file)
    elif legacy_metadata:
        _add_keras_facts(contents, legacy_metadata)
    return contents


def read_meta_graph(path: Path) -> Contents:
    """A Saver's ``.meta``: the checkpoint beside it (if there) and the graph's summary."""
    index = path.with_suffix(tf_bundle.INDEX_SUFFIX)
    if path.suffix == ".meta" and index.is_file():
        contents = tf_bundle.read_bundle(index)
    else:
        contents = Contents(Format.TF_CHECKPOINT, {})
        contents.warnings.append(f"no {index.name} beside the meta graph: no tensors listed")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        message = Message(m, path, MAX_SAVEDMODEL_FIELDS)
        whole = Field(0, WireType.LEN, message.size, 0, message.size)
        keras_json: list[str] = []
        contents.details["meta_graphs"] = [_meta_graph(message, whole, keras_json)]
    contents.details["part"] = "meta graph"
    return contents


def _summary(graph: Path) -> tuple[dict[str, Any], list[str]]:
    """What ``saved_model.pb`` declares, and the Keras JSON its user objects carry."""
    with open(graph, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        message = Message(m, graph, MAX_SAVEDMODEL_FIELDS)
        schema = None
        meta_graphs: list[dict[str, Any]] = []
        keras_json: list[str] = []
        for field in message.fields(0, message.size):
            if field.number == 1 and field.wire == WireType.VARINT:
                schema = field.value
            elif field.number == 2:
                message.expect(field, WireType.LEN)
                meta_graphs.append(_meta_graph(message, field, keras_json))
    if not meta_graphs:
        raise CorruptFileError("the SavedModel holds no meta graph", path=graph)
    return {"saved_model_schema_version": schema, "meta_graphs": meta_graphs}, keras_json


def _meta_graph(message: Message, meta: Field, keras_json: list[str]) -> dict[str, Any]:
    tags: list[str] = []
    version = ""
    signatures: list[str] = []
    ops: Counter[str] = Counter()
    outputs: list[dict[str, str]] = []
    saver = _tf_saver.read_saver(message, meta)
    for field in message.fields(meta.start, meta.end):
        if field.wire != WireType.LEN:
            continue
        if field.number == 1:
            for info in _sub(message, field):
                if info.number == 4:
                    tags.append(message.text(info))
                elif info.number == 5:
                    version = message.text(info)
        elif field.number == 2:
            _count_ops(message, field, ops, outputs, saver)
        elif field.number == 5:
            signatures.extend(message.text(k) for k in _sub(message, field) if k.number == 1)
        elif field.number == 7:
            keras_json.extend(_user_object_metadata(message, field))
    found: dict[str, Any] = {"tags": tags, "tensorflow_version": version}
    found["signatures"] = signatures
    found["op_counts"] = dict(ops.most_common(MAX_LISTED_OPS))
    file_ops = sorted(FILE_OPS.intersection(ops))
    if file_ops:
        found["file_ops"] = file_ops
    outputs.extend({"op": op, "to": ""} for op in sorted(WRITING_FILE_OPS.intersection(ops)))
    if outputs:
        unique = {(o["op"], o["to"]): o for o in outputs}
        found["file_writes"] = list(unique.values())[:MAX_LISTED_OPS]
    return found


_sub = _tf_saver.sub


def _count_ops(
    message: Message,
    graph_def: Field,
    ops: Counter[str],
    outputs: list[dict[str, str]],
    saver: _tf_saver.Saver,
) -> None:
    """Ops of the graph's nodes and of every function in its library, and where the ops of
    ``OUTPUT_ATTRS`` write (a node's ``attr`` map is field 5, entries ``{key 1, value 2}``),
    and the ``SAVER_OPS`` that are not the saver's own."""
    nodes: list[tuple[Field, str, str]] = []  # each node: (field, "node" or "function", name)
    for field in _sub(message, graph_def):
        if field.number == 1:
            nodes.append((field, "node", ""))
        elif field.number == 2:
            for function in _sub(message, field):
                if function.number == 1:
                    name = _function_name(message, function)
                    nodes.extend(
                        (f, "function", name) for f in _sub(message, function) if f.number == 3
                    )
    graph = _tf_saver.Graph()
    writers: list[tuple[str, str, str]] = []  # (op, "node" or "function", its name)
    for node, kind, name in nodes:
        parts = _sub(message, node)
        names: list[str] = []
        inputs: list[str] = []
        for part in parts:
            if part.number == 2:
                names.append(message.text(part, 256))
            elif part.number == 3 and kind == "node":
                inputs.append(message.text(part))
            elif part.number == 1 and kind == "node":
                name = _tf_saver.node_name(message.text(part))
        ops.update(names)
        called = [*names[-1:], *_called(message, parts)]
        graph.add(name if kind == "node" else None, inputs, called, saver)
        attr = OUTPUT_ATTRS.get(names[-1]) if names else None
        if attr is not None:
            outputs.extend(_outputs(message, names[-1], attr, parts))
        elif names and names[-1] in SAVER_OPS:
            writers.append((names[-1], kind, name))
    own_nodes, own_functions = _tf_saver.trusted(saver, graph)
    for op, kind, name in writers:
        if name not in (own_nodes if kind == "node" else own_functions):
            outputs.append({"op": op, "to": ""})


def _called(message: Message, parts: list[Field]) -> list[str]:
    """The functions a node's attributes name: an ``AttrValue``'s ``func`` (10) or its
    ``list`` (1) of ``func`` (9), each a ``NameAttrList`` whose name is field 1."""
    found: list[str] = []
    for entry in (part for part in parts if part.number == 5):
        for value in (f for f in _sub(message, entry) if f.number == 2):
            for kind in _sub(message, value):
                lists = _sub(message, kind) if kind.number == 1 else []
                for named in [kind] if kind.number == 10 else [f for f in lists if f.number == 9]:
                    found.extend(
                        message.text(f, 256) for f in _sub(message, named) if f.number == 1
                    )
    return found


def _function_name(message: Message, function: Field) -> str:
    """A ``FunctionDef``'s name: its ``signature`` (1, an ``OpDef``) has it as field 1."""
    for signature in (f for f in _sub(message, function) if f.number == 1):
        for name in (f for f in _sub(message, signature) if f.number == 1):
            return message.text(name, 256)
    return ""


def _outputs(message: Message, op: str, attr: str, parts: list[Field]) -> list[dict[str, str]]:
    """Where a node of ``OUTPUT_ATTRS`` writes: each of its ``attr``'s strings that is not
    the process's own stream (``debug_ops_spec`` entries name their URL second)."""
    found = []
    for entry in (part for part in parts if part.number == 5):
        fields = {f.number: f for f in _sub(message, entry)}
        if 1 not in fields or 2 not in fields or message.text(fields[1], 256) != attr:
            continue
        for text in _attr_strings(message, fields[2]):
            target = text.split(";")[1] if attr == "debug_ops_spec" and ";" in text else text
            if target not in STREAMS:
                found.append({"op": op, "to": target})
    return found


def _attr_strings(message: Message, value: Field) -> list[str]:
    """An ``AttrValue``'s strings: ``s`` (2), or ``list`` (1) of ``s`` (2)."""
    found = []
    for field in _sub(message, value):
        if field.number == 2:
            found.append(message.text(field, _ATTR_TEXT))
        elif field.number == 1:
            found.extend(message.text(s, _ATTR_TEXT) for s in _sub(message, field) if s.number == 2)
    return found


def _user_object_metadata(message: Message, object_graph: Field) -> list[str]:
    found: list[str] = []
    for node in _sub(message, object_graph):
        if node.number != 1:
            continue
        for kind in _sub(message, node):
            if kind.number == 4:
                texts = (message.text(f, _WHOLE_JSON) for f in _sub(message, kind) if f.number == 3)
                found.extend(texts)
    return [text for text in found if text]


def _add_keras_metadata(contents: Contents, path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_KERAS_METADATA_BYTES:
        raise LimitExceededError(
            "keras_metadata.pb size", MAX_KERAS_METADATA_BYTES, size, path=path
        )
    raw = path.read_bytes()
    message = Message(raw, path, MAX_SAVEDMODEL_FIELDS)
    documents: list[str] = []
    objects: list[dict[str, str]] = []
    for node in message.fields(0, message.size):
        if node.number != 1 or node.wire != WireType.LEN:
            continue
        parts = {f.number: f for f in message.fields(node.start, node.end)}
        texts = {n: message.text(f) for n, f in parts.items() if f.wire == WireType.LEN}
        objects.append({"path": texts.get(3, ""), "identifier": texts.get(4, "")})
        if 5 in parts:
            documents.append(bytes(raw[parts[5].start : parts[5].end]).decode("utf-8", "replace"))
    contents.details["keras_objects"] = objects[: _keras_config.MAX_LISTED]
    _add_keras_facts(contents, documents)


def _add_keras_facts(contents: Contents, documents: list[str]) -> None:
    """Each object's JSON, read as a layer of one config: Lambda layers and custom objects
    are found whether they appear on their own node or in a model's ``layers``. JSON that
    does not parse raises: code Keras would run must not pass unanalysed."""
    configs = [_keras_config.parse_json(text, "Keras object metadata") for text in documents]
    facts = _keras_config.analyse({"layers": configs})
    for key in ("lambda_layers", "lambda_functions", "custom_objects"):
        items = getattr(facts, key)
        unique = list({repr(item): item for item in items}.values())
        if unique:
            contents.details[key] = unique
    contents.details["model_config"] = configs
    contents.warnings.extend(dict.fromkeys(facts.warnings))


def _fingerprint(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    message = Message(raw, path, 1000)
    names = {1: "saved_model_checksum", 2: "graph_def_program_hash", 3: "signature_def_hash"}
    names |= {4: "saved_object_graph_hash", 5: "checkpoint_hash"}
    found: dict[str, Any] = {}
    for field in message.fields(0, len(raw)):
        if field.number in names:
            found[names[field.number]] = field.value
        elif field.number == 7:
            found["uuid"] = message.text(field, 256)
    return {"fingerprint": found}


FILE_READER = FormatReader(Format.TF_SAVEDMODEL, sniff_file, read_file, ())
READER = FormatReader(Format.TF_SAVEDMODEL, sniff_folder, read_folder, ())
