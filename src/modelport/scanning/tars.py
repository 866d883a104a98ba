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
from modelport.formats._tar import TarListing, list_tar
from modelport.formats._zip import EOCD_SIGNATURE, LOCAL_SIGNATURE
from modelport.formats.torch_legacy import PickleSpan
from modelport.pickles.judging import scan_pickle
from modelport.pickles.symbols import Severity
from modelport.scanning import content_checks
from modelport.scanning.findings import Finding
from modelport.scanning.scan_state import ScanState
from modelport.scanning.streams import pickle_limits


def scan_tar(scan: ScanState) -> None:
    """torch 0.1-0.3 saves: a tar whose members hold pickles between raw storages, walked as
    torch reads them, then every other member by content; any other tar member by member.
    The members are the ones ``tarfile`` lists, names as it reads them."""
    try:
        listing = list_tar(scan.data, limit=limits.MAX_SCANNED_FILES)
    except ModelportError:
        scan_tar_members(scan)  # it names tarfile's own error
        return
    _report_duplicates(scan, listing)
    _report_layout_links(scan, listing)
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
    _scan_unwalked(scan, listing, spans)
    if stopped is not None:
        scan.error(f"the tar layout could not be walked to its end: {stopped}", "")


def _report_duplicates(scan: ScanState, listing: TarListing) -> None:
    for name in listing.duplicates:
        scan.add(
            Severity.MEDIUM,
            "duplicate-member",
            name,
            "the tar lists a member path twice: torch and extraction take the last copy, "
            "a reader that stops at the first reads another",
        )


def _report_layout_links(scan: ScanState, listing: TarListing) -> None:
    """torch.load extracts ``storages`` and ``tensors`` and opens them, and reads ``pickle``
    through ``extractfile``: under a link, what it unpickles is the link's target, a file
    of the machine for an absolute one, not bytes of this file."""
    for name in torch_legacy.TAR_MEMBERS:
        member = listing.get(name)
        if member is not None and member.kind == "link":
            scan.add(
                Severity.HIGH,
                "tar-link",
                name,
                f"torch.load unpickles {name!r} through a link to {member.linkname!r}",
            )


def _scan_unwalked(scan: ScanState, listing: TarListing, spans: list[PickleSpan]) -> None:
    """Members of a 0.x layout its walk did not read (a shadowed copy of a name, any extra
    member), each by content: another loader, or another reading of the names, reads them."""
    for member in listing.members:
        if any(member.offset <= s.start < member.offset + member.size for s in spans):
            continue
        if member.kind == "link":
            scan.add(Severity.MEDIUM, "tar-link", member.name, f"a link to {member.linkname!r}")
            continue
        if not member.plain or not member.size:
            continue
        end = member.offset + member.size
        if end > len(scan.data):
            scan.error("the tar member runs past the end of the file", member.name)
            continue
        body = scan.data[member.offset : end]
        label = f"{scan.path.name}!{member.name}"
        if bytes(body[:4]) in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
            scan.scan_zip(label, 1, start=member.offset, length=member.size)
        else:
            scan.scan_member(body, label, 1, torch_archive=False, torchscript=False)


def scan_tar_members(scan: ScanState) -> None:
    """Any other tar (NeMo's ``.nemo``, a packed model folder): every regular member is
    scanned by its content, zips in place, nothing extracted; the text a loader reads from
    it (``model_config.yaml``, which NeMo's restore_from instantiates) as in a folder."""
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
            scan.findings.extend(content_checks.member_text_findings(info.name, body, label))
