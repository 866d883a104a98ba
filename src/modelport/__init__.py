"""modelport: inspect, scan and convert model files by content, without executing them."""

from __future__ import annotations

from modelport import errors as errors
from modelport._version import __version__ as __version__
from modelport.comparing.diffing import DiffReport as DiffReport
from modelport.comparing.diffing import diff as diff
from modelport.comparing.fingerprint import HashReport as HashReport
from modelport.comparing.fingerprint import fingerprint as hash
from modelport.conversion.converting import ConvertOptions as ConvertOptions
from modelport.conversion.converting import ConvertReport as ConvertReport
from modelport.conversion.converting import convert as convert
from modelport.formats.protocol import Format as Format
from modelport.loading.inspect_report import InspectReport as InspectReport
from modelport.loading.model_file import ModelFile as ModelFile
from modelport.loading.model_file import inspect as inspect
from modelport.loading.model_file import load as load
from modelport.loading.model_file import open as open
from modelport.scanning.findings import ScanReport as ScanReport
from modelport.scanning.scanner import scan as scan
from modelport.tensors import TensorRef as TensorRef
from modelport.torch_models.checking import CheckReport as CheckReport
from modelport.torch_models.checking import check as check
from modelport.torch_models.exporting import ExportReport as ExportReport
from modelport.torch_models.exporting import export as export
from modelport.torch_models.rebuilding import RebuildReport as RebuildReport
from modelport.torch_models.rebuilding import rebuild as rebuild

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
    "TensorRef",
    "__version__",
    "check",
    "convert",
    "diff",
    "errors",
    "export",
    "hash",
    "inspect",
    "load",
    "open",
    "rebuild",
    "scan",
]
