"""Findings in formats that carry no pickle, from what their readers report.

Keras files name code (Lambda layers hold Python bytecode; custom objects name classes to
import); GGUF and tokenizer metadata carry Jinja chat templates that loaders render
(``templates`` judges them); Hugging Face configurations name code that ``from_pretrained``
imports (``hf_code``); HDF5 links, virtual datasets and external storage make h5py open other
files of the machine. The readers record these without acting on them; this module rates them.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Sequence
from pathlib import Path, PurePath, PurePosixPath
from types import ModuleType
from typing import Any

from modelport import limits
from modelport.errors import MissingDependencyError
from modelport.formats import _keras_config
from modelport.formats.protocol import Contents, Format
from modelport.gadgets import gadget
from modelport.scanning import hf_code, templates
from modelport.scanning.findings import Finding
from modelport.severity import Severity

# Text a model loader reads for what it makes it do: configs name code, templates render.
LOADER_TEXT = frozenset((".json", ".jinja", ".jinja2", ".yaml", ".yml"))
# Suffixes of the text loaders read for code names (JSON and YAML configurations) or render
# (Jinja).
_READ_FOR_CODE = frozenset((".json", ".jinja", ".yaml", ".yml"))
_YAML = frozenset((".yaml", ".yml"))
_TEMPLATES = frozenset((".jinja", ".jinja2"))
# Text under any other name is a config by its content (``OmegaConf.load`` and jsonargparse
# read any file name): a small text holding what a YAML config needs to name code is judged
# as YAML. A python tag needs ``!!``, a verbatim ``!<`` or a ``%TAG`` handle; a target key
# needs its word (an alias or a merge key repeats a word written elsewhere in the text) or a
# backslash (an escape in a double-quoted key). Real configs are tens of kilobytes; a text
# that composes whole costs about 0.25 s of CPU at the bound (pure-Python PyYAML), most prose
# stops at its first line that is not YAML, and a vocabulary or merges file past the bound
# is not composed.
MAX_CONTENT_CONFIG_BYTES = 128 << 10
_CONFIG_SHAPE = re.compile(rb"!!|!<|%TAG|\\|target|class_path|cls")
# Bytes a JSON document needs for a target key (JSON may spell a key with \u escapes), and
# the keys (``yaml_configs`` judges what they name).
_JSON_TARGET_NEEDLES = (b"_target_", b"class_path", b"cls", b"target", b"\\u")
_TARGET_KEYS = frozenset(("_target_", "class_path", "cls", "target"))
_OPENS_CONTAINER = re.compile(rb"\s*[\[{]")


def findings(contents: Contents) -> list[Finding]:
    found = []
    for key in ("lambda_layers", "lambda_functions"):
        for item in contents.details.get(key) or []:
            found.append(
                Finding(
                    Severity.HIGH,
                    "keras-lambda",
                    str(item),
                    "Keras Lambda code: Python bytecode that runs when Keras loads the model",
                )
            )
    for item in contents.details.get("custom_objects") or []:
        found.append(_custom_object(item))
    for unread in contents.details.get("unread_configs") or []:  # Keras runs them unjudged
        message = f"a config Keras deserializes on load was not read: {unread['why']}"
        found.append(Finding(Severity.HIGH, "not-analysed", unread["name"], message))
    found.extend(_chat_templates(contents.metadata))
    for reference in contents.details.get("external_references") or []:
        found.append(_external_reference(reference))
    for graph in contents.details.get("meta_graphs") or []:
        if not isinstance(graph, dict):
            continue
        writes = [item for item in graph.get("file_writes") or [] if isinstance(item, dict)]
        writers = {item.get("op") for item in writes}
        found.extend(
            _tf_file_read(str(op)) for op in graph.get("file_ops") or [] if op not in writers
        )
        found.extend(_tf_file_write(item) for item in writes)
    return found


def keras_config_findings(document: Any) -> list[Finding]:
    """A JSON document shaped as a Keras model (a folder's or zip's ``config.json``): Keras
    runs it with or without weights beside it, so it is judged wherever it is met, by the
    same rules as the Keras readers' configs."""
    if not _keras_config.is_keras_shaped(document):
        return []
    facts = _keras_config.analyse(document)
    return findings(Contents(Format.KERAS, {}, details=facts.details()))


def _tf_file_read(op: str) -> Finding:
    """A SavedModel graph op that reads the machine's files (``tf_savedmodel.FILE_OPS``):
    reading a path the caller passes is what some serving graphs do (an image by its file
    name), so it is worth a look, not a refusal."""
    return Finding(
        Severity.MEDIUM,
        "tf-file-access",
        op,
        f"the graph holds a {op} op: the model reads files of the machine it runs on when a "
        "function that holds it runs, and tf.saved_model.load runs resource initializers as "
        "it loads",
    )


