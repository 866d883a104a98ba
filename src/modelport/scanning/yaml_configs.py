"""YAML configurations, judged for the code their loaders reach, with nothing constructed.

PyYAML's unsafe loaders (``yaml.unsafe_load``, ``yaml.load`` with ``Loader=yaml.Loader``)
build what ``!!python/...`` tags name, the way pickle builds what its opcodes name: a tag
is read as the pickle opcode it amounts to, its name as the global, and judged by the
pickle scanner's own rule (``pickles.rules``). Config loaders import and call the dotted
names of a few keys: Hydra's ``instantiate`` every ``_target_`` (NeMo's ``restore_from``
instantiates ``model_config.yaml`` so), NeMo the ``cls`` of its old configs (rewritten to
``_target_``) and the ``target`` model class at the top, jsonargparse (LightningCLI's
``config.yaml``) every ``class_path``. Each such name is judged as a global the file calls:
a gadget or a standard-library or third-party function is unsafe, a library class is worth a
look, and the classes the pickle allowlist takes (``torch.nn`` modules, optimizers) are
information, as are the framework classes ``config_classes`` names (Lightning callbacks
and file loggers, torch's learning-rate schedulers, NeMo's neural modules; its docstring
says why each is inert and why a NeMo model class is not). Loaders look a dotted name up
attribute by attribute past the last module they can import (Hydra's ``_locate``,
jsonargparse's ``import_object``), so a name that reaches a known gadget through any of its
parts (``lightning.pytorch.callbacks.os.system``) is that gadget.

JSON configurations are YAML to these loaders (``OmegaConf.load``, jsonargparse) and are
judged by the same rule on what ``json.loads`` made of them (``document_findings``): for
text that ``json.loads`` reads, PyYAML's node graph holds the same keys and strings, and
composing megabytes of a tokenizer's vocabulary in pure Python would take seconds.

The text is composed into nodes by both of PyYAML's parsers (the pure-Python one that
OmegaConf and the unsafe loaders use, and libyaml's), so a file that one reads differently
from the other is judged as each reads it. Composing resolves every spelling of a tag
(``!!``, ``%TAG`` handles, verbatim ``!<...>``) and of a key (quotes, escapes); aliases stay
shared nodes, each visited once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import yaml

from modelport.gadgets import gadget
from modelport.pickles import policy
from modelport.pickles.interface import Step
from modelport.pickles.rules import judge_symbol
from modelport.pickles.symbols import Symbol, Usage
from modelport.scanning import config_classes
from modelport.scanning.findings import Finding
from modelport.severity import Severity

# Pure-Python composing takes some seconds a megabyte (0.3 s of CPU for a 22 KB NeMo-sized
# config on a busy machine); real configs are kilobytes.
MAX_YAML_BYTES: Final = 1 << 20
RULE = "config-target"
TAG_RULE = "yaml-python-tag"
_PYTHON_TAG = "tag:yaml.org,2002:python/"
_STR_TAG = "tag:yaml.org,2002:str"
# Values no loader takes for a name (Hydra and jsonargparse reject a target that is not a
# string): a number, a boolean or null under a target key names nothing, as a tokenizer's
# vocabulary may hold "_target_" as a token with its id.
_NOT_NAMES = frozenset(f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "bool", "null"))
# Dotted names longer than any module path: each split of a name is tried for a gadget.
_MAX_NAME_PARTS = 32
# What PyYAML's constructors make plain values of (Lightning's hparams.yaml holds
# ``!!python/tuple``): nothing imported, nothing called.
_SCALAR_TAGS = ("none", "bool", "str", "unicode", "bytes", "int", "long", "float", "complex")
_VALUE_TAGS = frozenset((*_SCALAR_TAGS, "list", "dict", "tuple"))
# The tags that name code, each as the pickle opcode it is (PyYAML's constructor.py).
_CODE_TAGS: Final = (
    ("object/apply:", Usage.CALLED, "calls"),  # callable(*args, **kwds): REDUCE
    ("object/new:", Usage.INSTANTIATED, "instantiates"),  # cls.__new__(cls, *args): NEWOBJ
    ("object:", Usage.INSTANTIATED, "instantiates"),  # cls.__new__(cls), then state: BUILD
    ("name:", Usage.REFERENCED, "imports"),  # the object itself: GLOBAL
)
# Keys whose value a loader imports and calls, and the loader. ``cls`` and ``target`` are
# plain words in other configs: only a dotted name counts there, ``target`` only at the top.
_TARGET_KEYS: Final = {
    "_target_": "Hydra's instantiate (NeMo's restore_from, Hydra training configs)",
    "class_path": "jsonargparse (LightningCLI configs)",
    "cls": "NeMo (a Hydra 0.x cls, which it rewrites to _target_)",
}
_TOP = "target"
_TOP_LOADER = "NeMo's restore_from (the model class a model_config.yaml names)"
_KEY_WORDS = frozenset((*_TARGET_KEYS, _TOP))
# Bytes without which no tag and no spelling of a target key can occur (escapes need a
# backslash; tags an exclamation mark): a file without any of them is not composed at all.
_NEEDLES = (b"!", b"\\", b"target", b"class_path", b"cls")
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# Packages that re-export the classes the pickle allowlist lists under their defining
# modules: ``torch.nn.Linear`` is ``torch.nn.modules.linear.Linear``.
_REEXPORTING = ("torch.nn", "torch.optim")


def _aliases() -> dict[tuple[str, str], tuple[str, str]]:
    named: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for module, name in policy.SAFE_CLASSES:
        for package in _REEXPORTING:
            if module.startswith(package + ".") and "." not in name:
                named.setdefault((package, name), []).append((module, name))
    return {alias: keys[0] for alias, keys in named.items() if len(keys) == 1}


ALIASES: Final = _aliases()


def findings(data: bytes, member: str, declared: bool = True) -> list[Finding]:
    """What loading the YAML text ``data`` makes its loaders import and run; ``member``
    locates the findings (the file, or the archive member). ``declared``: the file is YAML
    by its name; a text that is YAML only by its content (``config.cfg``, ``hparams``) and
    that no parser reads is no config, and its caller bounds its size."""
    if not data.startswith(_UTF16_BOMS) and not any(n in data for n in _NEEDLES):
        return []
    if declared and len(data) > MAX_YAML_BYTES:
        return [
            Finding(
                Severity.HIGH,
                "not-analysed",
                member,
                f"a YAML configuration of {len(data)} bytes, more than the {MAX_YAML_BYTES} "
                "modelport composes: the code its tags and _target_ keys may name was not "
                "judged, though loaders read it whole; find out why it is so large",
            )
        ]
    judged: dict[tuple[str, str, str], Finding] = {}
    failures: list[BaseException] = []
    for loader in _LOADERS:
        try:
            for document in yaml.compose_all(data, Loader=loader):
                for finding in _document_findings(document, member):
                    judged.setdefault(_identity(finding), finding)
        except (yaml.YAMLError, RecursionError) as exc:
            failures.append(exc)
    found = sorted(judged.values(), key=lambda f: (-f.severity.rank, f.message))
    if len(failures) == len(_LOADERS) and (declared or found):
        found.append(_unparsed(failures, member))
    return found


def document_findings(
    document: object, mappings: Sequence[dict[str, Any]], member: str
) -> list[Finding]:
    """What a JSON configuration, as ``json.loads`` decoded it, makes Hydra or jsonargparse
    import and run: each target key judged by the rule YAML's are. ``mappings`` are the
    document's objects that hold a target key, handed over by the decoder, so that a
    tokenizer's vocabulary is never walked in Python; the document is walked only to locate
    a finding."""
    judged: dict[tuple[str, str, str], Finding] = {}
    places: dict[int, str] = {}
    for mapping in mappings:
        for word in sorted(_KEY_WORDS.intersection(mapping)):
            value = mapping[word]
            loader = _loader(word, value, mapping is document)
            if not loader:
                continue
            places = places or _places(document)
            where = f"at {places.get(id(mapping), 'an object')}"
            finding = _target(word, value, where, loader, member)
            judged.setdefault(_identity(finding), finding)
    return sorted(judged.values(), key=lambda f: (-f.severity.rank, f.message))


def _places(document: object) -> dict[int, str]:
    """Where each object of a decoded JSON document is (``model.layers[0]``); no
    recursion."""
    places: dict[int, str] = {}
    stack: list[tuple[object, str]] = [(document, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            places[id(node)] = where or "the top"
            items: Iterable[tuple[object, object]] = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            continue
        for key, value in items:
            if isinstance(value, (dict, list)):
                step = f"[{key}]" if isinstance(key, int) else f".{key}" if where else str(key)
                stack.append((value, where + step))
    return places


def _identity(finding: Finding) -> tuple[str, str, str]:
    """Findings of one name used one way are one finding: the first place it is named."""
    return finding.rule, finding.global_name or finding.message, finding.usage


def _unparsed(failures: list[BaseException], member: str) -> Finding:
    """Every parser stopped: loaders built on PyYAML fail there too, after constructing the
    documents before it (judged above); a deeper stack than this scan's reads on."""
    if any(isinstance(exc, RecursionError) for exc in failures):
        return Finding(
            Severity.HIGH,
            "not-analysed",
            member,
            "the YAML nests deeper than modelport's parser follows: a loader with a deeper "
            "stack reads the rest, which was not judged",
        )
    problem = " ".join(str(failures[0]).split())
    return Finding(
        Severity.MEDIUM,
        "yaml-unparsed",
        member,
        f"PyYAML cannot parse this YAML ({problem}): loaders built on it fail there too, "
        "other parsers may read it and what it names; not judged safe",
    )


