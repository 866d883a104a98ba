"""numpy arrays that are not one tensor: record arrays (structured dtypes) and fixed-width
text, in ``.npy`` and ``.npz``, with ``numpy.load`` and ``scipy.sparse.load_npz`` as oracles."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse

import modelport
from modelport.errors import CorruptFileError, UnsupportedDtypeError
from tests.conftest import digest

# Every way numpy lays out a record: packed, aligned (padding), big-endian, a subarray
# field, a nested record, bools.
RECORD = np.dtype(
    [
        ("a", "<f4"),
        ("b", ">i8"),
        ("pos", "<f2", (2, 3)),
        ("inner", [("x", "<u2"), ("flag", "?")]),
    ],
    align=True,
)


def _records(shape: tuple[int, ...], *, fortran: bool = False) -> np.ndarray:
    rng = np.random.default_rng(0)
    array = np.zeros(shape, dtype=RECORD)
    array["a"] = rng.standard_normal(shape)
    array["b"] = rng.integers(-(10**12), 10**12, shape)
    array["pos"] = rng.standard_normal((*shape, 2, 3))
    array["inner"]["x"] = rng.integers(0, 60000, shape)
    array["inner"]["flag"] = rng.integers(0, 2, shape).astype(bool)
    return np.asfortranarray(array) if fortran else array


def _field(array: np.ndarray, names: list[str]) -> np.ndarray:
    for name in names:
        array = array[name]
    return array


def _assert_fields_match(tensors: dict[str, Any], prefix: str, expected: np.ndarray) -> None:
    """One tensor per field, named ``prefix.field[.sub]``, bit for bit ``expected[field]``."""
    want = {f"{prefix}.{n}" for n in ("a", "b", "pos", "inner.x", "inner.flag")}
    assert set(tensors) == want
    for name, tensor in tensors.items():
        values = _field(expected, name.split(".")[1:])
        assert tensor.shape == values.shape
        assert tensor.dtype == values.dtype.newbyteorder("=").name
        assert digest(tensor.numpy()) == digest(values.astype(values.dtype.newbyteorder("<")))


@pytest.mark.parametrize("fortran", [False, True])
def test_a_record_array_reads_field_by_field_as_numpy_does(tmp_path: Path, fortran: bool) -> None:
    path = tmp_path / "table.npy"
    np.save(path, _records((3, 4), fortran=fortran))
    expected = np.load(path)  # the reference reader
    with modelport.open(path) as model:
        _assert_fields_match(model.tensors, "table", expected)
    report = modelport.inspect(path)
    assert [t.name for t in report.tensors] == [f"table.{n}" for n in RECORD.names[:3]] + [
        "table.inner.x",
        "table.inner.flag",
    ]
    assert modelport.scan(path).verdict == "safe"


@pytest.mark.parametrize("compressed", [False, True])
def test_record_members_of_an_npz_read_as_numpy_load_reads_them(
    tmp_path: Path, compressed: bool
) -> None:
    path = tmp_path / "tables.npz"
    save = np.savez_compressed if compressed else np.savez
    save(path, rows=_records((5,)), weights=np.arange(4, dtype=np.float32))
    with np.load(path) as archive:
        rows, weights = archive["rows"], archive["weights"]
    with modelport.open(path) as model:
        tensors = dict(model.tensors)
        assert digest(tensors.pop("weights").numpy()) == digest(weights)
        _assert_fields_match(tensors, "rows", rows)


def test_a_record_field_that_is_no_number_is_refused_by_name(tmp_path: Path) -> None:
    table = np.zeros(2, dtype=[("score", "<f4"), ("label", "<U8")])
    path = tmp_path / "labels.npy"
    np.save(path, table)
    with pytest.raises(UnsupportedDtypeError, match=r"field 'label' has dtype '<U8'"):
        modelport.inspect(path)
    archive = tmp_path / "labels.npz"
    np.savez(archive, labels=table, kept=np.ones(2, np.float32))
    with modelport.open(archive) as model:
        assert list(model.tensors) == ["kept"]
        assert any("'labels.npy' skipped" in w and "'label'" in w for w in model.warnings)


def test_a_record_with_an_object_field_is_a_pickle_to_the_scanner(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.zeros(2, dtype=[("a", "<f4"), ("o", "O")]), allow_pickle=True)
    with pytest.raises(UnsupportedDtypeError, match="object fields"):
        modelport.inspect(path)
    rules = {f.rule for file in modelport.scan(path).files for f in file.findings}
    assert "object-array" in rules


@pytest.mark.parametrize(
    "array",
    [
        np.array("csc"),
        np.array(["weight", "bias", "running_mean"]),
        np.array([["ab", "c"], ["", "déjà"]], dtype=">U4"),
        np.array(b"csr"),
        np.array([b"x\x00y", b""], dtype="S3"),
        np.asfortranarray(np.array([["a", "b", "c"], ["d", "e", "f"]])),
    ],
    ids=["0-d", "1-d", "big-endian-2-d", "bytes-0-d", "bytes-1-d", "fortran"],
)
def test_text_reads_as_numpy_tolist_gives_it(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "names.npy"
    np.save(path, array)
    expected = np.load(path).tolist()  # the reference reader
    with modelport.open(path) as model:
        assert model.tree == {"names": expected}
        assert model.tensors == {}
    archive = tmp_path / "names.npz"
    np.savez_compressed(archive, names=array, ids=np.arange(3))
    with modelport.open(archive) as model:
        assert model.tree["names"] == expected
        assert list(model.tensors) == ["ids"]


def test_text_past_the_last_code_point_is_corrupt(tmp_path: Path) -> None:
    raw = io.BytesIO()
    np.save(raw, np.array(["ab"]))
    data = raw.getvalue()
    path = tmp_path / "bad.npy"
    path.write_bytes(data[:-4] + (0x110000).to_bytes(4, "little"))
    with pytest.raises(CorruptFileError, match="U\\+10FFFF"):
        modelport.open(path)


@pytest.mark.parametrize("kind", ["csr", "csc", "coo", "bsr", "dia"])
def test_a_scipy_sparse_npz_holds_what_load_npz_rebuilds(tmp_path: Path, kind: str) -> None:
    matrix = scipy.sparse.random(6, 4, density=0.4, format="csr", random_state=1)
    matrix = matrix.asformat(kind, copy=True) if kind != "bsr" else matrix.tobsr((2, 2))
    path = tmp_path / f"{kind}.npz"
    scipy.sparse.save_npz(path, matrix)
    loaded = scipy.sparse.load_npz(path)  # the reference reader
    with np.load(path) as archive:
        members = {name: archive[name] for name in archive.files}
    with modelport.open(path) as model:
        assert model.tree["format"] in (loaded.format, loaded.format.encode())
        assert set(model.tensors) == set(members) - {"format"}
        for name, tensor in model.tensors.items():
            assert digest(tensor.numpy()) == digest(members[name])
        if kind in ("csr", "csc"):
            arrays = {n: t.numpy() for n, t in model.tensors.items()}
            rebuilt = getattr(scipy.sparse, f"{kind}_matrix")(
                (arrays["data"], arrays["indices"], arrays["indptr"]), shape=arrays["shape"]
            )
            assert np.array_equal(rebuilt.toarray(), loaded.toarray())
    assert modelport.scan(path).verdict == "safe"


def test_a_shared_header_still_names_its_own_member(tmp_path: Path) -> None:
    """Members with byte-identical headers are parsed once; warnings and errors still name
    the member they belong to."""
    raw = io.BytesIO()
    np.save(raw, np.zeros(2, dtype="|V2"))
    member = raw.getvalue()
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("first.npy", member)
        archive.writestr("second.npy", member)
    with modelport.open(path) as model:
        assert sorted(model.tensors) == ["first", "second"]
        for name in ("first", "second"):
            assert any(w.startswith(f"{name}.npy: dtype '|V2'") for w in model.warnings)
    broken = tmp_path / "broken.npz"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("whole.npy", member)
        archive.writestr("short.npy", member[:-1])
    with pytest.raises(CorruptFileError, match=r"'short\.npy'"):
        modelport.open(broken)


def test_record_fields_convert_to_safetensors_as_their_arrays(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    path = tmp_path / "table.npy"
    np.save(path, _records((4,)))
    expected = np.load(path)
    target = tmp_path / "table.safetensors"
    modelport.convert(path, target, modelport.ConvertOptions(to="safetensors"))
    written = load_file(target)  # the reference reader of the output
    assert set(written) == {"table.a", "table.b", "table.pos", "table.inner.x", "table.inner.flag"}
    for name, values in written.items():
        want = _field(expected, name.split(".")[1:])
        assert np.array_equal(values, want)


@pytest.mark.parametrize("compressed", [False, True])
def test_a_header_past_the_first_read_is_read_whole(tmp_path: Path, compressed: bool) -> None:
    """A member's header is read in two steps when it is longer than the first read (here a
    record of 40 fields: a header of about 600 bytes)."""
    wide = np.dtype([(f"column_{i:02d}", "<f4") for i in range(40)])
    table = np.zeros(3, dtype=wide)
    for i, name in enumerate(wide.names):
        table[name] = np.arange(3) + i
    path = tmp_path / "wide.npz"
    (np.savez_compressed if compressed else np.savez)(path, wide=table)
    with zipfile.ZipFile(path) as archive:
        assert len(archive.read("wide.npy")) - table.nbytes > 512  # the header alone
    with np.load(path) as archive:
        expected = archive["wide"]
    with modelport.open(path) as model:
        assert list(model.tensors) == [f"wide.{name}" for name in wide.names]
        for name, tensor in model.tensors.items():
            assert np.array_equal(tensor.numpy(), expected[name.split(".")[1]])
