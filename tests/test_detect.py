"""Detection by content, and naming what a file is when it is not a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modelport
from modelport.errors import (
    ModelFileNotFoundError,
    NotAModelError,
    TruncatedFileError,
    UnknownFormatError,
)
from modelport.formats.protocol import Format
from modelport.formats.registry import FILE_SLOTS, FOLDER_SLOTS, Needs, every_reader

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 19377012\n"
)


def test_git_lfs_pointer_is_named(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_text(LFS_POINTER)
    with pytest.raises(NotAModelError, match="git lfs pull") as caught:
        modelport.inspect(path)
    assert caught.value.kind == "git-lfs-pointer"
    assert "19,377,012-byte" in str(caught.value)
    assert "4d7a2146" in str(caught.value)


@pytest.mark.parametrize("text", ["<!DOCTYPE html><html><body>Sign in</body></html>", "\n  <html>"])
def test_html_page_is_named(tmp_path: Path, text: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text(text)
    with pytest.raises(NotAModelError, match="HTML"):
        modelport.inspect(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(NotAModelError, match="empty"):
        modelport.inspect(path)
    with pytest.raises(ModelFileNotFoundError):
        modelport.inspect(tmp_path / "nope.pt")


def test_unknown_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(UnknownFormatError, match="unrecognised"):
        modelport.inspect(path)


def test_truncated_zip_names_the_truncation(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(TruncatedFileError, match="truncated"):
        modelport.inspect(path)


def test_extension_never_decides(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    report = modelport.inspect(path)
    assert report.format == "torch-zip"
    assert report.warnings and "extension .safetensors" in report.warnings[0]


def test_every_format_has_one_reader_slot() -> None:
    """The registry names each reader's module; every format modelport reads is reachable
    through it (diffusers folders are read by the Hugging Face folder reader)."""
    formats = {reader.format for reader in every_reader()}
    assert formats == set(Format)
    assert all(slot.needs is not Needs.FOLDER for slot in FILE_SLOTS)
    assert {slot.needs for slot in FOLDER_SLOTS} == {Needs.FOLDER}
    assert all(
        slot.module.startswith("modelport.formats.") for slot in (*FILE_SLOTS, *FOLDER_SLOTS)
    )
