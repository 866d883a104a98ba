"""The public surface: the documented verbs and types, each from the layer that defines it; a
star import that lays nothing over the builtins; implementation modules under their own
names; and an ``import modelport`` that costs nothing until a verb is used."""

from __future__ import annotations

import builtins
import subprocess
import sys

import pytest

import modelport

# What README.md documents, and where each name is defined.
DOCUMENTED = {
    "inspect": "modelport.loading.model_file",
    "open": "modelport.loading.model_file",
    "load": "modelport.loading.model_file",
    "scan": "modelport.scanning.scanner",
    "convert": "modelport.conversion.converting",
    "diff": "modelport.comparing.diffing",
    "hash": "modelport.comparing.fingerprint",
    "check": "modelport.torch_models.checking",
    "export": "modelport.torch_models.exporting",
    "rebuild": "modelport.torch_models.rebuilding",
    "ModelFile": "modelport.loading.model_file",
    "InspectReport": "modelport.loading.inspect_report",
    "ScanReport": "modelport.scanning.findings",
    "ConvertOptions": "modelport.conversion.options",
    "ConvertReport": "modelport.conversion.converting",
    "DiffReport": "modelport.comparing.diffing",
    "HashReport": "modelport.comparing.fingerprint",
    "CheckReport": "modelport.torch_models.checking",
    "ExportReport": "modelport.torch_models.export_report",
    "RebuildReport": "modelport.torch_models.rebuilding",
    "Format": "modelport.formats.protocol",
    "TensorRef": "modelport.tensors",
    "stats": "modelport.loading.model_file",
    "card": "modelport.reporting.card",
    "StatsReport": "modelport.measuring.stats_records",
}


def test_all_is_sorted() -> None:
    assert modelport.__all__ == sorted(modelport.__all__)


@pytest.mark.parametrize(("name", "module"), sorted(DOCUMENTED.items()))
def test_each_documented_name_comes_from_its_layer(name: str, module: str) -> None:
    value = getattr(modelport, name)
    assert value.__module__ == module
    if name not in ("open", "hash"):  # kept out of __all__ (see the star import test)
        assert name in modelport.__all__


def test_every_name_in_all_is_documented_or_a_module() -> None:
    assert set(modelport.__all__) - set(DOCUMENTED) == {"__version__", "errors"}
    assert modelport.errors.__name__ == "modelport.errors"


def test_a_missing_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'scna'"):
        _ = modelport.scna  # type: ignore[attr-defined]


def test_star_import_shadows_no_builtin() -> None:
    namespace: dict[str, object] = {}
    exec("from modelport import *", namespace)
    shadowed = sorted(set(namespace) & set(dir(builtins)) - {"__builtins__"})
    assert shadowed == []
    assert namespace["scan"] is modelport.scan


def test_implementation_modules_are_reachable_under_their_own_names() -> None:
    from modelport.scanning import scanner

    assert scanner.scan is modelport.scan
    assert callable(scanner.scan_file)
    assert modelport.hash.__name__ == "fingerprint"


def test_importing_the_package_imports_no_layer() -> None:
    """A separate process: this one has imported everything already."""
    code = (
        "import sys, modelport; "
        "print(sorted(m for m in sys.modules if m.startswith('modelport') or m in "
        "('numpy', 'rich', 'torch')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['modelport', 'modelport._version']"
