"""Files a pickle's loader opens beside it. joblib < 0.10 kept each array in a file next to
the pickle (``formats/_joblib_side_files``), and joblib.load still reads it with
``np.load(allow_pickle=True)``: an object array there is a pickle that runs. A folder scan
judges those files on their own; a scan of the pickle alone (the file a user hands to
joblib.load, and ``modelport.load``'s gate) judges them as part of it, under their names."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Final

from modelport.formats._zip import EOCD_SIGNATURE, LOCAL_SIGNATURE
from modelport.scanning.scan_state import ScanState
from modelport.severity import Severity

# joblib wrote one side file per array; a pickle naming more is judged up to here.
MAX_SIDE_FILES: Final = 4096


def scan_side_files(scan: ScanState, names: list[str]) -> None:
    """The side files ``names`` (plain names, as the pickle gives them) beside the scanned
    file, unless a folder scan judges them itself."""
    if scan.in_folder or not names:
        return
    wanted = list(dict.fromkeys(names))
    if len(wanted) > MAX_SIDE_FILES:
        scan.error(
            f"the pickle names {len(wanted):,} side files, past the {MAX_SIDE_FILES:,} "
            "judged with it: scan its folder instead",
            "",
        )
        wanted = wanted[:MAX_SIDE_FILES]
    for name in wanted:
        _scan_side_file(scan, scan.path.parent / name, name)


def _scan_side_file(scan: ScanState, side: Path, name: str) -> None:
    if not side.exists() or side.resolve() == scan.path.resolve():
        return  # joblib.load fails on a missing file; the pickle itself is judged already
    if not side.is_file():
        scan.error("a side file joblib opens is no regular file: not analysed", name)
        return
    with open(side, "rb") as handle:
        if not handle.seek(0, 2):
            return  # np.load raises on an empty file before it reads anything
        data = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
    if bytes(data[:4]) in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
        # np.load opens a zip as an npz whose members it unpickles as they are read
        scan.error("a side file that is a zip is not analysed with the pickle", name)
    elif not scan.scan_plain_member(data, name, 1):
        scan.add(Severity.INFO, "opaque-member", name, "holds no array and no pickle")
