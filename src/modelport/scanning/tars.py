"""Tars, scanned as ``torch.load`` reads them (it tries a tar before a pickle): torch
0.1-0.3's layout pickle by pickle, where each pickle lies between raw storages; any other
tar (NeMo's ``.nemo``, a packed model folder) member by member, by content, zips in place,
nothing extracted."""

from __future__ import annotations

import tarfile
from pathlib import Path

from modelport import limits
from modelport.errors import ModelportError
from modelport.formats import torch_legacy
from modelport.formats._zip import EOCD_SIGNATURE, LOCAL_SIGNATURE
from modelport.pickles.judging import scan_pickle
from modelport.pickles.symbols import Severity
from modelport.scanning.findings import Finding
from modelport.scanning.scan_state import ScanState
from modelport.scanning.streams import pickle_limits


def scan_tar(scan: ScanState) -> None:
    """torch 0.1-0.3 saves: a tar whose members hold pickles between raw storages; any
    other tar is scanned member by member."""
    spans, stopped = torch_legacy.tar_pickle_spans(scan.path)
    if stopped is not None and not spans:
        scan_tar_members(scan)
        return
    scan.format = scan.format if scan.format != "unknown" else "torch-legacy (tar)"
    for span in spans:
        label = f"{scan.path.name}!{span.member}"
        try:
            result = scan_pickle(
                scan.data[: span.end],
                start=span.start,
                expect_persistent_ids=True,
                limits=pickle_limits(scan),
            )
        except ModelportError as exc:
            scan.error(f"pickle at byte {span.start} could not be analysed: {exc}", label)
            continue
        scan.findings.extend(Finding.from_pickle(f, label) for f in result.findings)
    if stopped is not None:
        scan.error(f"the tar layout could not be walked to its end: {stopped}", "")


def scan_tar_members(scan: ScanState) -> None:
    """Any other tar (NeMo's ``.nemo``, a packed model folder): every regular member is
    scanned by its content, zips in place, nothing extracted."""
    scan.format = scan.format if scan.format != "unknown" else "tar"
    try:
        with tarfile.open(scan.path, "r:") as archive:
            members = archive.getmembers()
    except (tarfile.TarError, OSError) as exc:
        scan.error(f"the tar archive could not be read: {exc}", "")
        return
    if len(members) > limits.MAX_SCANNED_FILES:
        scan.error(f"more than {limits.MAX_SCANNED_FILES:,} tar members", "")
        return
    for info in members:
        if not info.isfile():
            if info.issym() or info.islnk():
                scan.add(Severity.MEDIUM, "tar-link", info.name, f"a link to {info.linkname!r}")
            continue
        if ".." in Path(info.name).parts or Path(info.name).is_absolute():
            scan.add(
                Severity.HIGH,
                "tar-path-traversal",
                info.name,
                "member name escapes the archive",
            )
        end = info.offset_data + info.size
        if end > len(scan.data):
            scan.error("the tar member runs past the end of the file", info.name)
            continue
        body = scan.data[info.offset_data : end]
        label = f"{scan.path.name}!{info.name}"
        if bytes(body[:4]) in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
            scan.scan_zip(label, 1, start=info.offset_data, length=info.size)
        elif body:
            scan.scan_member(body, label, 1, torch_archive=False, torchscript=False)
