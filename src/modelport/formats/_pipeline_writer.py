"""diffusers pipeline folders, written: each component in its subfolder, as its library names
its files, beside the pipeline's ``model_index.json``.

Layout (diffusers ``DiffusionPipeline.save_pretrained``), what ``from_pretrained`` reads back:

- the plan's names are ``<component>.<name>`` (as ``diffusers_dir`` reads them); a name that
  starts with no component of the source pipeline is refused;
- every component the plan holds tensors of gets its subfolder, written by ``_hf_writer``
  in the scheme of the component's own library (a diffusers model
  ``diffusion_pytorch_model.safetensors``, a transformers model ``model.safetensors``;
  ``pytorch_model.bin`` / ``diffusion_pytorch_model.bin`` for ``--to hf-bin``), sharded and
  indexed the same way, with its sidecars (``config.json``, recast when the tensors are);
- tied tensors recorded as aliases stay inside their component, under the component's names;
- components without weights (scheduler, tokenizer, feature extractor) get their files
  carried over as sidecars are; ``model_index.json`` and the pipeline's other top-level
  files that are no weights are carried as they are;
- a component whose weights the plan leaves out entirely is not written (the conversion
  report names it): ``model_index.json`` still names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from modelport.errors import UsageError
from modelport.formats import _hf_writer, diffusers_dir
from modelport.formats._hf_writer import Layout, Scheme
from modelport.transfer.write_plan import OutputTensor, WritePlan

TOP: Final = ""  # the pipeline's own folder, in ``Planned.copied``


@dataclass(frozen=True)
class Part:
    """One component with weights: its plan (names without the component), scheme, layout."""

    name: str
    plan: WritePlan
    scheme: Scheme
    layout: Layout


@dataclass(frozen=True)
class Planned:
    """The whole pipeline: components with weights, folders whose files are carried as they
    are (``TOP`` for the pipeline's own), components left out, and notes for the report."""

    parts: tuple[Part, ...]
    copied: tuple[tuple[str, tuple[Path, ...]], ...]
    left_out: tuple[str, ...]
    notes: tuple[str, ...]

    def scheme_of(self, folder: str) -> Scheme | None:
        """The weights scheme written into ``folder`` (a component), if any."""
        return next((p.scheme for p in self.parts if p.name == folder), None)


def plan(whole: WritePlan, limit: int, source: Path, binary: bool) -> Planned:
    """Where every tensor and file of the pipeline goes; nothing is written."""
    _, components = diffusers_dir.components(source)
    weighted = {c.name: c for c in components if c.has_weights}
    groups: dict[str, list[OutputTensor]] = {name: [] for name in weighted}
    for tensor in whole.tensors:
        owner, dot, rest = tensor.name.partition(".")
        if not dot or owner not in groups:
            raise UsageError(
                f"tensor {tensor.name!r}: a diffusers pipeline is written per component, and "
                f"its names start with one of {', '.join(c + '.' for c in groups)}"
            )
        groups[owner].append(OutputTensor(rest, tensor.dtype, tensor.source))
    aliases = _hf_writer.aliases_of(whole)
    shared = {k: v for k, v in whole.metadata.items() if k not in aliases}
    parts, notes = [], []
    for name, tensors in groups.items():
        if not tensors:
            continue
        prefix = name + "."
        own = {
            a.removeprefix(prefix): k.removeprefix(prefix)
            for a, k in aliases.items()
            if a.startswith(prefix) and k.startswith(prefix)
        }
        part_plan = WritePlan(tuple(tensors), {**shared, **own})
        folder = weighted[name].folder
        assert folder is not None
        scheme = _hf_writer.scheme_for(folder, binary)
        planned = _hf_writer.layout(part_plan, limit, scheme)
        parts.append(Part(name, part_plan, scheme, planned))
        shards = f"{len(planned.files)} shards and {scheme.index}" if planned.index else ""
        notes.append(f"{name}/: {shards or planned.files[0]}")
    left_out = tuple(name for name, tensors in groups.items() if not tensors)
    if left_out:
        notes.append(
            f"no tensors taken from {', '.join(left_out)}: not written, though "
            f"{diffusers_dir.MODEL_INDEX} names them"
        )
    copied = [(TOP, tuple(_hf_writer.carried_files(source)[0]))]
    for component in components:
        if component.folder is not None and not component.has_weights:
            copied.append((component.name, tuple(_hf_writer.carried_files(component.folder)[0])))
    return Planned(tuple(parts), tuple(copied), left_out, tuple(notes))


def write(
    directory: Path,
    planned: Planned,
    limit: int,
    source: Path,
    cast: str | None = None,
    fsync: bool = False,
) -> None:
    """The pipeline into ``directory`` (empty, existing), one subfolder per component."""
    for part in planned.parts:
        (directory / part.name).mkdir()
        _hf_writer.write_directory(
            directory / part.name, part.plan, limit, source / part.name, cast, fsync, part.scheme
        )
    for folder, files in planned.copied:
        if folder != TOP:
            (directory / folder).mkdir()
        _hf_writer.copy_files(directory / folder, list(files), None, fsync)
