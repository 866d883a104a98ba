"""The byte movers under convert and verify: range comparison and checks made while copying."""

from __future__ import annotations

import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelport.tensors import Storage, TensorRef
from modelport.transfer.readback import CopiedRange, RangeComparer, checking_output
from modelport.transfer.streaming import source_chunks, write_tensor
from modelport.transfer.write_plan import OutputTensor


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=200),
    flip=st.integers(min_value=0, max_value=199),
    chunk=st.sampled_from([8, 16, 24, 64]),
)
def test_range_comparer_finds_any_changed_byte(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, flip: int, chunk: int
) -> None:
    """Chunk edges, the 8-byte words and the tail shorter than a word all count."""
    folder = tmp_path_factory.mktemp("cmp")
    (folder / "a").write_bytes(b"xyz" + data)
    changed = bytearray(data)
    if changed:
        changed[flip % len(changed)] ^= 0x01
    (folder / "b").write_bytes(b"12345" + bytes(changed))
    comparer = RangeComparer(chunk)
    same = comparer.same((folder / "a", 3), (folder / "b", 5), len(data))
    assert same == (not data)
    assert comparer.same((folder / "a", 3), (folder / "a", 3), len(data))


def _flat(path: Path, offset: int, count: int) -> TensorRef:
    storage = Storage(path, offset, count * 4, "0")
    return TensorRef("float32", (count,), storage)


def test_ranges_copied_while_checking_are_compared_in_the_background(tmp_path: Path) -> None:
    values = np.arange(1000, dtype=np.float32)
    source = tmp_path / "src.bin"
    source.write_bytes(b"head" + values.tobytes())
    out = tmp_path / "out.bin"
    with open(out, "w+b", buffering=0) as handle, checking_output(compare=True) as checks:
        handle.write(b"HEADER--")
        write_tensor(handle, OutputTensor("w", "float32", _flat(source, 4, 1000)))
        crc = write_tensor(
            handle, OutputTensor("w", "float32", _flat(source, 4, 1000)), checksum=True
        )
    assert crc() == zlib.crc32(values.tobytes())
    assert out.read_bytes() == b"HEADER--" + values.tobytes() * 2
    assert checks.verdict(CopiedRange.of(source, 4, out, 8, 4000)) is True
    assert checks.verdict(CopiedRange.of(source, 4, out, 4008, 4000)) is True
    assert checks.verdict(CopiedRange.of(source, 4, out, 0, 4000)) is None


def test_an_error_while_writing_stops_the_background_checks(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(np.ones(256, np.float32).tobytes())
    before = threading.active_count()
    out = tmp_path / "out.bin"
    tensor = OutputTensor("w", "float32", _flat(source, 0, 256))
    with (
        pytest.raises(KeyboardInterrupt),
        open(out, "w+b", buffering=0) as handle,
        checking_output(compare=True),
    ):
        write_tensor(handle, tensor)
        raise KeyboardInterrupt
    assert threading.active_count() == before


@st.composite
def strided_views(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """A shape, element strides (slices, transposes, broadcasts) and an element offset."""
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    strides = tuple(draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim)))
    offset = draw(st.integers(0, 7))
    return shape, strides, offset


@settings(max_examples=80, deadline=None)
@given(view=strided_views(), chunk=st.sampled_from([4, 12, 64, 1 << 20]))
def test_strided_views_stream_in_c_order(
    tmp_path_factory: pytest.TempPathFactory,
    view: tuple[tuple[int, ...], tuple[int, ...], int],
    chunk: int,
) -> None:
    """Whether a block is read with pread or gathered from the memory map (chunk sizes
    small enough to take both ways), the elements come out in C order."""
    shape, strides, offset = view
    count = offset + 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    values = np.arange(count + 3, dtype=np.float32)
    path = tmp_path_factory.mktemp("strided") / "storage.bin"
    path.write_bytes(b"pad!" + values.tobytes())
    storage = Storage(path, 4, values.nbytes)
    tensor = TensorRef("float32", shape, storage, element_offset=offset, strides=strides)
    itemsize = values.itemsize  # numpy itself places the view: the oracle
    placed = np.lib.stride_tricks.as_strided(
        values[offset:], shape=shape, strides=tuple(s * itemsize for s in strides)
    )
    expected = np.ascontiguousarray(placed).reshape(-1)
    got = [c.copy() for c in source_chunks(tensor, chunk)]
    assert np.array_equal(np.concatenate(got) if got else np.zeros(0, np.float32), expected)
    assert all(c.nbytes <= max(chunk, 4) for c in got)


def test_tensors_written_element_by_element_are_checked_in_the_background(
    tmp_path: Path,
) -> None:
    """A cast is compared with its source on the checking thread; the read-back then only
    asks for the outcome."""
    from modelport.conversion.verifying import CastCheck, compare_elements

    values = np.linspace(-3, 3, 1000, dtype=np.float32)
    source = tmp_path / "src.bin"
    source.write_bytes(values.tobytes())
    out = tmp_path / "out.bin"
    cast = OutputTensor("w", "bfloat16", _flat(source, 0, 1000))
    with (
        open(out, "w+b", buffering=0) as handle,
        checking_output(compare=True, elements=compare_elements) as checks,
    ):
        write_tensor(handle, cast)
        write_tensor(handle, cast)
    found, checked = checks.outcome(out, 0)
    import torch

    as_bf16 = torch.from_numpy(values).bfloat16().float().numpy()  # torch's cast: the oracle
    assert checked is True and isinstance(found, CastCheck)
    assert found.max_abs_error == float(np.abs(as_bf16 - values).max())
    assert checks.outcome(out, 2000)[1]
    assert checks.outcome(out, 4)[1] is False  # nothing was written at that offset


def test_an_error_on_the_checking_thread_reaches_the_writer(tmp_path: Path) -> None:
    """A range that cannot be read back (here: past the end of the file) fails its own
    checksum and every later one with the same typed error, and ``finish`` raises it."""
    from modelport.errors import TruncatedFileError
    from modelport.transfer.readback import OutputChecks

    out = tmp_path / "out.bin"
    out.write_bytes(bytes(100))
    checks = OutputChecks(compare=True)
    broken = checks.submit(out, 50, 100, None, crc=True)
    later = checks.submit(out, 0, 10, None, crc=True)
    with pytest.raises(TruncatedFileError):
        broken()
    with pytest.raises(TruncatedFileError):
        later()
    with pytest.raises(TruncatedFileError):
        checks.finish()


def test_a_transposed_block_is_gathered_run_by_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block spread over its storage (a transpose) is read as its contiguous runs, the
    runs' file offsets a few at a time."""
    from modelport.transfer import streaming

    monkeypatch.setattr(streaming, "RUNS_PER_BATCH", 3)
    values = np.arange(16 * 32, dtype=np.float32)
    path = tmp_path / "storage.bin"
    path.write_bytes(values.tobytes())
    storage = Storage(path, 0, values.nbytes)
    tensor = TensorRef("float32", (32, 16), storage, strides=(1, 32))  # a (16, 32) matrix, .T
    calls = []
    real = streaming._gather_runs

    def counted(fd: int, block: Any, start: int) -> Any:
        result = real(fd, block, start)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(streaming, "_gather_runs", counted)
    got = np.concatenate([c.copy() for c in source_chunks(tensor, 128)])
    assert np.array_equal(got, values.reshape(16, 32).T.reshape(-1))
    assert calls and all(calls)  # every block went the run-by-run way
