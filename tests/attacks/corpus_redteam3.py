"""Attack techniques from a third red-team audit of the scanner, each with its benign twin.

TorchScript code that names an operator through ``getattr`` with a string: the archive's
``torch`` is the aten namespace, so ``getattr(torch, "save")`` is ``aten::save``, and a
scanner that matches dotted names only never sees it. (The audit's diffusers case, a
component's ``<component>/<library>.py``, is proven by its repro script instead: importing
diffusers costs its loader some ten seconds of CPU, past what the heavy set affords.)
"""

from __future__ import annotations

from pathlib import Path

from tests.attacks.technique import TORCH_JIT, Technique, file_technique
from tests.attacks.writers import torchscript


def _getattr_save(marker: Path | None) -> bytes:
    """``__setstate__`` (run by torch.jit.load) saves through ``getattr(torch, "save")`` to
    a path under the marker, then maps it through ``getattr(ops.aten, "from_file")``: the
    save fails silently where the marker is no folder, and from_file's error, naming the
    path, shows the load got past it."""
    if marker is None:
        return torchscript(None)
    target = marker / "inside"
    return torchscript(
        "    self.weight = (state)[0]\n"
        f'    getattr(torch, "save")(self.weight, "{target}")\n'
        f'    self.weight = getattr(ops.aten, "from_file")("{target}", False, 2)\n'
    )


REDTEAM3: tuple[Technique, ...] = (
    file_technique(
        "torchscript-getattr-operator",
        "code",
        "scripted.pt",
        _getattr_save,
        TORCH_JIT,
        True,
        'getattr(torch, "save")(...) in __setstate__: TorchScript resolves the string to '
        "aten::save, which a reading of dotted names only never meets",
    ),
)
