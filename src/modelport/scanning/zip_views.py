"""A zip as torch reads it and as Python's ``zipfile`` reads it (numpy, Keras), judged both
ways where the two differ.

The two readers find the central directory by different rules and name members
differently (``formats/_zip_ends``): a file can show torch one set of members and numpy or
Keras another, each loader seeing a different file. No writer makes such a zip, so the
difference is reported on its own, and the members ``zipfile`` reads are judged as well as
torch's. Where the readers agree (every zip a writer makes) this costs a comparison of the
end records read once already.
"""

from __future__ import annotations

from modelport.errors import ModelportError
from modelport.formats._zip import ZipDirectory, ZipView
from modelport.scanning.scan_state import ScanState
from modelport.severity import Severity

_NAMES_SHOWN = 3


def judge_views(
    scan: ScanState,
    directory: ZipDirectory,
    member: str,
    depth: int,
    *,
    start: int,
    length: int | None,
    blob: bytes | None,
) -> None:
    """Findings for a torch-view ``directory`` that zipfile reads otherwise, and the scan of
    zipfile's members; nothing when the two agree."""
    if directory.view is not ZipView.TORCH or directory.zipfile_agrees:
        return
    label = f"{member or scan.path.name}<zipfile>"
    nul = directory.nul_names
    if nul:
        shown = ", ".join(repr(n) for n in nul[:_NAMES_SHOWN])
        scan.add(
            Severity.HIGH,
            "zip-name-nul",
            member,
            f"{len(nul)} member names hold a NUL byte ({shown}): Python's zipfile (numpy, "
            "Keras) cuts each name there and torch keeps it whole, so their loaders look up "
            "different members; no zip writer makes such names",
        )
    try:
        other = directory.zipfile_view()
    except ModelportError:
        return  # zipfile refuses the file: its loaders read nothing of it
    if directory.end != directory.zipfile_end:
        scan.add(
            Severity.HIGH,
            "zip-directory-mismatch",
            member,
            f"torch's reader finds a central directory of {len(directory.entries)} records "
            f"at byte {_at(directory)}, Python's zipfile (numpy, Keras) one of "
            f"{len(other.entries)} at byte {_at(other)}: the file shows each kind of loader "
            f"a different archive (zipfile's is scanned as {label}); no zip writer makes one",
        )
    scan.scan_zip(label, depth, start=start, length=length, blob=blob, view=ZipView.ZIPFILE)


def _at(directory: ZipDirectory) -> int:
    end = directory.end
    return -1 if end is None else directory.start + end.directory_at