def _document_findings(root: Any, member: str) -> Iterator[Finding]:
    for node, top in _nodes(root):
        tag = str(node.tag)
        if tag.startswith(_PYTHON_TAG) and tag.removeprefix(_PYTHON_TAG) not in _VALUE_TAGS:
            yield _python_tag(tag.removeprefix(_PYTHON_TAG), node, member)
        if not isinstance(node, yaml.MappingNode):
            continue
        for key, value in node.value:
            word = str(key.value) if isinstance(key, yaml.ScalarNode) else ""
            name = _node_name(value)
            plain = isinstance(value, yaml.ScalarNode) and value.tag == _STR_TAG
            loader = _loader(word, name, top, plain) if word in _KEY_WORDS else ""
            if loader:
                yield _target(word, name, f"line {value.start_mark.line + 1}", loader, member)


def _node_name(node: Any) -> object:
    """A value as the rule reads it: the text of a scalar (whatever its tag: a python tag is
    judged on its own), the node itself for a list or mapping, None for what names nothing."""
    if not isinstance(node, yaml.ScalarNode):
        return node
    return None if node.tag in _NOT_NAMES else str(node.value)


def _loader(word: str, value: object, top: bool, plain: bool = True) -> str:
    """The loader that imports and calls what ``word`` names, or "" when it names nothing:
    ``cls`` and ``target`` are plain words in other configs, so only a dotted string counts
    there (``plain``: not a scalar under another tag), ``target`` only at the top."""
    if value is None or isinstance(value, (bool, int, float)):
        return ""
    if word in ("cls", _TOP):
        dotted = plain and isinstance(value, str) and "." in value
        if not dotted or (word == _TOP and not top):
            return ""
        return _TARGET_KEYS.get(word) or _TOP_LOADER
    return _TARGET_KEYS.get(word, "")


