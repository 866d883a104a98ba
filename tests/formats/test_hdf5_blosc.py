"""HDF5 datasets compressed with blosc (filter 32001), which h5py has no plugin for: written
by PyTables (its own c-blosc 1.x), read back by PyTables as the oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport.errors import CorruptFileError, ModelportError, UnsupportedVersionError
from modelport.formats import _blosc

tables = pytest.importorskip("tables")
pytestmark = [
    pytest.mark.skipif(h5py.h5z.filter_avail(32001), reason="this h5py has a blosc plugin"),
    pytest.mark.filterwarnings("ignore::tables.NaturalNameWarning"),
]

CODECS = ("blosclz", "lz4", "lz4hc", "zlib")
SHUFFLES = {
    "noshuffle": {"shuffle": False},
    "shuffle": {"shuffle": True},
    "bitshuffle": {"bitshuffle": True},
}
DTYPES = ("<f4", ">i2", "<f8", "u1", ">c8")


def _values(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values with runs and repeats, so every codec finds matches to encode."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-40, 40, size=shape).astype(np.dtype(dtype).newbyteorder("="))
    data.reshape(-1)[::5] = 0
    return data.astype(dtype)


def _write(path: Path, arrays: dict[str, tuple[np.ndarray, Any]], chunks: tuple[int, ...]) -> None:
    with tables.open_file(path, "w") as handle:
        for name, (data, filters) in arrays.items():
            handle.create_carray(
                "/", name, obj=data, filters=filters, chunkshape=chunks, byteorder=None
            )


def _oracle(path: Path) -> dict[str, np.ndarray]:
    with tables.open_file(path, "r") as handle:
        return {node.name: node.read() for node in handle.walk_nodes("/", "Array")}


def test_every_codec_and_shuffle_reads_as_pytables_does(tmp_path: Path) -> None:
    """Each codec x shuffle x dtype (both byte orders), over edge chunks (shape 37x11 in 8x4
    chunks), bit for bit as PyTables reads it, and converted whole."""
    arrays = {}
    for index, (codec, (label, shuffle)) in enumerate(
        (c, s) for c in CODECS for s in SHUFFLES.items()
    ):
        dtype = DTYPES[index % len(DTYPES)]
        filters = tables.Filters(complevel=5, complib=f"blosc:{codec}", **shuffle)
        arrays[f"{codec}_{label}"] = (_values(dtype, (37, 11), index), filters)
    path = tmp_path / "blosc.h5"
    _write(path, arrays, chunks=(8, 4))
    expected = _oracle(path)
    assert len(expected) == len(CODECS) * len(SHUFFLES)
    with modelport.open(path) as model:
        assert model.details["decoded_by_modelport"] == len(expected)
        for name, array in expected.items():
            found = model.tensors[name].numpy()
            assert found.dtype == array.dtype.newbyteorder("<"), name
            assert np.array_equal(found, array), name
            assert "blosc (HDF5 filter 32001) decoded by modelport" in model.tensors[name].note
    report = modelport.convert(path, tmp_path / "out.npz")
    assert report.verified
    with np.load(tmp_path / "out.npz") as written:
        assert sorted(written.files) == sorted(expected)
        for name, array in expected.items():
            assert np.array_equal(written[name], array), name


def test_large_chunks_hold_many_blocks(tmp_path: Path) -> None:
    """1 MiB chunks: frames of many blocks split into one stream per byte of the type, the
    last chunk cut by the dataset's end; a chunk blosc could not shrink is stored with the
    filter skipped (its mask bit set)."""
    data = (np.arange(300_000, dtype="<f4") // 3) % 1000
    filters = tables.Filters(complevel=1, complib="blosc:blosclz", shuffle=False)
    path = tmp_path / "big.h5"
    _write(path, {"w": (data, filters)}, chunks=(262_144,))
    headers = [_blosc.read_header(frame, "chunk") for frame in _frames(path) if frame[0] == 2]
    assert any(h.nbytes > h.blocksize for h in headers)
    with modelport.open(path) as model:
        assert np.array_equal(model.tensors["w"].numpy(), _oracle(path)["w"])


def test_chunks_never_written_hold_the_fill_value(tmp_path: Path) -> None:
    path = tmp_path / "sparse.h5"
    with tables.open_file(path, "w") as handle:
        filters = tables.Filters(complevel=5, complib="blosc:lz4", shuffle=True)
        atom = tables.Float32Atom(dflt=7.5)
        array = handle.create_carray("/", "w", atom, shape=(50,), chunkshape=(10,), filters=filters)
        array[20:30] = np.arange(10, dtype="f4")
    expected = _oracle(path)["w"]
    assert expected[0] == 7.5  # the oracle fills what was never written
    with modelport.open(path) as model:
        assert np.array_equal(model.tensors["w"].numpy(), expected)


def test_blosc_codecs_modelport_lacks_are_refused_naming_hdf5plugin(tmp_path: Path) -> None:
    """zstd inside blosc is not decoded here: a typed error that says what reads it; the
    file still inspects, scans safe, and its other datasets read."""
    path = tmp_path / "zstd.h5"
    zstd = tables.Filters(complevel=5, complib="blosc:zstd", shuffle=True)
    plain = tables.Filters(complevel=5, complib="blosc:lz4", shuffle=True)
    data = np.arange(4096, dtype="<f4") // 7
    _write(path, {"z": (data, zstd), "ok": (data, plain)}, chunks=(1024,))
    with modelport.open(path) as model:
        assert np.array_equal(model.tensors["ok"].numpy(), data)
        with pytest.raises(UnsupportedVersionError, match=r"'z'.*zstd.*pip install hdf5plugin"):
            model.tensors["z"].numpy()
    assert modelport.scan(path).verdict == "safe"


def _frames(path: Path) -> list[bytes]:
    with h5py.File(path, "r") as handle:
        dset = handle["w"]
        return [
            bytes(dset.id.read_direct_chunk(dset.id.get_chunk_info(i).chunk_offset)[1])
            for i in range(dset.id.get_num_chunks())
        ]


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, bytes]]:
    """(frame, the bytes PyTables stored in it) for each codec and shuffle."""
    found = []
    folder = tmp_path_factory.mktemp("frames")
    data = _values("<i4", (512,), 3)
    for codec in CODECS:
        for label, shuffle in SHUFFLES.items():
            path = folder / f"{codec}-{label}.h5"
            filters = tables.Filters(complevel=5, complib=f"blosc:{codec}", **shuffle)
            _write(path, {"w": (data, filters)}, chunks=(512,))
            found.append((_frames(path)[0], data.tobytes()))
    return found


def test_frames_decode_to_the_stored_bytes(frames: list[tuple[bytes, bytes]]) -> None:
    for frame, stored in frames:
        assert _blosc.decompress(frame, len(stored), "chunk") == stored


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_damaged_frames_raise_typed_errors(
    frames: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    """A frame with bytes changed or cut off decodes to its size or raises a typed error."""
    frame, stored = data.draw(st.sampled_from(frames))
    damaged = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        damaged[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    damaged = damaged[: data.draw(st.integers(0, len(frame)))]
    try:
        decoded = _blosc.decompress(bytes(damaged), len(stored), "chunk")
    except ModelportError as exc:
        assert isinstance(exc, CorruptFileError | UnsupportedVersionError)
    else:
        assert len(decoded) <= len(stored)