def _tf_file_write(item: dict[str, str]) -> Finding:
    """A SavedModel graph op that writes (``tf_savedmodel.WRITING_FILE_OPS``, or an op of
    ``OUTPUT_ATTRS`` whose attribute names a file or URL: ``tf.print(...,
    output_stream="file://...")``): code's reach into the machine, run whenever a function
    that holds it runs, and tf.saved_model.load runs resource initializers as it loads."""
    op, target = str(item.get("op", "")), str(item.get("to", ""))
    where = f"to {target!r}" if target else "where its inputs say"
    return Finding(
        Severity.HIGH,
        "tf-file-access",
        op,
        f"the graph's {op} op writes {where}: the model writes files of the machine it runs "
        "on (or sends data from it) when a function that holds it runs, and "
        "tf.saved_model.load runs resource initializers as it loads",
    )


def text_findings(path: Path, aliases: Sequence[Path] = ()) -> list[Finding]:
    """What the text files beside a model make its loaders run: chat templates (``.jinja``
    files such as ``chat_template.jinja`` and ``additional_chat_templates/*.jinja``, and the
    ``chat_template`` entries of JSON files: ``tokenizer_config.json``, ``chat_template.json``,
    ``processor_config.json``), the code Hugging Face configurations name (``auto_map``,
    ``modules.json``, ``model_index.json``: see ``hf_code``), the code YAML configurations
    name (``yaml_configs``), and ``.py`` files. The rules that go by name apply under every
    name that reaches the file: ``aliases`` are the other paths (links) a loader may open it
    by; the bytes are read once."""
    names = list(dict.fromkeys([path, *aliases]))
    found = [hf_code.python_file(name) for name in names if name.suffix == ".py"]
    others = [name.name for name in names if name.suffix != ".py"]
    if not others:
        return found
    size = path.stat().st_size
    if size > limits.MAX_TEMPLATE_TEXT_BYTES:
        return found + _too_long(others, size)
    return found + _loader_text(others, path.read_bytes(), path.name)


def member_text_findings(name: str, data: bytes | memoryview, member: str) -> list[Finding]:
    """A text member of an archive that a loader reads from it (a ``.nemo``'s
    ``model_config.yaml``), judged as the same file in a folder; ``member`` locates the
    findings. No loader imports a ``.py`` member from an archive: it is named, as text."""
    leaf = PurePosixPath(name)
    if leaf.suffix == ".py":
        message = f"Python source {name} in the archive: no model loader imports it from there"
        return [Finding(Severity.INFO, "python-source", member, message)]
    if leaf.suffix.lower() not in LOADER_TEXT:
        return []
    if len(data) > limits.MAX_TEMPLATE_TEXT_BYTES:
        return _too_long([leaf.name], len(data))
    return _loader_text([leaf.name], bytes(data), member)


def _loader_text(names: list[str], data: bytes, member: str) -> list[Finding]:
    """One text's findings under each of its file names: templates for ``.jinja``, the code
    YAML configurations name for ``.yaml``/``.yml`` (``member`` locates those), what a
    JSON document holds for the rest (``auto_map``, chat templates, target keys), and a text
    that is neither, judged as YAML by its content."""
    text = data.decode("utf-8", "replace")
    found = []
    for name in dict.fromkeys(n for n in names if n.endswith(".jinja")):
        found += _template(name, text)
    suffixes = {PurePosixPath(n).suffix.lower() for n in names}
    if suffixes & _YAML:
        judged: list[Finding] = _yaml_configs().findings(data, member)
        found += judged
    json_names = [n for n in dict.fromkeys(names) if _is_json_name(n)]
    if not json_names:
        return found
    targeted = _Targeted()
    try:
        if _OPENS_CONTAINER.match(data) and any(n in data for n in _JSON_TARGET_NEEDLES):
            document = json.loads(text, object_hook=targeted)
        else:
            document = json.loads(text)
    except (ValueError, RecursionError):
        if not suffixes & (_YAML | _TEMPLATES):
            found += _content_config(data, member)
        return found
    found += _chat_templates(document) if isinstance(document, dict) else []
    found += keras_config_findings(document)
    for name in json_names:
        found += hf_code.findings(name, document)
    if targeted.mappings and not suffixes & _YAML:
        judged = _yaml_configs().document_findings(document, targeted.mappings, member)
        found += judged
    return found


class _Targeted:
    """``json.loads``' object hook that keeps the objects holding a target key: a config's
    few, none of a tokenizer's (whose vocabulary is one object of many thousand keys)."""

    __slots__ = ("mappings",)

    def __init__(self) -> None:
        self.mappings: list[dict[str, Any]] = []

    def __call__(self, mapping: dict[str, Any]) -> dict[str, Any]:
        if not _TARGET_KEYS.isdisjoint(mapping):
            self.mappings.append(mapping)
        return mapping


