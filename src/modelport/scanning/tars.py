"""Tars, scanned as ``torch.load`` reads them (it tries a tar before a pickle): torch
0.1-0.3's layout pickle by pickle, where each pickle lies between raw storages; any other
tar (NeMo's ``.nemo``, a packed model folder) member by member, by content, zips in place,
nothing extracted."""

from __future__ import annotations

from pathlib import PurePosixPath

from modelport import limits
from modelport.errors import ModelportError
from modelport.formats import torch_legacy
from modelport.formats._tar import TarListing, TarMember, list_tar
from modelport.formats._zip import EOCD_SIGNATURE, LOCAL_SIGNATURE
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
        listing = list_tar(scan.data, limit=limits.MAX_SCANNED_FILES, path=scan.path)
    except ModelportError as exc:
        scan.format = scan.format if scan.format != "unknown" else "tar"
        scan.error(f"the tar archive could not be read: {exc}", "")
        return
    _report_duplicates(scan, listing)
    _report_layout_links(scan, listing)
    spans, stopped = torch_legacy.tar_pickle_spans(scan.path)
    if stopped is not None and not spans:
        _scan_members(scan, listing)
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
    for member in listing.members:
        if not any(member.offset <= s.start < member.offset + member.size for s in spans):
            _scan_member(scan, member)  # a shadowed copy of a name, any extra member
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


def _scan_members(scan: ScanState, listing: TarListing) -> None:
    """Any other tar (NeMo's ``.nemo``, a packed model folder): every member by content,
    zips in place, nothing extracted; the text a loader reads from it (``model_config.yaml``,
    which NeMo's restore_from instantiates) as in a folder."""
    scan.format = scan.format if scan.format != "unknown" else "tar"
    for member in listing.members:
        _scan_member(scan, member)


def _scan_member(scan: ScanState, member: TarMember) -> None:
    if member.kind == "link":
        scan.add(Severity.MEDIUM, "tar-link", member.name, f"a link to {member.linkname!r}")
        return
    if not member.plain or not member.size:
        return
    name = PurePosixPath(member.name)
    if ".." in name.parts or name.is_absolute():
        scan.add(
            Severity.HIGH, "tar-path-traversal", member.name, "member name escapes the archive"
        )
    end = member.offset + member.size
    if end > len(scan.data):
        scan.error("the tar member runs past the end of the file", member.name)
        return
    body = scan.data[member.offset : end]
    label = f"{scan.path.name}!{member.name}"
    if bytes(body[:4]) in (LOCAL_SIGNATURE, EOCD_SIGNATURE):
        scan.scan_zip(label, 1, start=member.offset, length=member.size)
        return
    scan.scan_member(body, label, 1, torch_archive=False, torchscript=False)
    scan.findings.extend(content_checks.member_text_findings(member.name, body, label))
