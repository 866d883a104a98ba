"""TorchScript archives: what ``torch.jit.save`` writes (``.pt``, ``.torchscript``, ``.ptl``).

Layout (torch/csrc/jit/serialization/export_module.cpp; the prefix is the file's stem):

- ``<prefix>/data.pkl`` MUST hold the module object: each scripted class is ``GLOBAL
  __torch__.<qualified module> <Class>``, ``NEWOBJ`` with no arguments and ``BUILD`` with
  a dict of every attribute in the class's slot order; tensors are
  ``torch._utils._rebuild_tensor_v2`` over storages ``("storage", <torch.XStorage>, key,
  location, numel)`` whose bytes lie in ``<prefix>/data/<key>``;
- ``<prefix>/constants.pkl`` MAY hold a tuple of tensor constants (``CONSTANTS.c0`` in the
  code), their storages under ``<prefix>/constants/<key>``;
- ``<prefix>/code/<qualified/module/path>.py`` hold the Python-like source of every class;
  each module class declares ``__parameters__ = ["weight", ...]`` and ``__buffers__ = [...]``
  (one line each); ``.debug_pkl`` files map source ranges;
- ``<prefix>/version``, ``byteorder``, ``extra/<name>`` (user files from ``_extra_files``),
  ``bytecode.pkl`` (lite interpreter) and ``traced_inputs.pkl`` MAY be present.

The state_dict is what ``torch.jit.load(f).state_dict()`` returns: per module, the
attributes named in ``__parameters__`` (tensors only), then those in ``__buffers__``, then
each submodule with its name as prefix, all in slot order. The code is parsed as text for
those two lists, never run. Archives from torch < 1.4 (``model.json``, ``attributes.pkl``)
are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError, UnsupportedVersionError
from modelport.formats._zip import ZipDirectory
from modelport.formats.protocol import Contents, Format, FormatReader, Probe
from modelport.formats.torch_zip import load_archive_pickle
from modelport.pickles.modules import ModuleNode
from modelport.pickles.records import ObjectRecord
from modelport.tensors import TensorRef

MAX_EXTRA_BYTES = 64 * 1024  # an extra/ file small enough to show as metadata

_CLASS = re.compile(r"class ([A-Za-z_][A-Za-z0-9_]*)(?:\(([^)]*)\))?:")
_DECLARED = re.compile(r"  (__parameters__|__buffers__) = \[(.*)\]\s*$")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class ClassDecl:
    """What a class's code says about its attributes."""

    is_module: bool
    parameters: frozenset[str]
    buffers: frozenset[str]


def script_prefix(directory: ZipDirectory) -> str | None:
    """The folder holding ``constants.pkl``, or ``code/`` beside ``data.pkl`` (``model.json``
    before torch 1.4); torch uses the first record's folder."""
    names = directory.names()
    members = set(names)
    marked: dict[str, None] = {}
    for name in names:
        parts = name.split("/")
        top = parts[0]
        if (len(parts) == 2 and parts[1] == "constants.pkl") or (
            len(parts) > 2
            and parts[1] == "code"
            and (f"{top}/data.pkl" in members or f"{top}/model.json" in members)
        ):
            marked.setdefault(top)
    if not marked:
        return None
    first = names[0].split("/", 1)[0]
    return first if first in marked else next(iter(marked))


def sniff(probe: Probe) -> bool:
    return probe.zip is not None and script_prefix(probe.zip) is not None


# -- code ---------------------------------------------------------------------------------------
def parse_classes(module: str, text: str) -> dict[str, ClassDecl]:
    """Class declarations of one code file, keyed by qualified name (``__torch__.a.Net``)."""
    found: dict[str, ClassDecl] = {}
    current: str | None = None
    is_module = False
    lists: dict[str, frozenset[str]] = {}

    def close() -> None:
        if current is not None:
            found[f"{module}.{current}"] = ClassDecl(
                is_module,
                lists.get("__parameters__", frozenset()),
                lists.get("__buffers__", frozenset()),
            )

    for line in text.splitlines():
        if not line or line[0] in " \t":
            match = _DECLARED.match(line) if current is not None else None
            if match:
                lists[match.group(1)] = frozenset(_QUOTED.findall(match.group(2)))
            continue
        close()
        header = _CLASS.match(line)
        current = header.group(1) if header else None
        is_module = bool(header and (header.group(2) or "").strip() == "Module")
        lists = {}
    close()
    return found


def _code_files(
    directory: ZipDirectory, prefix: str, warnings: list[str]
) -> tuple[dict[str, str], dict[str, ClassDecl]]:
    code: dict[str, str] = {}
    classes: dict[str, ClassDecl] = {}
    shown = parsed = 0
    root = f"{prefix}/code/"
    for entry in directory.entries:
        if not (entry.name.startswith(root) and entry.name.endswith(".py")):
            continue
        if parsed + entry.size > limits.MAX_CODE_PARSE_BYTES:
            warnings.append(f"code past {limits.MAX_CODE_PARSE_BYTES} bytes was not read")
            break
        text = directory.read_member(entry, limits.MAX_CODE_PARSE_BYTES - parsed).decode(
            "utf-8", "replace"
        )
        parsed += entry.size
        module = entry.name[len(root) : -len(".py")].replace("/", ".")
        classes.update(parse_classes(module, text))
        if shown + len(text) <= limits.MAX_CODE_BYTES:
            code[entry.name] = text
            shown += len(text)
    if shown < parsed:
        warnings.append(f"only {shown} of {parsed} bytes of code are included")
    return code, classes


# -- modules ------------------------------------------------------------------------------------
def _declaration(obj: ObjectRecord, classes: dict[str, ClassDecl]) -> ClassDecl | None:
    return classes.get(obj.class_path)