def _content_config(data: bytes, member: str) -> list[Finding]:
    """A text no name declares a config (``config.cfg``, ``model.hparams``, a ``.json``
    that is YAML), judged as YAML when it is small and shaped like one that names code."""
    if len(data) > MAX_CONTENT_CONFIG_BYTES or _CONFIG_SHAPE.search(data) is None:
        return []
    judged: list[Finding] = _yaml_configs().findings(data, member, declared=False)
    return judged


def _is_json_name(name: str) -> bool:
    return not name.endswith(".jinja") and PurePosixPath(name).suffix.lower() not in _YAML


@functools.cache  # a scan of YAML needs PyYAML and the pickle rule; nothing else does
def _yaml_configs() -> ModuleType:
    return importlib.import_module("modelport.scanning.yaml_configs")


def _too_long(names: list[str], size: int) -> list[Finding]:
    """A JSON or YAML file or template past the limit of text read: loaders read it whole
    (json.loads skips any padding), so what it names cannot be left unjudged. Other long
    text (a README, a vocabulary) is no loader's code or template."""
    read = [name for name in names if PurePosixPath(name).suffix.lower() in _READ_FOR_CODE]
    if not read:
        return []
    return [
        Finding(
            Severity.HIGH,
            "not-analysed",
            read[0],
            f"{read[0]} holds {size} bytes, more than the {limits.MAX_TEMPLATE_TEXT_BYTES} "
            "bytes of configuration or template text modelport reads: the code it may name "
            "(auto_map, _target_ and the other keys loaders import code from) and the "
            "templates it may hold were not analysed, though loaders read it whole; find out "
            "why it is so large",
        )
    ]


def _custom_object(item: dict[str, Any]) -> Finding:
    """A Keras object its config names by module and class: Keras imports the module and
    calls what it names, so a known gadget there (``os.system``) runs on load."""
    module = str(item.get("module") or "")
    name = str(item.get("function") or item.get("class_name") or "")
    does = gadget(module, name)
    if does is not None:
        return Finding(
            Severity.CRITICAL,
            "keras-gadget",
            str(item.get("at", "")),
            f"Keras config names {module}.{name}, which {does}: loading the model calls it",
        )
    return Finding(
        Severity.MEDIUM,
        "keras-custom-object",
        "",
        f"custom Keras object {item}: loading it runs code the model file names",
    )


def _chat_templates(metadata: dict[str, Any]) -> list[Finding]:
    """Every template under a ``chat_template`` key: GGUF's ``tokenizer.chat_template`` and
    ``tokenizer.chat_template.<name>``, or a JSON file's ``chat_template``, which is a string,
    a list of ``{"name", "template"}`` (what transformers saves) or a ``{name: template}``
    dict (what it builds from that list)."""
    found = []
    for key, value in metadata.items():
        if "chat_template" not in str(key):
            continue
        if isinstance(value, str):
            found.extend(_template(str(key), value))
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and isinstance(item.get("template"), str):
                    found.extend(_template(f"{key}.{item.get('name')}", item["template"]))
        elif isinstance(value, dict):
            for name, template in value.items():
                if isinstance(template, str):
                    found.extend(_template(f"{key}.{name}", template))
    return found


def _template(where: str, text: str) -> list[Finding]:
    """A template judged by Jinja's parser; without jinja2 it is reported as not analysed,
    and the rest of the file is still scanned."""
    try:
        return templates.judge(where, text)
    except MissingDependencyError as exc:
        return [Finding(Severity.HIGH, "not-analysed", where, str(exc))]


def _external_reference(item: dict[str, str]) -> Finding:
    """An HDF5 link, virtual dataset or external storage naming another file: h5py (and
    Keras) open that file while loading this one, so weights can carry any file of the
    machine (a key, a password file) into a model."""
    kind, target = item.get("kind", "reference"), item.get("target", "")
    pieces = target.split(", ") if kind == "virtual dataset" else [target]
    files = [p if kind == "external storage of" else p.rpartition(":")[0] for p in pieces]
    outside = any(PurePath(f).is_absolute() or ".." in PurePath(f).parts for f in files)
    return Finding(
        Severity.HIGH if outside else Severity.MEDIUM,
        "hdf5-external-file",
        item.get("name", ""),
        f"{kind} {target}: h5py reads that file when this one is loaded"
        + (", and it lies outside the model's folder" if outside else ""),
    )


def loader_text_findings(path: Path, aliases: Sequence[Path] = ()) -> list[Finding]:
    """A config or template (``config.yaml``, ``tokenizer_config.json``, a ``config.cfg`` by
    its content) whose bytes also read as a model: its loader reads it as text all the same,
    so it is judged as such."""
    names = [path, *aliases]
    if all(name.suffix == ".py" for name in names) or not is_text(path):
        return []
    return text_findings(path, aliases)


def is_text(path: Path) -> bool:
    """Whether a file reads as UTF-8 text (no NUL in its first 4 KiB)."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
