"""Plain pickles and joblib dumps; the oracle is pickle.load / joblib.load on the same file."""

from __future__ import annotations

import collections
import io
import lzma
import pickle
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport import limits
from modelport.errors import CorruptFileError, LimitExceededError, ModelportError
from modelport.formats import pickle_file
from modelport.formats.protocol import Probe
from modelport.pickles.numpy_types import NumpyArray
from modelport.pickles.records import CallRecord, ObjectRecord
from tests.conftest import digest, torch_digest
from tests.mutation import (
    assert_typed_error_or_whole,
    joblib_layout,
    joblib_pickles_parse,
    pickle_end,
    plain_pickle_parses,
)

COMPRESSIONS = ["zlib", "gzip", "bz2", "lzma", "xz"]


class Estimator:
    """A stand-in for a fitted scikit-learn estimator: plain attributes, array attributes."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.coef_ = rng.standard_normal((3, 4)).astype(np.float32)
        self.intercept_ = np.arange(3, dtype=np.int64)
        self.components_ = rng.standard_normal((160, 80))  # 100 KiB: past the inline limit
        self.fortran_ = np.asfortranarray(rng.standard_normal((5, 7)).astype(np.float16))
        self.classes_ = np.array([True, False])
        self.empty_ = np.zeros((0, 3), dtype=np.int32)
        self.scalar_ = np.array(2.5)
        self.labels_ = np.array(["cat", "dog"])
        self.objects_ = np.array([1, "two", None], dtype=object)
        self.n_features_in_ = 4
        self.alpha = np.float32(0.5)
        self.name = "ridge"


def arrays() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "float32": rng.standard_normal((3, 4)).astype(np.float32),
        "float16": rng.standard_normal(7).astype(np.float16),
        "int8": np.arange(-5, 5, dtype=np.int8),
        "uint8": np.arange(250, 256, dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "zero_d": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 2), dtype=np.float64),
        "big": rng.standard_normal((128, 96)),  # 96 KiB
        "nested": {"list": [np.arange(4, dtype=np.int64), np.ones(2, np.float32)]},
        "count": np.int64(7),
        "rate": np.float32(0.25),
        "blob": b"hello",
        "big_blob": b"\x01" * 70_000,
        "text": "hi",
    }


def expected_tensors(value: Any, prefix: str = "") -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    items: Any = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else vars(value).items()
        if isinstance(value, Estimator)
        else ()
    )
    for key, item in items:
        name = f"{prefix}{key}"
        if isinstance(item, np.ndarray) and item.dtype != object and item.dtype.kind != "U":
            found[name] = item
        elif isinstance(item, (dict, list)):
            found.update(expected_tensors(item, name + "."))
    return found


def check_against(path: Path, expected: dict[str, np.ndarray]) -> modelport.ModelFile:
    model = modelport.open(path)
    assert model.format == "pickle"
    assert list(model.tensors) == list(expected)
    for name, array in expected.items():
        ref = model.tensors[name]
        assert ref.shape == array.shape, name
        assert ref.dtype == str(array.dtype), name
        assert digest(ref.numpy()) == digest(array), name
    return model


@pytest.mark.parametrize("protocol", range(6))
def test_plain_pickle_protocols(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "arrays.pkl"
    with open(path, "wb") as handle:
        pickle.dump(arrays(), handle, protocol=protocol)
    with open(path, "rb") as handle:
        oracle = pickle.load(handle)
    with check_against(path, expected_tensors(oracle)) as model:
        tree = model.tree
        assert tree["count"] == 7 and tree["rate"] == 0.25 and tree["text"] == "hi"
        assert tree["blob"] == b"hello"
        big = model.tensors["big"]
        if protocol >= 3:  # bytes are stored as bytes: the array stays in the file
            assert big.storage is not None and big.storage.path == path
            assert big.byte_range() is not None
            offset, length = big.byte_range()  # type: ignore[misc]
            assert path.read_bytes()[offset : offset + length] == oracle["big"].tobytes()
            assert isinstance(big.numpy().base, np.memmap)
        assert model.details["pickle_protocol"] == (protocol if protocol >= 2 else 0)


def test_inspect_json(tmp_path: Path) -> None:
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps(arrays(), protocol=4))
    report = modelport.inspect(path).to_json()
    assert report["format"] == "pickle"
    names = {t["name"]: t for t in report["tensors"]}
    assert names["float32"] == {
        "name": "float32",
        "dtype": "float32",
        "shape": [3, 4],
        "nbytes": 48,
    }
    assert names["nested.list.0"]["dtype"] == "int64"
    assert report["parameters"] == sum(int(np.prod(t["shape"])) for t in report["tensors"])
    assert report["extras"]["big_blob"] == {"__bytes__": 70_000}
    assert report["extras"]["count"] == 7
    assert report["details"]["pickle_protocol"] == 4
    assert report["metadata"] == {}


def test_joblib_uncompressed_is_zero_copy(tmp_path: Path) -> None:
    path = tmp_path / "model.joblib"
    joblib.dump(Estimator(), path)
    oracle = joblib.load(path)
    with check_against(path, expected_tensors(oracle)) as model:
        assert isinstance(model.tree, ObjectRecord)
        assert model.tree.class_path.endswith("Estimator")
        assert model.details["joblib"] is True
        for name, ref in model.tensors.items():
            assert ref.storage is not None and ref.storage.reader is None, name
            assert ref.storage.path == path
        start, length = model.tensors["components_"].byte_range()  # type: ignore[misc]
        assert start % 16 == 0  # joblib >= 1.2 pads arrays to 16 bytes
        assert path.read_bytes()[start : start + length] == oracle.components_.tobytes()
        objects = model.tree.attributes()["objects_"]
        assert isinstance(objects, NumpyArray) and objects.objects == [1, "two", None]
        assert model.tree.attributes()["alpha"] == 0.5
        assert model.tree.attributes()["name"] == "ridge"
    report = modelport.inspect(path).to_json()
    assert report["extras"]["n_features_in_"] == 4
    assert report["extras"]["labels_"] == {
        "__class__": "numpy.ndarray",
        "dtype": "U3",
        "shape": [2],
    }


@pytest.mark.parametrize("method", COMPRESSIONS)
def test_joblib_compressed(tmp_path: Path, method: str) -> None:
    path = tmp_path / f"model_{method}.joblib"
    joblib.dump({"est": Estimator(), "w": np.arange(5.0)}, path, compress=(method, 3))
    oracle = joblib.load(path)
    expected = {f"est.{k}": v for k, v in expected_tensors(oracle["est"]).items()}
    expected["w"] = oracle["w"]
    with check_against(path, expected) as model:
        assert model.details["compression"] == method
        assert model.details["decompressed_bytes"] > path.stat().st_size
        assert torch_digest(model.tensors["est.coef_"].torch()) == digest(oracle["est"].coef_)


def test_torch_tensors_pickled_plainly(tmp_path: Path) -> None:
    state = {
        "small": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "bf16": torch.randn(200, 200, dtype=torch.bfloat16),  # 80 KB: stays in the file
        "view": torch.arange(10, dtype=torch.int64)[2:7],
        "flag": torch.tensor([True, False]),
    }
    path = tmp_path / "tensors.pkl"
    path.write_bytes(pickle.dumps(state))
    oracle = pickle.loads(path.read_bytes())
    with modelport.open(path) as model:
        assert list(model.tensors) == list(oracle)
        for name, tensor in oracle.items():
            ref = model.tensors[name]
            assert ref.dtype == str(tensor.dtype).removeprefix("torch.")
            assert ref.shape == tuple(tensor.shape)
            assert torch_digest(ref.torch()) == torch_digest(tensor), name
        assert model.tensors["bf16"].byte_range() is not None
        assert model.details["torch_legacy_blobs"] == 4
        assert not model.warnings


def test_never_claims_torch_legacy_or_npy(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert not pickle_file.sniff(Probe.of(legacy))
    npy = tmp_path / "a.npy"
    np.save(npy, np.arange(3))
    assert not pickle_file.sniff(Probe.of(npy))
    text = tmp_path / "notes.txt"
    text.write_bytes(b"(just some text)\nin a file\n")
    assert not pickle_file.sniff(Probe.of(text))


def test_renamed_file_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(pickle.dumps({"w": np.ones(3, np.float32)}, protocol=2))
    with modelport.open(path) as model:
        assert model.format == "pickle"
        assert any("extension .safetensors" in w for w in model.warnings)


def test_old_joblib_side_files(tmp_path: Path) -> None:
    from joblib.numpy_pickle_compat import NDArrayWrapper

    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "model.pkl_01.npy", array)
    payload = {"w": NDArrayWrapper("model.pkl_01.npy", np.ndarray), "missing": None}
    payload["missing"] = NDArrayWrapper("model.pkl_02.npy", np.ndarray)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with modelport.open(path) as model:
        assert list(model.tensors) == ["w"]
        assert digest(model.tensors["w"].numpy()) == digest(array)
        assert any("side file" in w and "missing" in w for w in model.warnings)
        assert any("joblib < 0.10" in w for w in model.warnings)


# -- malicious pickles ------------------------------------------------------------------------
def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def malicious(marker: Path) -> dict[str, bytes]:
    shell = f"touch {marker}"
    python = f"open({str(marker)!r}, 'w').close()"
    legacy_blob = (
        b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.\x80\x02}."
        + b"\x80\x02cos\nsystem\n"
        + _str(shell)
        + b"\x85R.\x80\x02]."
    )
    return {
        "global_reduce": b"cos\nsystem\n(" + f"S'{shell}'\n".encode() + b"tR.",
        "builtins_exec": b"\x80\x02cbuiltins\nexec\n" + _str(python) + b"\x85R.",
        "stack_global": b"\x80\x04"
        + _str("builtins")
        + _str("eval")
        + b"\x93"
        + _str(python)
        + b"\x85R.",
        "inst": b"(" + f"S'{shell}'\n".encode() + b"ios\nsystem\n.",
        "obj": b"(cos\nsystem\n" + f"S'{shell}'\n".encode() + b"o.",
        "newobj_ex": b"\x80\x04csubprocess\nPopen\n]"
        + _str("touch")
        + b"a"
        + _str(str(marker))
        + b"a\x85}\x92.",
        "popen_reduce": b"\x80\x02csubprocess\nPopen\n(]"
        + _str("touch")
        + b"a"
        + _str(str(marker))
        + b"atR.",
        "setstate_gadget": b"\x80\x02ctypes\nSimpleNamespace\n)\x81N}"
        + _str("__setstate__")
        + b"cos\nsystem\ns\x86b"
        + _str(shell)
        + b"b.",
        "torch_blob": b"\x80\x02ctorch.storage\n_load_from_bytes\nC"
        + bytes([len(legacy_blob)])
        + legacy_blob
        + b"\x85R.",
        "joblib_wrapper": b"\x80\x02cjoblib.numpy_pickle\nNumpyArrayWrapper\n)\x81}"
        + _str("subclass")
        + b"cos\nsystem\ns"
        + _str("dtype")
        + b"cos\nsystem\ns"
        + b"b.",
    }


# What opening each attack pickle shows: the root record and the calls named in its warning.
MALICIOUS_OPENED: dict[str, tuple[type, str | None]] = {
    "global_reduce": (CallRecord, "os.system"),
    "builtins_exec": (CallRecord, "builtins.exec"),
    "stack_global": (CallRecord, "builtins.eval"),
    "inst": (CallRecord, "os.system"),
    "obj": (CallRecord, "os.system"),
    "popen_reduce": (CallRecord, "subprocess.Popen"),
    "newobj_ex": (ObjectRecord, None),  # only instantiates: no call to warn of
    "setstate_gadget": (ObjectRecord, None),
    "torch_blob": (CallRecord, "os.system"),
}


@pytest.mark.parametrize("kind", sorted(malicious(Path("x"))))
def test_malicious_pickles_never_run(tmp_path: Path, marker: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.pkl"
    path.write_bytes(malicious(marker)[kind])
    assert modelport.scan(path).verdict == "unsafe"
    if kind == "joblib_wrapper":  # os.system as the array's dtype: no array can be read
        with pytest.raises(CorruptFileError, match="joblib array"):
            modelport.open(path)
    else:
        record, call = MALICIOUS_OPENED[kind]
        with modelport.open(path) as model:
            assert type(model.tree) is record
            assert [call in w for w in model.warnings] == ([True] if call else [])
        assert modelport.inspect(path).safety["verdict"] == "unsafe"
    assert not marker.exists()


def test_malicious_torch_blob_is_recorded(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "blob.pkl"
    path.write_bytes(malicious(marker)["torch_blob"])
    with modelport.open(path) as model:
        assert isinstance(model.tree, CallRecord)
        assert any("torch storage could not be read" in w for w in model.warnings)
    assert not marker.exists()


# -- compression limits and damage -------------------------------------------------------------
def bomb(path: Path, streams: int = 16) -> int:
    """An xz file that inflates to 1 GiB of zeros after a pickle opening (PROTO 4, BINBYTES8
    announcing all of it): a tiny stream, then ``streams`` concatenated 64 MiB streams."""
    chunk = 64 << 20
    head = lzma.compress(b"\x80\x04\x8e" + struct.pack("<Q", chunk * streams), preset=0)
    zeros = lzma.compress(bytes(chunk), format=lzma.FORMAT_XZ, preset=0)
    path.write_bytes(head + zeros * streams)
    return chunk * streams


def test_decompression_bomb_stops_at_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bomb.pkl.xz"
    inflated = bomb(path)
    assert path.stat().st_size < inflated // 1000
    monkeypatch.setattr(limits, "MAX_PICKLE_INFLATED", 8 << 20)
    started = time.perf_counter()
    with pytest.raises(LimitExceededError) as caught:
        modelport.open(path)
    assert time.perf_counter() - started < 3
    assert caught.value.limit == 8 << 20


@pytest.mark.parametrize("method", COMPRESSIONS)
def test_truncated_compressed_file(tmp_path: Path, method: str) -> None:
    path = tmp_path / "model.joblib"
    joblib.dump({"w": np.random.default_rng(0).standard_normal(5000)}, path, compress=(method, 3))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 5):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelportError), modelport.open(path) as model:
            for ref in model.tensors.values():
                ref.numpy()


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(",  # frame cut short
        b"\x80\x02}q\x00(X\xff\xff\xff\x7fabc",  # string longer than the file
        b"\x80\x05\x8e" + struct.pack("<Q", 1 << 60) + b"xx",  # bytes8 of 1 EiB
        b"\x80\x02cjoblib.numpy_pickle\nNumpyArrayWrapper\n)\x81}"
        + _str("shape")
        + b"J\x00\x00\x00\x01\x85s"
        + _str("dtype")
        + b"cnumpy\ndtype\n"
        + _str("f8")
        + b"\x85Rsb.",  # joblib array of 2**24 doubles in a 100-byte file
        b"(lp0\nI1\naI2\n",  # protocol 0 without STOP
    ],
)
def test_malformed_pickles(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(data)
    with pytest.raises(ModelportError):
        modelport.open(path)


def test_truncated_joblib_arrays(tmp_path: Path) -> None:
    path = tmp_path / "model.joblib"
    joblib.dump(Estimator(), path)
    data = path.read_bytes()
    for cut in (3, 100, len(data) // 2, len(data) - 2):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelportError):
            modelport.open(path)


def _mutation_seed() -> bytes:
    buffer = io.BytesIO()
    joblib.dump({"w": np.arange(6, dtype=np.float32), "o": np.array([1, None], object)}, buffer)
    return buffer.getvalue()


SEED = _mutation_seed()
COMPRESSED_SEED = zlib.compress(pickle.dumps(arrays(), protocol=5))
# the joblib seed's float32 array (6 elements) lies outside its pickle, as joblib writes it
SEED_LAYOUT = joblib_layout(SEED, raw_nbytes=6 * 4)


@pytest.mark.parametrize(
    "blob",
    [
        *(
            pytest.param(pickle.dumps({"lr": 0.1, "layers": [1, 2]}, protocol=p)[:-1], id=f"p{p}")
            for p in (1, 2, 3, 4, 5)
        ),
        pytest.param(
            pickle.dumps({"lr": 0.1, "layers": [1, 2]}, protocol=0)[:-1],
            id="p0",
        ),
        pytest.param(
            b"P\xff\n.",
            id="p0-non-ascii-persistent-id",
        ),
    ],
)
def test_pickles_python_cannot_walk_are_never_scanned_safe(tmp_path: Path, blob: bytes) -> None:
    assert pickle_end(blob) is None  # the oracle: Python's walk finds no STOP it accepts
    path = tmp_path / "broken.pkl"
    path.write_bytes(blob)
    report = modelport.scan(path)
    assert "safe" not in (report.verdict, report.files[0].verdict), report.to_json()


def test_text_pickle_that_calls_then_fails_is_unsafe(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "calls-then-fails.pkl"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR(.")
    assert pickle_end(path.read_bytes()) == len(path.read_bytes())  # well-formed opcodes
    assert modelport.scan(path).verdict == "unsafe"


def test_pickle_oracles_answer_for_the_seeds(tmp_path: Path) -> None:
    """The stdlib oracles the mutation test relies on say "parses" for the undamaged seeds
    (modelport calls them safe), and "does not parse" for a cut one."""
    joblib_oracle = joblib_pickles_parse(SEED_LAYOUT)
    path = tmp_path / "seed.pkl"
    for seed, oracle in ((SEED, joblib_oracle), (COMPRESSED_SEED, plain_pickle_parses)):
        path.write_bytes(seed)
        assert oracle(path) is True
        assert modelport.scan(path).verdict == "safe"
        path.write_bytes(seed[:-1])
        assert oracle(path) is False
        assert modelport.scan(path).verdict == "error"


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    compressed=st.booleans(),
    cut=st.integers(min_value=0, max_value=4000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4),
)
def test_mutations_only_raise_modelport_errors(
    tmp_path: Path, compressed: bool, cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(COMPRESSED_SEED if compressed else SEED)
    for position, value in flips:
        data[position % len(data)] = value
    path = tmp_path / "mutated.pkl"
    path.write_bytes(bytes(data[: max(1, len(data) - cut % len(data))]))
    oracle = plain_pickle_parses if compressed else joblib_pickles_parse(SEED_LAYOUT)
    intact = COMPRESSED_SEED if compressed else SEED
    assert_typed_error_or_whole(path, pickles=oracle, inspect=True, intact=intact)


@pytest.mark.parametrize("method", ["gzip", "bz2", "xz"])
def test_concatenated_streams(tmp_path: Path, method: str) -> None:
    import bz2
    import gzip

    compress = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[method]
    data = pickle.dumps({"a": np.arange(20_000.0), "b": np.ones(3, np.int16)}, protocol=4)
    path = tmp_path / "multi.pkl"
    path.write_bytes(compress(data[:1000]) + compress(data[1000:90_000]) + compress(data[90_000:]))
    with check_against(path, pickle.loads(data)) as model:
        assert model.details["compression"] == method


def test_joblib_zfile(tmp_path: Path) -> None:
    from joblib.numpy_pickle_compat import write_zfile

    path = tmp_path / "old.pkl"
    with open(path, "wb") as handle:
        write_zfile(handle, pickle.dumps(arrays(), protocol=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joblib's "generated with an old version"
        oracle = joblib.load(path)
    with check_against(path, expected_tensors(oracle)) as model:
        assert model.details["compression"] == "joblib-zfile"


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """Writes bytes as Python 2 wrote its str (BINSTRING), not as ``_codecs.encode`` calls."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_python2_str(self, obj: bytes) -> None:
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def test_python2_numpy_pickles_read_as_numpy_reads_them_with_latin1(tmp_path: Path) -> None:
    arrays = {"w": np.arange(6, dtype="<f4").reshape(2, 3), "b": np.arange(300, dtype="<i8")}
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(arrays)
    path = tmp_path / "py2.pkl"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())  # as numpy documents: Python 2 data needs latin1
    expected = pickle.loads(path.read_bytes(), encoding="latin1")
    with modelport.open(path) as model:
        assert sorted(model.tensors) == sorted(expected)
        for name, tensor in model.tensors.items():
            assert np.array_equal(tensor.numpy(), expected[name])
    assert modelport.scan(path).verdict == "safe"


def test_a_called_container_filled_by_setitems_keeps_its_items(tmp_path: Path) -> None:
    """gensim's phrases pickle a ``defaultdict`` (a call modelport records, never makes) and
    fill it with SETITEMS; its arrays are listed under their keys."""
    table: collections.defaultdict[str, Any] = collections.defaultdict(list)
    table["embedding"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "phrases.pkl"
    path.write_bytes(pickle.dumps({"vocab": table, "min_count": 5}, protocol=2))
    with modelport.open(path) as model:
        assert list(model.tensors) == ["vocab.embedding"]
        assert np.array_equal(model.tensors["vocab.embedding"].numpy(), table["embedding"])