def _nodes(root: Any) -> Iterator[tuple[Any, bool]]:
    """Every node once, with whether it is the document's top mapping: an alias is the
    node it names, so shared and self-containing nodes end the walk; no recursion."""
    seen: set[int] = set()
    stack = [(root, True)]
    while stack:
        node, top = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node, top
        if isinstance(node, yaml.MappingNode):
            stack.extend((part, False) for pair in node.value for part in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, False) for item in node.value)


def _python_tag(suffix: str, node: Any, member: str) -> Finding:
    """A tag that names code, judged as the pickle opcode it amounts to."""
    line = node.start_mark.line + 1
    where = f"line {line}: !!python/{suffix}"
    loaders = "yaml.unsafe_load (yaml.load with Loader=yaml.Loader or UnsafeLoader)"
    for prefix, usage, verb in _CODE_TAGS:
        if suffix.startswith(prefix):
            name = suffix.removeprefix(prefix)
            module, _, attribute = name.rpartition(".")  # find_python_name's split
            args: tuple[Any, ...] = () if _no_arguments(node) else (node,)
            severity, why = _judge(module or "builtins", attribute, usage, args, line)
            message = f"{where}: {loaders} {verb} {name}; as a pickle global: {why}"
            return Finding(severity, TAG_RULE, member, message, global_name=name, usage=usage.value)
    if suffix.startswith("module:"):
        name = suffix.removeprefix("module:")
        message = f"{where}: {loaders} imports the module {name}, which runs its top-level code"
        return Finding(Severity.MEDIUM, TAG_RULE, member, message, global_name=name)
    message = f"{where}: a python tag PyYAML's loaders do not know (they fail on it)"
    return Finding(Severity.MEDIUM, TAG_RULE, member, message, global_name=suffix)


def _no_arguments(node: Any) -> bool:
    """``!!python/object/new:X`` with no ``args`` or ``kwds``: ``X.__new__(X)`` alone."""
    if isinstance(node, yaml.SequenceNode):
        return not node.value
    if isinstance(node, yaml.MappingNode):
        return not any(key.value in ("args", "kwds") for key, _ in node.value)
    return not node.value


