"""The layers of docs/architecture.md, checked on the source: a module imports only modules of
its own layer or of layers below it, at the top of the file or inside a function alike."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import modelport

# Bottom to top. A module belongs to the first entry its dotted name starts with.
LAYERS = (
    (
        "modelport.errors",
        "modelport.limits",
        "modelport.dtypes",
        "modelport.tensors",
        "modelport._version",
        "modelport.severity",
        "modelport.gadgets",
    ),
    ("modelport.transfer",),
    ("modelport.pickles",),
    ("modelport.tree",),
    ("modelport.formats",),
    ("modelport.scanning",),
    ("modelport.measuring",),
    ("modelport.loading",),
    ("modelport.conversion",),
    ("modelport.comparing",),
    ("modelport.torch_models",),
    ("modelport.reporting",),
    ("modelport.fleet",),
    ("modelport.cli", "modelport.__main__"),
)
MODULE_NAME = re.compile(r"modelport(\.[a-z_][a-z0-9_]*)+")
FACADE = {"modelport"}  # the package itself: the verbs, each imported on first use
ROOT = Path(modelport.__file__).parent


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and the docs")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, package: str) -> set[str]:
    """Every modelport name ``path`` (a module of ``package``) imports, wherever the import
    statement stands, and every module it names in a string for ``importlib`` to import on
    first use."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if MODULE_NAME.fullmatch(node.value) and _is_module(node.value):
                names.add(node.value)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == "modelport"}


def _is_module(name: str) -> bool:
    """Whether a dotted name is one of the package's modules (not, say, a metadata key)."""
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_module_imports_only_its_layer_and_those_below() -> None:
    checked = 0
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        if name in FACADE:
            continue
        own = layer_of(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target in imported(path, package) - FACADE:
            if layer_of(target) > own:
                upward.append(f"{name} -> {target}")
        checked += 1
    assert upward == []
    assert checked > 90  # every module of the package was read


def test_importing_a_higher_layer_is_caught(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text(
        "import importlib\n"
        "def f():\n    from ..cli import main\n"
        "def g():\n    return importlib.import_module('modelport.fleet.pool')\n"
    )
    found = imported(module, "modelport.formats")
    assert "modelport.cli.main" in found
    assert "modelport.fleet.pool" in found
    assert layer_of("modelport.cli.main") > layer_of("modelport.formats.npy")
