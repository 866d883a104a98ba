"""What an attack technique is (a file or folder a loader reads, aimed at a marker, and
its benign twin), the loaders the harness runs on them, and the technique of one file,
shared by the corpus modules (``corpus``, ``corpus_bypasses``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.attacks.writers import write


@dataclass(frozen=True)
class Technique:
    """One way to hide a payload from a scanner, and the same file without it."""

    name: str
    kind: str
    build: Callable[[Path, Path], Path]  # (folder, marker) -> the attack file or folder
    benign: Callable[[Path], Path]  # folder -> the twin
    loader: str | None  # Python that loads the str PATH; None: no standard loader reads it
    default_settings: bool  # the loader as shipped, with no opt-in to unsafe loading
    note: str
    patches: str = ""  # the attribute the payload sets, for the harness to watch


@dataclass(frozen=True)
class Malformed:
    """A damaged or crafted file that no reader can fully analyse."""

    name: str
    build: Callable[[Path], Path]
    note: str


# -- loaders ---------------------------------------------------------------------------------------

PICKLE = "import pickle\nwith open(PATH, 'rb') as f:\n    pickle.load(f)"
PICKLE_RECORDS = (
    "import pickle\nwith open(PATH, 'rb') as f:\n    while f.peek(1):\n        pickle.load(f)"
)
TORCH_UNSAFE = "import torch; torch.load(PATH, weights_only=False)"
TORCH_EXPORT = "import torch; torch.export.load(PATH)"
TORCH_JIT = "import torch; torch.jit.load(PATH)"
JOBLIB = "import joblib; joblib.load(PATH)"
NUMPY_PICKLE = "import numpy as np; np.load(PATH, allow_pickle=True)"
NUMPY_SECOND_LOAD = (
    "import numpy as np\n"
    "with open(PATH, 'rb') as f:\n"
    "    np.load(f)\n"
    "    np.load(f, allow_pickle=True)"
)


Make = Callable[[Path | None], bytes]  # the file aimed at a marker, or (given None) its twin


def file_technique(
    name: str,
    kind: str,
    filename: str,
    make: Make,
    loader: str | None,
    default_settings: bool,
    note: str,
    patches: str = "",
) -> Technique:
    return Technique(
        name,
        kind,
        lambda tmp, marker: write(tmp / filename, make(marker)),
        lambda tmp: write(tmp / filename, make(None)),
        loader,
        default_settings,
        note,
        patches,
    )
