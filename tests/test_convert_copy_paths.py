"""The byte paths of a plain conversion: where the kernel's copy is refused, ranges are
spliced through a pipe (or, where splicing is refused too, copied through the buffer), and
the read-back compares the source with a map of the written file (or, where it cannot be
mapped, a read of it).
Each way must land every byte, and each comparison must see a single changed byte."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from modelport.errors import TruncatedFileError
from modelport.transfer import readback, streaming
from tests.test_streaming_copy import _copied, _source

PAGE = mmap.PAGESIZE


def _count_splices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.splice

    def counting(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        moved: int = real(*args, **kwargs)
        return moved

    monkeypatch.setattr(os, "splice", counting)
    return calls


def _no_kernel_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``copy_file_range`` refused, as across file systems on kernels before 5.3."""

    def refused(*args: Any) -> int:
        raise OSError(errno.EXDEV, "across file systems")

    monkeypatch.setattr(os, "copy_file_range", refused, raising=False)


needs_splice = pytest.mark.skipif(not hasattr(os, "splice"), reason="Linux's os.splice")


@needs_splice
@pytest.mark.parametrize(("offset", "lead"), [(64, 8), (PAGE + 7, 3 * PAGE - 5), (0, 1)])
def test_without_the_kernel_copy_a_range_is_spliced_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int, lead: int
) -> None:
    _no_kernel_copy(monkeypatch)
    monkeypatch.setattr(streaming, "WRITE_STEP", 2 * PAGE)
    monkeypatch.setattr(streaming, "PIPE_SIZE", 4 * PAGE)  # several pipes' worth
    calls = _count_splices(monkeypatch)
    source, data = _source(tmp_path)
    length = len(data) - offset - 11
    assert _copied(source, offset, length, tmp_path / "out.bin", lead) == data[offset:][:length]
    assert len(calls) >= 2 * (length // (4 * PAGE))  # into the pipe and out, pipe by pipe


@needs_splice
def test_a_refused_pipe_size_copies_through_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipe that cannot be enlarged (past /proc/sys/fs/pipe-max-size) is not used."""

    def refused(*args: Any) -> int:
        raise PermissionError(errno.EPERM, "no")

    _no_kernel_copy(monkeypatch)
    monkeypatch.setattr(streaming.fcntl, "fcntl", refused)
    monkeypatch.setattr(streaming, "WRITE_STEP", 2 * PAGE)
    calls = _count_splices(monkeypatch)
    source, data = _source(tmp_path)
    assert _copied(source, 100, 30 * PAGE, tmp_path / "out.bin", 9) == data[100 : 100 + 30 * PAGE]
    assert calls == []


@needs_splice
def test_splice_refused_part_way_leaves_the_rest_to_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses splice after some bytes moved (bytes left in the pipe
    included) still gets every byte, once."""
    _no_kernel_copy(monkeypatch)
    real = os.splice
    calls: list[int] = []

    def failing(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 4:  # the second pipe's bytes are in it, not yet written
            raise OSError(errno.EINVAL, "no splice here")
        moved: int = real(*args, **kwargs)
        return moved

    monkeypatch.setattr(os, "splice", failing)
    monkeypatch.setattr(streaming, "WRITE_STEP", 2 * PAGE)
    monkeypatch.setattr(streaming, "PIPE_SIZE", 4 * PAGE)
    source, data = _source(tmp_path)
    assert _copied(source, 100, 30 * PAGE, tmp_path / "out.bin", 9) == data[100 : 100 + 30 * PAGE]
    assert len(calls) == 4


@needs_splice
def test_a_spliced_source_that_ends_early_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_kernel_copy(monkeypatch)
    monkeypatch.setattr(streaming, "WRITE_STEP", 2 * PAGE)
    calls = _count_splices(monkeypatch)
    source, data = _source(tmp_path, 10 * PAGE)
    with (
        open(tmp_path / "out.bin", "w+b", buffering=0) as handle,
        pytest.raises(TruncatedFileError) as caught,
    ):
        handle.write(b"h" * 8)
        streaming._copy_range(source, 64, len(data), handle)
    assert calls
    assert caught.value.expected == 64 + len(data)


def _pair(tmp_path: Path, size: int) -> tuple[Path, Path, bytes]:
    data = os.urandom(size)
    source, written = tmp_path / "a.bin", tmp_path / "b.bin"
    source.write_bytes(b"s" * 5 + data)
    written.write_bytes(b"w" * 13 + data)
    return source, written, data


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize("where", [0, 3 * PAGE - 1, 3 * PAGE, 6 * PAGE + 5, -1])
def test_the_comparison_sees_one_changed_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool, where: int
) -> None:
    """First byte, either side of a chunk's end, inside a short last chunk, last byte;
    through a map of the written file and, where it cannot be mapped, a read of it."""
    monkeypatch.setattr(readback, "MAP_WINDOW", 4 * PAGE)  # windows end inside chunks
    if not mapped:

        def unmappable(*args: Any, **kwargs: Any) -> mmap.mmap:
            raise OSError(errno.ENODEV, "no maps here")

        monkeypatch.setattr(readback.mmap, "mmap", unmappable)
    size = 7 * PAGE + 77
    source, written, data = _pair(tmp_path, size)
    comparer = readback.RangeComparer(3 * PAGE)
    same, crc = comparer.check((source, 5), (written, 13), size, 0)
    assert same
    assert crc == zlib.crc32(data)
    changed = bytearray(written.read_bytes())
    changed[13 + (where % size)] ^= 0x01
    written.write_bytes(bytes(changed))
    assert not comparer.same((source, 5), (written, 13), size)
    assert comparer.same((source, 5), (written, 13), where % size)  # the bytes before it


def test_a_written_file_shorter_than_its_range_is_reported(tmp_path: Path) -> None:
    source, written, data = _pair(tmp_path, 5 * PAGE)
    with pytest.raises(TruncatedFileError):
        readback.RangeComparer(PAGE).same((source, 5), (written, 14), len(data))


def test_a_plain_conversion_starts_without_what_it_does_not_use(tmp_path: Path) -> None:
    """A verified torch zip -> safetensors conversion from a pipe imports no numpy (the
    bytes are copied and compared as bytes), no progress bar, no GGUF -> Hugging Face
    mapping and no TF name mapping: each is a sizeable part of the start-up."""
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source, target = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save({"w": torch.arange(300, dtype=torch.float32)}, source)
    code = (
        "import sys\n"
        "from modelport.cli.main import main\n"
        f"sys.argv = ['modelport', 'convert', {str(source)!r}, {str(target)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "unwanted = ['numpy', 'ml_dtypes', 'rich.progress', 'modelport.conversion.gguf_to_hf',\n"
        "            'modelport.torch_models.tf_names']\n"
        "print(sorted(name for name in unwanted if name in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert torch.equal(
        safetensors_torch.load_file(target)["w"], torch.arange(300, dtype=torch.float32)
    )
