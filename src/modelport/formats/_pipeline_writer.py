"""Models made of several model folders, written: a diffusers pipeline (a subfolder per
component beside ``model_index.json``) or a sentence-transformers model (a folder per module
listed in ``modules.json``, the Transformer module's often the top folder itself), each
folder as its library names its files.

Layout (diffusers ``DiffusionPipeline.save_pretrained``, sentence-transformers
``SentenceTransformer.save``), what ``from_pretrained`` / ``SentenceTransformer(path)`` reads
back:

- the plan's names are ``<component>.<name>`` (``diffusers_dir``) or ``<module>/<name>``,
  the top module's bare (``sentence_transformers_dir``), as the readers give them; a name
  that belongs to no folder of the source with weights is refused;
- every folder the plan holds tensors of is written by ``_hf_writer`` in the scheme of its
  own library (a diffusers model ``diffusion_pytorch_model.safetensors``, a transformers
  model or a sentence-transformers module ``model.safetensors``; ``pytorch_model.bin`` /
  ``diffusion_pytorch_model.bin`` for ``--to hf-bin``), sharded and indexed the same way
  where its loader reads shards (a sentence-transformers module other than a Transformer
  reads one file, so it gets one), with the folder's files that are no weights
  (``config.json`` recast when the tensors are; tokenizer files, ``modules.json``,
  ``sentence_bert_config.json``);
- tied tensors recorded as aliases stay inside their folder, under the folder's names;
- folders without weights (scheduler, tokenizer, ``1_Pooling/``, ``3_Normalize/``) get their
  files carried over as they are, and so does the top folder when it holds no weights
  (``model_index.json``); a folder's own subfolders are carried only where they are
  folders of the model themselves;
- a folder whose weights the plan leaves out entirely is not written (the conversion
  report names it), though the index still names it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from modelport.errors import UsageError
from modelport.formats import _hf_writer, diffusers_dir, sentence_transformers_dir
from modelport.formats._hf_writer import Layout, Scheme
from modelport.transfer.write_plan import OutputTensor, WritePlan

TOP: Final = ""  # the model's own folder


@dataclass(frozen=True)
class Member:
    """One folder of the model: its place under the top (``TOP`` for the top itself), its
    folder in the source, whether it holds weights, and whether its loader reads shards."""

    name: str
    folder: Path
    weighted: bool
    sharded: bool = True


@dataclass(frozen=True)
class Members:
    """The folders of a model made of several, and how its tensor names say which folder
    each belongs to: ``<folder><separator><name>``, names without the separator for a
    weighted top folder."""

    kind: str  # a diffusers pipeline, a sentence-transformers model
    unit: str  # what it calls each folder: component, module
    index: str  # the file that lists the folders
    separator: str
    members: tuple[Member, ...]

    def owner(self, name: str) -> tuple[str, str] | None:
        """The folder a tensor name belongs to (the longest that prefixes it) and the
        name there; None when none does."""
        weighted = sorted((m.name for m in self.members if m.weighted), key=len, reverse=True)
        for folder in weighted:
            if folder and name.startswith(folder + self.separator):
                return folder, name[len(folder) + len(self.separator) :]
        return (TOP, name) if TOP in weighted and self.separator not in name else None

    @property
    def description(self) -> str:
        return f"{self.kind}: each {self.unit} in its folder"

    def inner(self, folder: str) -> frozenset[str]:
        """The subfolders of ``folder`` that are folders of the model (written apart)."""
        start = folder + "/" if folder else ""
        return frozenset(
            m.name.removeprefix(start).split("/")[0]
            for m in self.members
            if m.name != folder and m.name.startswith(start)
        )


def members(source: Path) -> Members:
    """The source's folders: a diffusers pipeline's components or a sentence-transformers
    model's modules."""
    if diffusers_dir.sniff(source):
        _, components = diffusers_dir.components(source)
        return Members(
            "a diffusers pipeline",
            "component",
            diffusers_dir.MODEL_INDEX,
            diffusers_dir.SEPARATOR,
            tuple(
                Member(c.name, c.folder, c.has_weights) for c in components if c.folder is not None
            ),
        )
    modules = sentence_transformers_dir.modules(source)
    return Members(
        "a sentence-transformers model",
        "module",
        sentence_transformers_dir.MODULES_JSON,
        sentence_transformers_dir.SEPARATOR,
        tuple(
            Member(m.path, m.folder, m.has_weights, m.loads_shards)
            for m in modules
            if m.folder is not None
        ),
    )


def schemes(source: Path, binary: bool) -> dict[str, Scheme]:
    """The weights scheme written into each folder with weights."""
    return {m.name: _scheme(m, binary) for m in members(source).members if m.weighted}


def _scheme(member: Member, binary: bool) -> Scheme:
    scheme = _hf_writer.scheme_for(member.folder, binary)
    return scheme if member.sharded else dataclasses.replace(scheme, sharded=False)


