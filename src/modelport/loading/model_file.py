"""The Python API: ``open``, ``inspect`` and ``load``, the same verbs the CLI offers.

``open`` detects the format by content and reads headers only, and offers ``safe_open``'s
interface (``keys``, ``get_tensor``, ``get_slice``, ``metadata()``) for every format;
``inspect`` freezes that into a report; ``load`` hands back the model weights (or, with
``weights=False``, the whole checkpoint) as torch tensors, placed as ``torch.load``'s
``map_location`` places them. None of them executes anything stored in the file.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import replace
from itertools import repeat
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

from modelport.errors import (
    SuspiciousModelWarning,
    TensorNotFoundError,
    UnsafeModelError,
    UsageError,
)
from modelport.formats.protocol import Contents, Format
from modelport.formats.registry import detect
from modelport.loading import file_access, weights_only
from modelport.loading.file_access import FileMetadata, TensorSlice
from modelport.loading.inspect_report import InspectReport, TensorSummary
from modelport.loading.placement import CPU, MapLocation, Placement, place_tree
from modelport.measuring.stats_records import StatsReport
from modelport.pickles import modules
from modelport.pickles.records import ObjectRecord
from modelport.scanning import remote_inputs
from modelport.scanning.findings import ScanReport
from modelport.scanning.scanner import scan, scan_file
from modelport.tensors import TensorRef
from modelport.transfer import remote
from modelport.tree import names as trees
from modelport.tree import quantization
from modelport.tree import weights as weight_rule

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)
_MEASURING = "modelport.measuring.stats"


class ModelFile:
    """An opened model file: format, metadata, tree and lazily readable tensors.

    Use it as a context manager; ``tensors`` maps each name to a ``TensorRef`` whose
    ``numpy()`` is a zero-copy view of the file. ``keys``, ``get_tensor``, ``get_slice`` and
    ``metadata()`` behave as ``safetensors.safe_open``'s do, in the ``framework`` it was
    opened with, whatever the format.
    """

    def __init__(
        self,
        path: Path,
        contents: Contents,
        size: int,
        warnings: list[str],
        *,
        framework: str = "np",
        device: str = CPU,
    ) -> None:
        self.path = path
        self._contents = contents
        self.size_bytes = size
        self.warnings = warnings + contents.warnings
        self.tensors: Mapping[str, TensorRef] = trees.tensors_of(contents.tree)
        self._framework = file_access.framework_of(framework)
        self._device = device
        self._metadata = FileMetadata(contents.metadata)
        self._weights: dict[str, TensorRef] | None = None

    @property
    def format(self) -> Format:
        return self._contents.format

    @property
    def metadata(self) -> FileMetadata:
        """The file's metadata; a dict that ``metadata()`` also reads, as ``safe_open``'s."""
        return self._metadata

    def keys(self) -> list[str]:
        """Every tensor in the file, named as ``inspect --tensors`` names them."""
        return list(self.tensors)

    def get_tensor(self, name: str, *, dequantize: bool = False) -> Any:
        """The tensor ``name`` (a numpy array, or a torch tensor for ``framework="pt"``).

        Names are those of ``keys()``, or those ``load`` gives the same tensors (a
        checkpoint's weights without their ``state_dict.`` key). GGML block-quantized tensors
        need ``dequantize=True`` (float32, by gguf-py's reference dequantizer)."""
        ref = self._find(name)
        return file_access.tensor_value(
            ref, self._framework, self._device, dequantize_blocks=dequantize
        )

    def get_slice(self, name: str) -> TensorSlice:
        """The tensor ``name``, read only where indexed: ``get_slice(name)[0:2, :]``."""
        return TensorSlice(name, self._find(name), self._framework, self._device)

    def _find(self, name: str) -> TensorRef:
        found = self.tensors.get(name)
        if found is not None:
            return found
        if self._weights is None:
            self._weights = self.weights().tensors
        return self._weights.get(name) or self.tensor(name)

    @property
    def tree(self) -> Any:
        return self._contents.tree

    @property
    def details(self) -> dict[str, Any]:
        return self._contents.details

    @property
    def code(self) -> dict[str, str]:
        return self._contents.code

    def tensor(self, name: str) -> TensorRef:
        """The tensor called ``name``; ``TensorNotFoundError`` (a ``KeyError``) names the
        closest names the file does hold."""
        found = self.tensors.get(name)
        if found is None:
            close = difflib.get_close_matches(name, list(self.tensors), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise TensorNotFoundError(
                f"{self.path}: no tensor {name!r} among its {len(self.tensors)}{hint}"
            )
        return found

    def weights(self, *, ema: bool = False) -> weight_rule.WeightSelection:
        """The model weights, by the rule ``load`` and ``convert`` share."""
        return weight_rule.select_weights(self.tree, ema=ema)

    def quantized(self, tensors: Mapping[str, TensorRef]) -> quantization.Quantization:
        """The quantized layers among ``tensors`` (the weights, or a selection of them), as
        their names, dtypes and shapes and the ``config.json`` beside the file tell."""
        return quantization.recognise(tensors, quantization.config_beside(self.path))

    def module_tree(self) -> dict[str, Any] | None:
        """Class paths of a pickled module and its submodules, if the file holds one."""
        if "modules" in self.details:
            found: dict[str, Any] = self.details["modules"]
            return found
        root = self.tree
        if isinstance(root, ObjectRecord) and modules.is_module(root):
            return modules.module_tree(root).to_json()
        if isinstance(root, dict) and any(map(isinstance, root.values(), repeat(ObjectRecord))):
            nested = {
                str(key): modules.module_tree(value).to_json()
                for key, value in root.items()
                if isinstance(value, ObjectRecord) and modules.is_module(value)
            }
            return nested or None
        return None

    def scan(self) -> ScanReport:
        """The scanner's verdict on this file; opening never refuses, this says what to fear."""
        return scan(self.path)

    def stats(self, *, threads: int | None = None) -> StatsReport:
        """Statistics of every tensor's values, computed in bounded memory on ``threads``
        threads (by default the CPUs this process may use): see ``TensorStats``. Reads the
        values and executes nothing, so like ``open`` it does not refuse a file the scanner
        calls unsafe. The statistics need numpy and ml_dtypes, so they are imported here, on
        first use, not with every ``open``."""
        measuring = importlib.import_module(_MEASURING)
        weights = {id(ref) for ref in self.weights().tensors.values()}
        names = {name for name, ref in self.tensors.items() if id(ref) in weights}
        found: StatsReport = measuring.report(
            self.path, self.format.value, self.tensors, names, threads=threads
        )
        return found

    def close(self) -> None:
        if self._contents.close is not None:
            self._contents.close()

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ModelFile {self.path.name} {self.format} {len(self.tensors)} tensors>"


def open(path: str | Path, framework: str = "np", device: str = CPU) -> ModelFile:
    """Open a model file or directory by content; reads headers and pickles, no tensor data.

    ``framework`` (``"np"`` or ``"pt"``) and ``device`` say what ``get_tensor`` and
    ``get_slice`` give, as for ``safetensors.safe_open``."""
    file_access.framework_of(framework)  # refused before anything is read
    reader, probe, warnings = detect(path)
    contents = reader.contents(probe)
    size = probe.size if not probe.is_dir else _directory_size(probe.path)
    return ModelFile(probe.path, contents, size, warnings, framework=framework, device=device)


def stats(path: str | Path | ModelFile, *, threads: int | None = None) -> StatsReport:
    """``modelport.stats``: ``ModelFile.stats`` of ``path``, opened and closed here, or of a
    file already opened with ``open``, which is read and left open."""
    if isinstance(path, ModelFile):
        return path.stats(threads=threads)
    with open(path) as model:
        return model.stats(threads=threads)


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def inspect(path: str | Path) -> InspectReport:
    """A frozen summary of a model file: format, tensors, parameters, metadata, extras. A
    URL (``s3://``, ``https://``, any fsspec protocol) is read by byte range: its headers."""
    if remote.is_url(path):
        with remote_inputs.local_copy(str(path)) as copy:
            found = inspect(copy.path)
            return replace(found, path=copy.url, bytes_fetched=copy.bytes_fetched)
    with open(path) as model:
        selection = model.weights()
        quantized = model.quantized(selection.tensors)
        tensors = _summaries(model.tensors, quantized)
        return InspectReport(
            path=str(model.path),
            format=model.format.value,
            size_bytes=model.size_bytes,
            parameters=quantized.parameter_count(weight_rule.parameter_tensors(selection.tensors)),
            tensors=tensors,
            metadata=dict(model.metadata),
            extras=trees.extras(model.tree)
            if not isinstance(model.tree, dict) or not _all_tensors(model.tree)
            else {},
            aliases=tuple(tuple(group) for group in trees.aliases(dict(model.tensors))),
            warnings=tuple(model.warnings),
            details=dict(model.details),
            modules=model.module_tree(),
            weights_source=selection.source,
            weights_note=selection.note,
            code_files=tuple(model.code),
            safety=_safety(model),
            bytes_by_dtype=trees.stored_bytes_by_dtype(dict(model.tensors)),
            quantization=quantized.summary(),
            weights_only=_weights_only(model),
        )


def _weights_only(model: ModelFile) -> dict[str, Any] | None:
    if model.format not in (Format.TORCH_ZIP, Format.TORCH_LEGACY):
        return None
    zipped = model.format is Format.TORCH_ZIP
    return weights_only.answer(model.tree, model.path, torch_zip_file=zipped)


def _safety(model: ModelFile) -> dict[str, Any]:
    """The scanner's verdict, shown beside the contents: inspect never refuses a file. The
    scan of a single file reuses what the reader gave, instead of reading it again."""
    if model.path.is_dir():
        report = scan(model.path)
    else:
        judged = scan_file(model.path, read=model._contents)
        report = ScanReport(judged.verdict, (judged,))
    findings = [f.to_json() for f in report.serious]
    return {"verdict": report.verdict, "findings": findings}


def _summaries(
    tensors: Mapping[str, TensorRef], quantized: quantization.Quantization
) -> tuple[TensorSummary, ...]:
    """Each tensor as the report lists it; a quantized layer's parts say what they are (asked
    only where some layer is quantized: a million plain names would each ask for nothing)."""
    if not quantized.layers:
        return tuple(
            [
                TensorSummary(name, t.dtype, t.shape, t.nbytes, t.note or "")
                for name, t in tensors.items()
            ]
        )
    return tuple(
        [
            TensorSummary(name, t.dtype, t.shape, t.nbytes, t.note or quantized.note_for(name))
            for name, t in tensors.items()
        ]
    )


def _all_tensors(tree: dict[Any, Any]) -> bool:
    return all(map(isinstance, tree.values(), repeat(TensorRef)))


@overload
def load(
    path: str | Path,
    map_location: MapLocation = None,
    *,
    strip_prefix: str | None = None,
    dequantize: bool = False,
    ema: bool = False,
    allow_unsafe: bool = False,
    device: str | None = None,
    weights: Literal[True] = True,
) -> dict[str, torch.Tensor]: ...


@overload
def load(
    path: str | Path,
    map_location: MapLocation = None,
    *,
    strip_prefix: str | None = None,
    dequantize: bool = False,
    ema: bool = False,
    allow_unsafe: bool = False,
    device: str | None = None,
    weights: bool,
) -> Any: ...


def load(
    path: str | Path,
    map_location: MapLocation = None,
    *,
    strip_prefix: str | None = None,
    dequantize: bool = False,
    ema: bool = False,
    allow_unsafe: bool = False,
    device: str | None = None,
    weights: bool = True,
) -> Any:
    """The model weights as torch tensors, from any readable format, executing nothing.

    Checkpoints are unwrapped and pickled modules give their state_dict (see
    ``tree.weights.select_weights``). Tensors that shared storage in the file share it here too.
    ``map_location`` places them as ``torch.load``'s does (a device, a dict, a callable; the
    CPU by default); ``device`` is the older spelling of a device there. ``strip_prefix``
    removes a prefix from every name that carries it, or with ``"auto"`` the wrapper prefix
    every name carries (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``), as
    ``convert --strip-prefix`` does. ``dequantize`` turns GGML block-quantized tensors into
    float32. The file is scanned first: an ``unsafe`` verdict raises ``UnsafeModelError``
    unless ``allow_unsafe``; a ``suspicious`` one warns (``SuspiciousModelWarning``).

    ``weights=False`` gives the whole checkpoint instead, as ``torch.load(weights_only=True)``
    gives it: tensors, dicts, lists, tuples and plain values as themselves, anything else as
    the inert record the reader made of it (``modelport.pickles.records``), never called.
    ``strip_prefix`` and ``ema`` choose among weights, so they are refused there.
    """
    if device is not None and map_location is not None:
        raise UsageError(
            "pass map_location or device, not both (device is map_location's old name)"
        )
    if not weights and (strip_prefix is not None or ema):
        chosen = "strip_prefix" if strip_prefix is not None else "ema"
        raise UsageError(
            f"{chosen} selects and names the model weights; with weights=False the whole "
            "checkpoint comes back as stored, so leave it out"
        )
    where = device if device is not None else map_location
    check_safety(path, allow_unsafe=allow_unsafe)
    with open(path) as model:
        devices = model.details.get("devices")
        saved = devices[0] if isinstance(devices, list) and len(devices) == 1 else CPU
        placement = Placement(where, default_location=str(saved), dequantize=dequantize)
        if not weights:
            return place_tree(model.tree, placement)
        selection = model.weights(ema=ema)
        if selection.note:
            log.info("%s: %s", model.path.name, selection.note)
        named = _stripped(selection.tensors, strip_prefix)
        return {name: placement.tensor(ref) for name, ref in named.items()}


def _stripped(tensors: dict[str, TensorRef], prefix: str | None) -> dict[str, TensorRef]:
    """Names without ``prefix`` (``"auto"``: the wrapper prefix all of them carry, found by
    the rule ``convert`` and ``diff`` use)."""
    strip = trees.wrapper_prefix(tensors) if prefix == "auto" else prefix
    if not strip:
        return tensors
    renamed: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        new = name.removeprefix(strip)
        if new in renamed:
            raise UsageError(f"stripping {strip!r} gives two tensors the name {new!r}")
        renamed[new] = ref
    return renamed


def check_safety(path: str | Path, *, allow_unsafe: bool) -> None:
    """The gate every command that hands out tensors goes through (load, convert, ...)."""
    report = scan(path)
    if report.verdict == "unsafe" and not allow_unsafe:
        raise UnsafeModelError(path, report.summary(), findings=report.serious)
    if report.verdict in ("suspicious", "unsafe"):
        warnings.warn(
            f"{path}: {report.verdict}: {report.summary()}", SuspiciousModelWarning, stacklevel=3
        )
