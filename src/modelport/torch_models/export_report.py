"""What ``export`` reports: the files written, the example inputs they were built from, and
how the exported model's outputs compared with eager."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelport.torch_models.agreement import OutputCheck, finite

RUNTIMES = {  # format -> what verification runs the exported file in
    "onnx": "onnxruntime",
    "torchscript": "torch.jit.load",
    "pt2": "torch.export.load",
    "executorch": "ExecuTorch's runtime",
    "tflite": "LiteRT's interpreter",
}


@dataclass(frozen=True)
class ExampleInput:
    """One example input as exported: name, shape, dtype, its dynamic axes and whether it
    is passed to ``forward`` by keyword (else by position)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dynamic: tuple[tuple[int, str], ...] = ()
    keyword: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "dynamic": {str(axis): dim for axis, dim in self.dynamic},
            "keyword": self.keyword,
        }


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` wrote and how it compared with eager (``verified`` None: not checked)."""

    path: Path
    format: str
    files: tuple[Path, ...]
    verified: bool | None
    max_abs_error: float
    outputs: tuple[OutputCheck, ...]
    seconds: float
    warnings: tuple[str, ...]
    model: str = ""  # the exported module's class
    exporter: str | None = None  # ONNX only: "dynamo" or "legacy"
    opset: int | None = None
    inputs: tuple[ExampleInput, ...] = ()
    sizes: tuple[int, ...] = ()  # bytes of each of ``files``
    runtime: str = ""  # what verified it (``RUNTIMES``); empty when not verified

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "sizes": list(self.sizes),
            "model": self.model,
            "exporter": self.exporter,
            "opset": self.opset,
            "inputs": [i.to_json() for i in self.inputs],
            "verified": self.verified,
            "runtime": self.runtime,
            "max_abs_error": finite(self.max_abs_error),
            "outputs": [o.to_json() for o in self.outputs],
            "seconds": self.seconds,
            "warnings": list(self.warnings),
        }
