"""modelport: inspect, scan and convert model files by content, without executing them."""

from __future__ import annotations

from modelport import errors as errors
from modelport.api import ModelFile as ModelFile
from modelport.api import inspect as inspect
from modelport.api import load as load
from modelport.api import open as open
from modelport.formats import Format as Format
from modelport.report import InspectReport as InspectReport
from modelport.scan import ScanReport as ScanReport
from modelport.scan import scan as scan
from modelport.tensors import TensorRef as TensorRef

__version__ = "0.1.0"

__all__ = [
    "Format",
    "InspectReport",
    "ModelFile",
    "ScanReport",
    "TensorRef",
    "__version__",
    "errors",
    "inspect",
    "load",
    "open",
    "scan",
]
