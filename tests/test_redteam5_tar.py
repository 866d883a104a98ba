"""A fifth red-team audit's legacy torch tars that ``tarfile`` (torch.load's first reading of
a file that is not a zip) reads otherwise than modelport did: a header checksum spelled as
``tarfile.nti`` takes it (base-256, ``+0123``, ``0o123``, ``1_2``), and pax records framed by
their length prefix with the last ``path`` winning. The loader is the oracle: every attack
reaches its payload under ``torch.load(weights_only=False)``; each benign twin reads, in
modelport, as the tensors torch.load returns."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import modelport
from modelport.errors import CorruptFileError
from modelport.formats._tar import is_tar
from tests.attacks.corpus_bypasses import _pax_record, _tar_member
from tests.attacks.writers import _tar_header, legacy_tar_members, shell2
from tests.conftest import assert_same_tensors
from tests.formats.test_torch_legacy import write_legacy_tar

_END = b"\x00" * 1024
_CHECKSUMS = ("b256", "plus", "octal", "underscore")
_DECOY_NAME = pickle.dumps({}, protocol=2)  # b'\x80\x02}q\x00.': the file opens as a pickle


def _spelled(total: int, style: str) -> bytes:
    """The 8-byte checksum field as ``tarfile.nti`` reads it: base-256 (first byte 0x80),
    or any text ``int(text, 8)`` takes."""
    digits = b"%06o" % total
    return {
        "b256": b"\x80" + total.to_bytes(7, "big"),
        "plus": b"+" + digits + b"\x00",
        "octal": b"0o" + digits,
        "underscore": digits[:3] + b"_" + digits[3:] + b"\x00",
    }[style]


def _v7_tar(members: list[tuple[bytes, bytes]], style: str) -> bytes:
    """V7 headers (no ustar magic, as torch 0.1-0.3 wrote) with the checksum spelled so."""
    out = bytearray()
    for name, data in members:
        header = _tar_header(name, len(data), ustar=False)
        total = 256 + sum(header[:148]) + sum(header[156:])
        header[148:156] = _spelled(total, style)
        out += header + data + b"\x00" * (-len(data) % 512)
    return bytes(out + _END)


def checksum_attack(marker: Path, style: str, *, zip_tail: bool = False) -> bytes:
    """Member one is named like a benign pickle (so the file also opens as one); ``storages``
    opens with ``os.system``, whose 0 torch takes for the storage count."""
    members = [
        (_DECOY_NAME, b""),
        (b"storages", shell2(marker) + pickle.dumps([], protocol=2)),
        (b"tensors", pickle.dumps(0, protocol=2)),
        (b"pickle", pickle.dumps({"w": 1}, protocol=2)),
    ]
    data = _v7_tar(members, style)
    if zip_tail:  # tarfile stops at the end blocks; zipfile finds this behind them
        tail = io.BytesIO()
        np.savez(tail, w=np.zeros(2, dtype=np.float32))
        data += tail.getvalue()
    return data


def _pax_records(style: str) -> bytes:
    """tarfile: the last ``path`` wins (``twice``); records split by their length prefix, so
    a comment's value may hold a newline and a record-shaped line (``comment``)."""
    if style == "twice":
        return _pax_record("path", "decoy") + _pax_record("path", "pickle")
    return _pax_record("comment", "x\n1 path=decoy") + _pax_record("path", "pickle")


def pax_tar(style: str, renamed: bytes, *, shadowed: bytes | None) -> bytes:
    """torch 0.x members, then a pax header naming the member after it ``pickle``; with
    ``shadowed``, a plain ``pickle`` member before it, which tarfile's getmember passes over."""
    members = dict(legacy_tar_members())
    out = _tar_member(b"storages", members[b"storages"]) + _tar_member(
        b"tensors", members[b"tensors"]
    )
    if shadowed is not None:
        out += _tar_member(b"pickle", shadowed)
    out += _tar_member(b"././@PaxHeader", _pax_records(style), b"x")
    return out + _tar_member(b"placeholder", renamed) + _END


def linked_storages(target: Path) -> bytes:
    """``storages`` a symbolic link to ``target``: torch extracts the link and opens it
    (``target`` names no storage: its count is what ``os.system`` returns)."""
    link = tarfile.TarInfo("storages")
    link.type, link.linkname = tarfile.SYMTYPE, str(target)
    return (
        link.tobuf(format=tarfile.USTAR_FORMAT)
        + _tar_member(b"tensors", pickle.dumps(0, protocol=2))
        + _tar_member(b"pickle", pickle.dumps({"w": 1}, protocol=2))
        + _END
    )