@dataclass(frozen=True)
class Part:
    """One folder with weights: its plan (names without the folder), scheme, layout, and
    the files carried beside the weights."""

    name: str
    plan: WritePlan
    scheme: Scheme
    layout: Layout
    carried: tuple[Path, ...]


@dataclass(frozen=True)
class Planned:
    """The whole model: what it is, folders with weights, folders whose files are carried as
    they are (``TOP`` for the model's own), folders left out, and notes for the report."""

    description: str
    parts: tuple[Part, ...]
    copied: tuple[tuple[str, tuple[Path, ...]], ...]
    left_out: tuple[str, ...]
    notes: tuple[str, ...]

    def scheme_of(self, folder: str) -> Scheme | None:
        """The weights scheme written into ``folder``, if any."""
        return next((p.scheme for p in self.parts if p.name == folder), None)


def plan(whole: WritePlan, limit: int, source: Path, binary: bool) -> Planned:
    """Where every tensor and file of the model goes; nothing is written."""
    found = members(source)
    groups = _grouped(whole, found)
    parts: list[Part] = []
    notes: list[str] = []
    for member in found.members:
        if groups.get(member.name):
            part, said = _part(member, groups[member.name], whole, found, limit, binary)
            parts.append(part)
            notes += said
    left_out = tuple(name for name, tensors in groups.items() if not tensors)
    if left_out:
        notes.append(
            f"no tensors taken from {', '.join(n or 'the top folder' for n in left_out)}: "
            f"not written, though {found.index} names them"
        )
    folders = [] if any(p.name == TOP for p in parts) else [(TOP, source)]
    folders += [(m.name, m.folder) for m in found.members if not m.weighted and m.name != TOP]
    copied = []
    for name, folder in folders:
        files, said = _hf_writer.carried_files(folder, written=found.inner(name))
        copied.append((name, tuple(files)))
        notes += [f"{_shown(name)}: {n}" for n in said]
    return Planned(found.description, tuple(parts), tuple(copied), left_out, tuple(notes))


def _part(
    member: Member,
    tensors: list[OutputTensor],
    whole: WritePlan,
    found: Members,
    limit: int,
    binary: bool,
) -> tuple[Part, list[str]]:
    """One folder with weights: its tensors and the aliases among them under the folder's
    names, its layout and carried files, and notes on them."""
    aliases = _hf_writer.aliases_of(whole)
    own = {}
    for alias, kept in aliases.items():
        alias_at, kept_at = found.owner(alias), found.owner(kept)
        if alias_at and kept_at and alias_at[0] == kept_at[0] == member.name:
            own[alias_at[1]] = kept_at[1]
    shared = {k: v for k, v in whole.metadata.items() if k not in aliases}
    part_plan = WritePlan(tuple(tensors), {**shared, **own})
    scheme = _scheme(member, binary)
    planned = _hf_writer.layout(part_plan, limit, scheme)
    carried, left = _hf_writer.carried_files(
        member.folder, _hf_writer.weight_names(planned), written=found.inner(member.name)
    )
    shards = f"{len(planned.files)} shards and {scheme.index}" if planned.index else ""
    said = [f"{_shown(member.name)}: {n}" for n in [shards or planned.files[0], *left]]
    return Part(member.name, part_plan, scheme, planned, tuple(carried)), said


def _grouped(whole: WritePlan, found: Members) -> dict[str, list[OutputTensor]]:
    """The plan's tensors by folder, named as in their folder."""
    groups: dict[str, list[OutputTensor]] = {m.name: [] for m in found.members if m.weighted}
    for tensor in whole.tensors:
        owned = found.owner(tensor.name)
        if owned is None:
            starts = ", ".join(
                f"{name}{found.separator}" if name else f"none (no {found.separator})"
                for name in groups
            )
            raise UsageError(
                f"tensor {tensor.name!r}: {found.kind} is written per {found.unit}, and its "
                f"names start with one of {starts}"
            )
        groups[owned[0]].append(OutputTensor(owned[1], tensor.dtype, tensor.source))
    return groups


def _shown(folder: str) -> str:
    return f"{folder}/" if folder else "top folder"


def write(
    directory: Path,
    planned: Planned,
    limit: int,
    cast: str | None = None,
    fsync: bool = False,
) -> None:
    """The model into ``directory`` (empty, existing), each folder in its place."""
    for part in planned.parts:
        folder = directory / part.name
        folder.mkdir(parents=True, exist_ok=True)
        _hf_writer.write_directory(folder, part.plan, limit, None, cast, fsync, part.scheme)
        _hf_writer.copy_files(folder, list(part.carried), cast, fsync)
    for name, files in planned.copied:
        (directory / name).mkdir(parents=True, exist_ok=True)
        _hf_writer.copy_files(directory / name, list(files), None, fsync)
