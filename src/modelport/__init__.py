"""modelport: inspect, scan and convert model files by content, without executing them."""

from __future__ import annotations

from modelport import errors as errors
from modelport._version import __version__ as __version__
from modelport.api import ModelFile as ModelFile
from modelport.api import inspect as inspect
from modelport.api import load as load
from modelport.api import open as open
from modelport.check import CheckReport as CheckReport
from modelport.check import check as check
from modelport.convert import ConvertOptions as ConvertOptions
from modelport.convert import ConvertReport as ConvertReport
from modelport.convert import convert as convert
from modelport.diff import DiffReport as DiffReport
from modelport.diff import diff as diff
from modelport.export import ExportReport as ExportReport
from modelport.export import export as export
from modelport.fingerprint import HashReport as HashReport
from modelport.fingerprint import fingerprint as hash
from modelport.formats import Format as Format
from modelport.rebuild import RebuildReport as RebuildReport
from modelport.rebuild import rebuild as rebuild
from modelport.report import InspectReport as InspectReport
from modelport.scan import scan as scan
from modelport.scan_report import ScanReport as ScanReport
from modelport.tensors import TensorRef as TensorRef

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