def _rules(path: Path) -> tuple[str, set[str]]:
    report = modelport.scan(path)
    return report.verdict, {f.rule for f in report.files[0].findings}


def _torch_reads(path: Path) -> dict[str, Any]:
    loaded = torch.load(path, weights_only=False)
    assert isinstance(loaded, dict)
    return loaded


# -- attacks: scanned unsafe -------------------------------------------------------------------


@pytest.mark.parametrize("style", [*_CHECKSUMS, "b256-zip-tail"])
def test_a_checksum_tarfile_accepts_makes_a_tar(tmp_path: Path, marker: Path, style: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(
        checksum_attack(marker, style.removesuffix("-zip-tail"), zip_tail="zip" in style)
    )
    with tarfile.open(path, "r:") as archive:  # the loader's own reading: a tar
        assert archive.getnames()[1:] == ["storages", "tensors", "pickle"]
    verdict, rules = _rules(path)
    assert verdict == "unsafe" and "known-gadget" in rules, rules
    assert is_tar(path.read_bytes()[:512])
    assert not marker.exists()


@pytest.mark.parametrize("style", ["twice", "comment"])
def test_pax_names_are_read_as_tarfile_reads_them(tmp_path: Path, marker: Path, style: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(pax_tar(style, shell2(marker), shadowed=pickle.dumps({"w": 1}, protocol=2)))
    with tarfile.open(path, "r:") as archive:  # getmember: the last of a name, the payload
        assert archive.getnames() == ["storages", "tensors", "pickle", "pickle"]
        assert archive.getmember("pickle") is archive.getmembers()[-1]
    verdict, rules = _rules(path)
    assert verdict == "unsafe" and {"known-gadget", "duplicate-member"} <= rules, rules
    assert not marker.exists()


def test_every_member_of_a_legacy_tar_is_scanned(tmp_path: Path, marker: Path) -> None:
    """Members torch's layout does not name are still read by whoever extracts the tar."""
    path = tmp_path / "model.pt"
    members = [*legacy_tar_members(), (b"extra.pkl", shell2(marker))]
    path.write_bytes(b"".join(_tar_member(name, data) for name, data in members) + _END)
    verdict, rules = _rules(path)
    assert verdict == "unsafe" and "known-gadget" in rules, rules


def test_a_config_beside_a_legacy_layout_is_judged_as_in_a_folder(tmp_path: Path) -> None:
    """A YAML config packed beside torch's layout is text a loader reads once extracted:
    judged as in a folder, not only by its bytes (which no pickle reading explains)."""
    path = tmp_path / "model.pt"
    config = b"model:\n  encoder: !!python/object/apply:os.system ['true']\n"
    members = [*legacy_tar_members(), (b"model_config.yaml", config)]
    path.write_bytes(b"".join(_tar_member(name, data) for name, data in members) + _END)
    verdict, rules = _rules(path)
    assert verdict == "unsafe" and "yaml-python-tag" in rules, rules


def test_a_name_listed_twice_in_any_tar_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "model.nemo"
    with tarfile.open(path, "w") as archive:
        for text in (b"a: 1\n", b"a: 2\n"):
            info = tarfile.TarInfo(
                "./model_config.yaml" if text == b"a: 1\n" else "model_config.yaml"
            )
            info.size = len(text)
            archive.addfile(info, io.BytesIO(text))
    verdict, rules = _rules(path)
    assert verdict != "safe" and "duplicate-member" in rules, rules


def test_a_layout_name_on_a_link_is_not_read(tmp_path: Path, marker: Path) -> None:
    """tarfile hands torch the link target's bytes for ``pickle``: modelport reads none."""
    path = tmp_path / "model.pt"
    members = dict(legacy_tar_members())
    link = tarfile.TarInfo("pickle")
    link.type, link.linkname = tarfile.LNKTYPE, "object"
    path.write_bytes(
        _tar_member(b"object", shell2(marker))
        + _tar_member(b"storages", members[b"storages"])
        + _tar_member(b"tensors", members[b"tensors"])
        + link.tobuf(format=tarfile.USTAR_FORMAT)
        + _END
    )
    with tarfile.open(path) as archive:
        assert archive.extractfile("pickle").read() == shell2(marker)  # type: ignore[union-attr]
    with pytest.raises(CorruptFileError, match="link"):
        modelport.open(path)
    assert modelport.scan(path).verdict == "unsafe"


def test_a_layout_name_linked_out_of_the_file_is_unsafe(tmp_path: Path, marker: Path) -> None:
    outside = tmp_path / "elsewhere.pkl"
    outside.write_bytes(shell2(marker) + pickle.dumps([], protocol=2))
    path = tmp_path / "model.pt"
    path.write_bytes(linked_storages(outside))
    with tarfile.open(path) as archive:
        assert archive.getmember("storages").linkname == str(outside)
    verdict, rules = _rules(path)
    assert verdict == "unsafe" and "tar-link" in rules, rules


@pytest.mark.heavy
def test_torch_load_reaches_every_payload(tmp_path: Path) -> None:
    """One child process loads every attack above as its user would."""
    built = []
    for style in (*_CHECKSUMS, "b256-zip-tail"):
        path = tmp_path / f"{style}.pt"
        path.write_bytes(
            checksum_attack(
                tmp_path / f"{style}.hit", style.removesuffix("-zip-tail"), zip_tail="zip" in style
            )
        )
        built.append(path)
    for style in ("twice", "comment"):
        path = tmp_path / f"pax-{style}.pt"
        renamed = shell2(tmp_path / f"pax-{style}.hit")
        path.write_bytes(pax_tar(style, renamed, shadowed=pickle.dumps({"w": 1}, protocol=2)))
        built.append(path)
    outside = tmp_path / "elsewhere.pkl"
    outside.write_bytes(shell2(tmp_path / "linked.hit") + pickle.dumps([], protocol=2))
    (tmp_path / "linked.pt").write_bytes(linked_storages(outside))
    built.append(tmp_path / "linked.pt")
    code = "import sys, torch\nfor f in sys.argv[1:]:\n    torch.load(f, weights_only=False)\n"
    subprocess.run(
        [sys.executable, "-c", code, *map(str, built)], check=True, timeout=60, capture_output=True
    )
    assert sorted(p.name for p in tmp_path.glob("*.hit")) == sorted(p.stem + ".hit" for p in built)


# -- benign twins: read as torch reads them ----------------------------------------------------


@pytest.mark.parametrize("style", _CHECKSUMS)
def test_a_checksum_spelled_otherwise_reads_as_torch_reads_it(tmp_path: Path, style: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(_v7_tar(legacy_tar_members(), style))
    expected = _torch_reads(path)
    assert_same_tensors(expected, path, "torch-legacy")
    assert modelport.scan(path).verdict == "safe"


@pytest.mark.parametrize("style", ["twice", "comment"])
def test_a_pax_renamed_member_reads_as_torch_reads_it(tmp_path: Path, style: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(pax_tar(style, dict(legacy_tar_members())[b"pickle"], shadowed=None))
    expected = _torch_reads(path)
    assert_same_tensors(expected, path, "torch-legacy")
    assert modelport.scan(path).verdict == "safe"


def test_the_last_of_a_duplicated_name_is_read(tmp_path: Path) -> None:
    """torch reads the later ``pickle`` (``{"weight": ...}``), never the earlier one."""
    path = tmp_path / "model.pt"
    earlier = pickle.dumps({"other": 1}, protocol=2)
    path.write_bytes(pax_tar("twice", dict(legacy_tar_members())[b"pickle"], shadowed=earlier))
    expected = _torch_reads(path)
    assert list(expected) == ["weight"]
    assert_same_tensors(expected, path, "torch-legacy")
    assert any("more than one member" in w for w in modelport.open(path).warnings)
    assert modelport.scan(path).verdict == "suspicious"


def test_a_legacy_tar_still_inspects_converts_and_scans(tmp_path: Path) -> None:
    path = tmp_path / "old.tar"
    write_legacy_tar(path, {"matrix": (1, 0, (3, 4), (4, 1)), "on_view": (2, 1, (3,), (1,))})
    expected = _torch_reads(path)
    report = modelport.inspect(path)
    assert report.format == "torch-legacy" and report.details["layout"] == "tar"
    assert report.safety["verdict"] == "safe"
    out = tmp_path / "old.safetensors"
    modelport.convert(path, out)
    written = load_file(out)
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], v.contiguous()) for k, v in expected.items())
    assert modelport.scan(path).verdict == "safe"