def _is_module(value: Any, classes: dict[str, ClassDecl]) -> bool:
    if not isinstance(value, ObjectRecord):
        return False
    decl = _declaration(value, classes)
    if decl is not None:
        return decl.is_module
    return isinstance(value.attributes().get("training"), bool)


def state_dict(
    root: ObjectRecord, classes: dict[str, ClassDecl], warnings: list[str]
) -> tuple[dict[str, TensorRef], ModuleNode, list[str]]:
    """(state_dict, module tree, tensor attributes that are neither parameter nor buffer)."""
    result: dict[str, TensorRef] = {}
    plain: list[str] = []
    tree = ModuleNode(root.class_path)
    undeclared: set[str] = set()
    pending: list[tuple[str, ObjectRecord, ModuleNode, frozenset[int]]] = [
        ("", root, tree, frozenset({id(root)}))
    ]
    visited = 0
    while pending:
        prefix, module, node, ancestors = pending.pop()
        visited += 1
        if visited > limits.MAX_TORCHSCRIPT_MODULES:
            raise LimitExceededError("TorchScript modules", limits.MAX_TORCHSCRIPT_MODULES, visited)
        decl = _declaration(module, classes)
        if decl is None:
            undeclared.add(module.class_path)
        attributes = module.attributes()
        parameters: list[tuple[str, TensorRef]] = []
        buffers: list[tuple[str, TensorRef]] = []
        children: list[tuple[str, ObjectRecord]] = []
        for name, value in attributes.items():
            if isinstance(value, TensorRef):
                if decl is None or name in decl.parameters:
                    parameters.append((name, value))
                elif name in decl.buffers:
                    buffers.append((name, value))
                else:
                    plain.append(prefix + name)
            elif _is_module(value, classes) and id(value) not in ancestors:
                children.append((name, value))
            elif decl is not None and name in decl.parameters | decl.buffers and value is not None:
                warnings.append(f"{prefix}{name} is not a plain tensor and was left out")
        for name, tensor in parameters + buffers:
            result[prefix + name] = tensor
        stacked = []
        for name, child in children:
            child_node = ModuleNode(child.class_path)
            node.children[name] = child_node
            stacked.append((f"{prefix}{name}.", child, child_node, ancestors | {id(child)}))
        pending.extend(reversed(stacked))  # depth-first in slot order, like state_dict()
    if undeclared:
        warnings.append(
            "no code declares " + ", ".join(sorted(undeclared)) + ": every tensor attribute "
            "of those classes was taken as a parameter"
        )
    return result, tree, plain


def _summaries(value: Any) -> list[dict[str, Any]]:
    items = value if isinstance(value, (tuple, list)) else ()
    return [
        {"name": f"c{i}", "dtype": t.dtype, "shape": list(t.shape)}
        for i, t in enumerate(items)
        if isinstance(t, TensorRef)
    ]


# -- entry point --------------------------------------------------------------------------------
def read(path: Path, probe: Probe) -> Contents:
    directory: ZipDirectory = probe.zip_directory()
    prefix = script_prefix(directory)
    if prefix is None:
        raise CorruptFileError("zip archive is not a TorchScript archive", path=path)
    if directory.find(f"{prefix}/data.pkl") is None:
        if directory.find(f"{prefix}/model.json") is not None:
            raise UnsupportedVersionError(
                "TorchScript archive from torch < 1.4 (model.json): re-save it with a newer "
                "torch.jit.save",
                path=path,
            )
        raise CorruptFileError("TorchScript archive has no data.pkl", path=path)
    warnings = [f"zip member name escapes the archive: {name!r}" for name in directory.unsafe_names]
    code, classes = _code_files(directory, prefix, warnings)
    value, facts = load_archive_pickle(directory, prefix, "data.pkl", path)
    if not isinstance(value, ObjectRecord):
        raise CorruptFileError("TorchScript data.pkl does not hold a module", path=path)
    tensors, modules, plain = state_dict(value, classes, warnings)
    details: dict[str, Any] = {"archive_prefix": prefix, **facts, "modules": modules.to_json()}
    if plain:
        details["tensor_attributes"] = plain
    if directory.find(f"{prefix}/constants.pkl") is not None:
        constants, _ = load_archive_pickle(
            directory, prefix, "constants.pkl", path, data_dir="constants"
        )
        details["constants"] = _summaries(constants)
    for member, key in (("version", "archive_version"), ("bytecode.pkl", "")):
        entry = directory.find(f"{prefix}/{member}")
        if entry is not None and key:
            details[key] = directory.read_member(entry, 64).decode("ascii", "replace").strip()
        elif entry is not None:
            details["mobile_bytecode"] = True
    return Contents(
        Format.TORCHSCRIPT,
        tensors,
        metadata=extra_files(directory, f"{prefix}/extra/"),
        details=details,
        code=code,
        warnings=warnings,
    )


def extra_files(directory: ZipDirectory, root: str) -> dict[str, Any]:
    """Files under ``root`` (``_extra_files``): small UTF-8 ones as text, others by size."""
    found: dict[str, Any] = {}
    for entry in directory.entries:
        if not entry.name.startswith(root) or entry.name in found:
            continue
        name = entry.name[len(root) :]
        if entry.size <= MAX_EXTRA_BYTES:
            try:
                found[name] = directory.read_member(entry, MAX_EXTRA_BYTES).decode("utf-8")
                continue
            except UnicodeDecodeError:
                pass
        found[name] = {"__bytes__": entry.size}
    return found


READER = FormatReader(Format.TORCHSCRIPT, sniff, read, (".pt", ".pth", ".torchscript", ".ptl"))