def _target(key: str, value: object, where: str, loader: str, member: str) -> Finding:
    """A name a config loader imports and calls, judged as the pickle global it would be."""
    called = Usage.CALLED.value
    if not isinstance(value, str):
        message = f"{where}: {key} is not a dotted name, so its callable cannot be judged"
        return Finding(Severity.MEDIUM, RULE, member, message, global_name="?", usage=called)
    name = str(value)
    where = f"{where}: {key}: {name}"
    if "${" in name:
        message = (
            f"{where}: {loader} resolves the interpolation as it loads, then imports and "
            "calls what it names: the callable is hidden"
        )
        return Finding(Severity.HIGH, RULE, member, message, global_name=name, usage=called)
    parts = name.split(".")
    if len(parts) == 1:
        message = f"{where}: {loader} imports the module {name} or looks the name up"
        return Finding(Severity.MEDIUM, RULE, member, message, global_name=name, usage=called)
    severity, why = _reached_gadget(parts) or _framework(name) or _judge_dotted(parts)
    message = f"{where}: {loader} imports and calls it; {why}"
    return Finding(severity, RULE, member, message, global_name=name, usage=called)


def _framework(name: str) -> tuple[Severity, str] | None:
    """A framework class ``config_classes`` names, by its exact spelling."""
    if name in config_classes.INERT:
        return Severity.INFO, config_classes.INERT[name]
    if name in config_classes.WORTH_A_LOOK:
        return Severity.MEDIUM, config_classes.WORTH_A_LOOK[name]
    return None


def _reached_gadget(parts: list[str]) -> tuple[Severity, str] | None:
    """The known gadget a dotted name reaches through any of its parts: loaders import what
    they can and look the rest up as attributes, so ``a.b.os.system`` is ``os.system``
    wherever ``a.b`` imported ``os``; a name past any module path's depth is not looked
    through."""
    if len(parts) > _MAX_NAME_PARTS:
        return Severity.HIGH, f"a dotted name of {len(parts)} parts, deeper than any module"
    for start in range(len(parts) - 1):
        for end in range(start + 1, len(parts)):
            does = gadget(".".join(parts[start:end]), parts[end])
            if does is not None:
                reached = ".".join(parts[start : end + 1])
                return Severity.CRITICAL, f"it reaches {reached}, which {does}"
    return None


def _judge_dotted(parts: list[str]) -> tuple[Severity, str]:
    """A dotted name split where pickle would name it (module, then the first class and
    what follows it) and judged as that global."""
    first = next((i for i in range(1, len(parts)) if policy.names_a_class(parts[i])), None)
    split = first if first is not None else len(parts) - 1
    module, attribute = ".".join(parts[:split]), ".".join(parts[split:])
    severity, why = _judge(module, attribute, Usage.CALLED, (".".join(parts),), 0)
    return severity, f"as a pickle global: {why}"


def _judge(
    module: str, name: str, usage: Usage, args: tuple[Any, ...], line: int
) -> tuple[Severity, str]:
    """A dotted name as the pickle global it would be, used as the loader uses it, judged by
    the pickle scanner's rule; a class the pickle allowlist takes (under its defining module
    or the package that re-exports it) is information."""
    key = ALIASES.get((module, name), (module, name))
    at = Step(line, "yaml", _NoBytes())
    symbol = Symbol(key[0], key[1], at)
    if usage is Usage.CALLED:
        symbol.calls.append((at, args))
    elif usage is Usage.INSTANTIATED:
        symbol.news.append((at, args))
    found = judge_symbol(symbol, torchscript=False)
    worst = max(found, key=lambda f: f.severity.rank, default=None)
    if key in policy.SAFE_CLASSES and (worst is None or worst.severity is not Severity.CRITICAL):
        return Severity.INFO, f"{'.'.join(key)}: {policy.SAFE_CLASSES[key]}"
    if worst is None:
        return Severity.INFO, f"{'.'.join(key)} is on the allowlist"
    return worst.severity, worst.message


class _NoBytes:
    """The cursor of a name in YAML text: no raw bytes follow it for a resolver to read."""

    __slots__ = ()

    @property
    def position(self) -> int:
        return 0

    @property
    def frame_end(self) -> int:
        return 0

    def read(self, n: int) -> memoryview:
        return memoryview(b"")


# Both of PyYAML's parsers, as loaders choose either: the pure-Python one (OmegaConf,
# yaml.unsafe_load, full_load) and libyaml's, where PyYAML was built with it.
_LOADERS: Final = tuple(
    loader for loader in (yaml.SafeLoader, getattr(yaml, "CSafeLoader", None)) if loader is not None
)
