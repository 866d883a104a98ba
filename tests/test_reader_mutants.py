"""Damaged files found by ``benchmarks/bench_reader_mutants.py``, each kept as the smallest
mutant that showed its fault. The oracle is the format's own library: what it refuses to load,
modelport must refuse with a typed error that names the damage."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import modelport
from modelport.errors import CorruptFileError, UnsupportedVersionError


def _with_member(path: Path, suffix: str, body: bytes) -> None:
    """Rewrites the archive with the member ending in ``suffix`` holding ``body``."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, body if name.endswith(suffix) else content)


@pytest.mark.parametrize("record", [b"middle", b"\x00" * 9])
def test_a_byte_order_record_that_is_no_byte_order_is_damage(tmp_path: Path, record: bytes) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.ones(3)}, path)
    _with_member(path, "/byteorder", record)
    with pytest.raises(ValueError, match="Unknown endianness"):
        torch.load(path, weights_only=True)
    with pytest.raises(CorruptFileError, match="byteorder holds"):
        modelport.inspect(path)


def test_a_big_endian_record_is_still_an_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.ones(3)}, path)
    _with_member(path, "/byteorder", b"big")
    with pytest.raises(UnsupportedVersionError, match="big-endian"):
        modelport.inspect(path)
