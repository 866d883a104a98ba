"""The Python API: ``open``, ``inspect`` and ``load``, the same verbs the CLI offers.

``open`` detects the format by content and reads headers only; ``inspect`` freezes that into
a report; ``load`` hands back the model weights as torch tensors. None of them executes
anything stored in the file.
"""

from __future__ import annotations

import builtins
import difflib
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from modelport import dtypes
from modelport.errors import SuspiciousModelWarning, TensorNotFoundError, UnsafeModelError
from modelport.formats.protocol import Contents, Format
from modelport.formats.registry import detect
from modelport.loading.inspect_report import InspectReport, TensorSummary
from modelport.pickles import modules
from modelport.pickles.records import ObjectRecord
from modelport.scanning.findings import ScanReport
from modelport.scanning.scanner import scan
from modelport.tensors import TensorRef, contiguous_strides
from modelport.tree import names as trees
from modelport.tree import weights as weight_rule

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)


class ModelFile:
    """An opened model file: format, metadata, tree and lazily readable tensors.

    Use it as a context manager; ``tensors`` maps each name to a ``TensorRef`` whose
    ``numpy()`` is a zero-copy view of the file.
    """

    def __init__(self, path: Path, contents: Contents, size: int, warnings: list[str]) -> None:
        self.path = path
        self._contents = contents
        self.size_bytes = size
        self.warnings = warnings + contents.warnings
        self.tensors: Mapping[str, TensorRef] = trees.tensors_of(contents.tree)

    @property
    def format(self) -> Format:
        return self._contents.format

    @property
    def metadata(self) -> dict[str, Any]:
        return self._contents.metadata

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

    def module_tree(self) -> dict[str, Any] | None:
        """Class paths of a pickled module and its submodules, if the file holds one."""
        if "modules" in self.details:
            found: dict[str, Any] = self.details["modules"]
            return found
        root = self.tree
        if isinstance(root, ObjectRecord) and modules.is_module(root):
            return modules.module_tree(root).to_json()
        if isinstance(root, dict):
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


def open(path: str | Path) -> ModelFile:
    """Open a model file or directory by content; reads headers and pickles, no tensor data."""
    reader, probe, warnings = detect(path)
    contents = reader.contents(probe)
    size = probe.size if not probe.is_dir else _directory_size(probe.path)
    return ModelFile(probe.path, contents, size, warnings)


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def inspect(path: str | Path) -> InspectReport:
    """A frozen summary of a model file: format, tensors, parameters, metadata, extras."""
    with open(path) as model:
        selection = model.weights()
        tensors = tuple(
            TensorSummary(name, t.dtype, t.shape, t.nbytes, t.note)
            for name, t in model.tensors.items()
        )
        return InspectReport(
            path=str(model.path),
            format=model.format.value,
            size_bytes=model.size_bytes,
            parameters=trees.parameter_count(selection.tensors),
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
            safety=_safety(model.path),
            bytes_by_dtype=trees.stored_bytes_by_dtype(dict(model.tensors)),
        )


def _safety(path: Path) -> dict[str, Any]:
    """The scanner's verdict, shown beside the contents: inspect never refuses a file."""
    report = scan(path)
    findings = [f.to_json() for f in report.serious]
    return {"verdict": report.verdict, "findings": findings}


def _all_tensors(tree: dict[Any, Any]) -> bool:
    return all(isinstance(v, TensorRef) for v in tree.values())


def load(
    path: str | Path, device: str = "cpu", *, ema: bool = False, allow_unsafe: bool = False
) -> dict[str, torch.Tensor]:
    """The model weights as torch tensors, from any readable format, executing nothing.

    Checkpoints are unwrapped and pickled modules give their state_dict (see
    ``tree.weights.select_weights``). Tensors that shared storage in the file share it here too.
    The file is scanned first: an ``unsafe`` verdict raises ``UnsafeModelError`` unless
    ``allow_unsafe``; a ``suspicious`` one warns (``SuspiciousModelWarning``).
    """
    check_safety(path, allow_unsafe=allow_unsafe)
    with open(path) as model:
        selection = model.weights(ema=ema)
        if selection.note:
            log.info("%s: %s", model.path.name, selection.note)
        shared: dict[int, Any] = {}
        result: dict[str, torch.Tensor] = {}
        for name, ref in selection.tensors.items():
            result[name] = _to_torch(ref, device, shared)
        return result


def check_safety(path: str | Path, *, allow_unsafe: bool) -> None:
    """The gate every command that hands out tensors goes through (load, convert, ...)."""
    report = scan(path)
    if report.verdict == "unsafe" and not allow_unsafe:
        raise UnsafeModelError(path, report.summary(), findings=report.serious)
    if report.verdict in ("suspicious", "unsafe"):
        warnings.warn(
            f"{path}: {report.verdict}: {report.summary()}", SuspiciousModelWarning, stacklevel=3
        )


def _to_torch(ref: TensorRef, device: str, shared: dict[int, Any]) -> torch.Tensor:
    """One torch tensor; tensors over the same storage become views of one torch storage."""
    import torch

    storage = ref.storage
    if (
        storage is None
        or ref.dtype.startswith(("q", "float4", "complex32"))
        or dtypes.dtype(ref.dtype).block is not None  # GGML blocks: ref.torch() says why not
        or ref.nbytes == 0
    ):
        return ref.torch(device)
    key = id(storage)
    if key not in shared:
        raw = storage.bytes_view()
        base = torch.from_numpy(raw) if raw.flags.writeable else torch.from_numpy(raw.copy())
        shared[key] = base.to(device) if device != "cpu" else base
    base = shared[key]
    itemsize = builtins.max(1, torch.empty(0, dtype=getattr(torch, ref.dtype)).element_size())
    usable = base.numel() - base.numel() % itemsize
    typed = base[:usable].view(getattr(torch, ref.dtype))
    strides = ref.strides or contiguous_strides(ref.shape)
    view: torch.Tensor = typed.as_strided(ref.shape, strides, ref.element_offset)
    return view
