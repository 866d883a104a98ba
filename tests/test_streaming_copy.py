"""``streaming._copy_range``: a source range lands byte for byte at the output's position,
whichever way it goes (the kernel's copy, a buffer), and a source that ends early is
reported, never copied short."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from modelport.errors import TruncatedFileError
from modelport.transfer import streaming

PAGE = mmap.PAGESIZE


def _source(tmp_path: Path, size: int = 40 * PAGE + 123) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


def _copied(source: Path, offset: int, length: int, out: Path, lead: int) -> bytes:
    """``length`` bytes at ``offset`` copied after ``lead`` bytes already in ``out``."""
    with open(out, "w+b", buffering=0) as handle:
        handle.write(b"h" * lead)
        streaming._copy_range(source, offset, length, handle)
        assert handle.tell() == lead + length
    written = out.read_bytes()
    assert written[:lead] == b"h" * lead
    return written[lead:]


@pytest.mark.parametrize(
    ("offset", "lead"),
    [
        (64, 64),  # same place within a page: the kernel's copy
        (64, 8),  # not lined up: through the buffer
        (PAGE + 7, 3 * PAGE - 5),
        (0, 1),
    ],
)
def test_a_range_is_copied_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int, lead: int
) -> None:
    monkeypatch.setattr(streaming, "COPY_BUFFER", 5 * PAGE)  # several buffers
    monkeypatch.setattr(streaming, "WRITE_STEP", 2 * PAGE)  # several aligned writes each
    source, data = _source(tmp_path)
    length = len(data) - offset - 11
    assert _copied(source, offset, length, tmp_path / "out.bin", lead) == data[offset:][:length]


def test_without_the_kernel_copy_a_buffer_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A platform without ``copy_file_range`` (macOS) copies every byte, lined up or not."""
    monkeypatch.delattr("os.copy_file_range", raising=False)
    monkeypatch.setattr(streaming, "COPY_BUFFER", 3 * PAGE)
    monkeypatch.setattr(streaming, "WRITE_STEP", PAGE)
    source, data = _source(tmp_path)
    for offset, lead in [(100, 100), (100, 9)]:
        out = tmp_path / f"out-{lead}.bin"
        assert _copied(source, offset, 20 * PAGE, out, lead) == data[offset : offset + 20 * PAGE]


@pytest.mark.parametrize("lead", [64, 8])
def test_a_source_that_ends_early_is_reported(tmp_path: Path, lead: int) -> None:
    source, data = _source(tmp_path, 10 * PAGE)
    with (
        open(tmp_path / "out.bin", "w+b", buffering=0) as handle,
        pytest.raises(TruncatedFileError) as caught,
    ):
        handle.write(b"h" * lead)
        streaming._copy_range(source, 64, len(data), handle)
    assert caught.value.expected == 64 + len(data)
    assert caught.value.actual <= len(data)
