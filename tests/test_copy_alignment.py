"""Copying tensors that do not line up page for page with their source: the kernel's copy
takes them too (not a pipe, not a buffer), and the safetensors writer pads its header so
that most copied bytes do line up, in a file the reference library reads back unchanged."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from modelport.formats import safetensors_writer
from modelport.tensors import Storage, TensorRef
from modelport.transfer.write_plan import OutputTensor, WritePlan
from tests.test_streaming_copy import _copied, _source

PAGE = mmap.PAGESIZE


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="Linux's copy_file_range")
def test_a_range_that_does_not_line_up_is_copied_in_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel: list[tuple[int, int]] = []
    real = os.copy_file_range

    def counting(src: int, dst: int, count: int, offset_src: Any, offset_dst: Any) -> int:
        kernel.append((offset_src, offset_dst))
        moved: int = real(src, dst, count, offset_src, offset_dst)
        return moved

    def no_splice(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("spliced")

    monkeypatch.setattr(os, "copy_file_range", counting)
    monkeypatch.setattr(os, "splice", no_splice, raising=False)
    source, data = _source(tmp_path)
    length = len(data) - 64 - 11
    assert _copied(source, 64, length, tmp_path / "out.bin", 8) == data[64 : 64 + length]
    assert kernel
    assert all((src - dst) % PAGE == 56 for src, dst in kernel)


def _plan(source: Path, spans: list[tuple[str, int, int]]) -> WritePlan:
    """float32 tensors copied from ``(name, offset, count)`` of ``source``."""
    tensors = []
    for name, offset, count in spans:
        ref = TensorRef("float32", (count,), Storage(source, offset, 4 * count))
        tensors.append(OutputTensor(name, "float32", ref))
    return WritePlan(tuple(tensors), {"format": "pt"})


def _written(tmp_path: Path, plan: WritePlan) -> tuple[Path, int]:
    out = tmp_path / "out.safetensors"
    with open(out, "wb", buffering=0) as handle:
        safetensors_writer.write(handle, plan)
    with open(out, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    return out, 8 + length


def test_the_data_starts_where_most_copied_bytes_line_up(tmp_path: Path) -> None:
    """Two large tensors at the same place within a page, a small one elsewhere: the large
    ones line up, and ``safetensors`` reads every value as it was in the source."""
    source, data = _source(tmp_path, 64 * PAGE)
    spans = [
        ("small", 200, 50),  # 200 bytes
        ("big.a", 2 * PAGE + 1000, 4 * PAGE),  # 16 pages
        ("big.b", 20 * PAGE + 1000 + 16 * PAGE, 2 * PAGE),  # lines up with big.a
    ]
    plan = _plan(source, spans)
    out, start = _written(tmp_path, plan)
    assert start % 8 == 0  # the header's length too: the reference writer's alignment
    assert (start + 200) % PAGE == 1000  # big.a, and with it big.b, page for page
    got = load_file(str(out))
    for name, offset, count in spans:
        expected = np.frombuffer(data, np.float32, count, offset)
        assert got[name].tobytes() == expected.tobytes(), name


def test_without_a_majority_the_start_still_lines_up_within_a_cache_line(
    tmp_path: Path,
) -> None:
    """Tensors each at their own place within a page, all 64 bytes apart from their
    output offsets' places: none can line up with all, all line up within a cache line."""
    source, data = _source(tmp_path, 64 * PAGE)
    spans = [(f"t{i}", i * 8 * PAGE + 64 * (i + 1) + 24, PAGE) for i in range(4)]
    out, start = _written(tmp_path, _plan(source, spans))
    assert start % 64 == 24
    got = load_file(str(out))
    for name, offset, count in spans:
        assert got[name].tobytes() == data[offset : offset + 4 * count], name


def test_computed_tensors_keep_the_reference_start(tmp_path: Path) -> None:
    """A cast copies nothing: the header ends where the reference writer ends it."""
    source, _ = _source(tmp_path, 8 * PAGE)
    ref = TensorRef("float32", (1024,), Storage(source, 1000, 4096))
    plan = WritePlan((OutputTensor("w", "float16", ref),), {"format": "pt"})
    _, start = _written(tmp_path, plan)
    header = b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[1024],'
    header += b'"data_offsets":[0,2048]}}'
    assert start == 8 + len(header) + (-len(header) % 8)
