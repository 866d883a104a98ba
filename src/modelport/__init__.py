"""modelport: inspect, scan and convert model files by content, without executing them.

The verbs (``inspect``, ``open``, ``load``, ``scan``, ``convert``, ``diff``, ``hash``,
``check``, ``export``, ``rebuild``, ``stats``, ``card``) and their report types are defined
in the layer that does the work and imported from there on first use, so that ``import
modelport`` stays cheap and a command pays only for its own path. ``open`` and ``hash`` are
left out of ``__all__``: a star import must not lay them over the builtins.

The layers, bottom to top (each imports only those below it): core types (``errors``,
``dtypes``, ``tensors``, ``limits``); ``transfer`` (byte movement); ``pickles`` (the one
restricted unpickler); ``tree`` (names and the one weights rule); ``formats``; ``scanning``;
``loading``; ``conversion``; ``comparing``; ``torch_models``; ``reporting`` (statistics and
the HTML report); ``fleet``; ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from modelport._version import __version__

if TYPE_CHECKING:
    from modelport import errors
    from modelport.comparing.diffing import DiffReport, diff
    from modelport.comparing.fingerprint import HashReport
    from modelport.comparing.fingerprint import fingerprint as hash  # noqa: F401 (not in __all__)
    from modelport.conversion.converting import ConvertReport, convert
    from modelport.conversion.options import ConvertOptions
    from modelport.formats.protocol import Format
    from modelport.loading.inspect_report import InspectReport
    from modelport.loading.model_file import ModelFile, inspect, load, stats
    from modelport.loading.model_file import open as open
    from modelport.measuring.stats_records import StatsReport
    from modelport.reporting.card import card
    from modelport.scanning.findings import ScanReport
    from modelport.scanning.scanner import scan
    from modelport.tensors import TensorRef
    from modelport.torch_models.checking import CheckReport, check
    from modelport.torch_models.export_report import ExportReport
    from modelport.torch_models.exporting import export
    from modelport.torch_models.rebuilding import RebuildReport, rebuild

# public name -> (defining module, name there)
_PUBLIC: dict[str, tuple[str, str]] = {
    "CheckReport": ("modelport.torch_models.checking", "CheckReport"),
    "ConvertOptions": ("modelport.conversion.options", "ConvertOptions"),
    "ConvertReport": ("modelport.conversion.converting", "ConvertReport"),
    "DiffReport": ("modelport.comparing.diffing", "DiffReport"),
    "ExportReport": ("modelport.torch_models.export_report", "ExportReport"),
    "Format": ("modelport.formats.protocol", "Format"),
    "HashReport": ("modelport.comparing.fingerprint", "HashReport"),
    "InspectReport": ("modelport.loading.inspect_report", "InspectReport"),
    "ModelFile": ("modelport.loading.model_file", "ModelFile"),
    "RebuildReport": ("modelport.torch_models.rebuilding", "RebuildReport"),
    "ScanReport": ("modelport.scanning.findings", "ScanReport"),
    "StatsReport": ("modelport.measuring.stats_records", "StatsReport"),
    "TensorRef": ("modelport.tensors", "TensorRef"),
    "card": ("modelport.reporting.card", "card"),
    "check": ("modelport.torch_models.checking", "check"),
    "convert": ("modelport.conversion.converting", "convert"),
    "diff": ("modelport.comparing.diffing", "diff"),
    "export": ("modelport.torch_models.exporting", "export"),
    "hash": ("modelport.comparing.fingerprint", "fingerprint"),
    "inspect": ("modelport.loading.model_file", "inspect"),
    "load": ("modelport.loading.model_file", "load"),
    "open": ("modelport.loading.model_file", "open"),
    "rebuild": ("modelport.torch_models.rebuilding", "rebuild"),
    "scan": ("modelport.scanning.scanner", "scan"),
    "stats": ("modelport.loading.model_file", "stats"),
}


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("modelport.errors")
    if name not in _PUBLIC:
        raise AttributeError(f"module 'modelport' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, "errors"})


__all__ = [
    "CheckReport",
    "ConvertOptions",
    "ConvertReport",
    "DiffReport",
    "ExportReport",
    "Format",
    "HashReport",
    "InspectReport",
    "ModelFile",
    "RebuildReport",
    "ScanReport",
    "StatsReport",
    "TensorRef",
    "__version__",
    "card",
    "check",
    "convert",
    "diff",
    "errors",
    "export",
    "inspect",
    "load",
    "rebuild",
    "scan",
    "stats",
]
