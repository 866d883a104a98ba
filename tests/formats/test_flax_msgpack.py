"""Flax ``.msgpack`` state dicts. The default tests write files with ``msgpack`` the way
``flax.serialization`` does (``_ndarray_to_bytes``, ``_msgpack_ext_pack``, ``_chunk``) and
read them back with ``msgpack.unpackb`` and flax's ext hook rebuilt here; the heavy tests
let flax itself write (``to_bytes`` of a ``flax.linen`` model's variables) and restore
(``msgpack_restore``): flax and jax take more than a second to import.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport.errors import (
    CorruptFileError,
    LimitExceededError,
    TruncatedFileError,
    UnsupportedDtypeError,
)
from modelport.formats import _msgpack, flax_msgpack
from modelport.formats.protocol import Format, Probe
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole, damage

msgpack = pytest.importorskip("msgpack")

ARRAY, COMPLEX, SCALAR = 1, 2, 3  # flax.serialization._MsgpackExtType


def _array_bytes(arr: np.ndarray) -> bytes:
    """flax's ``_ndarray_to_bytes``."""
    return bytes(msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True))


def _pack_leaf(x: Any) -> Any:
    """flax's ``_msgpack_ext_pack``."""
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(ARRAY, _array_bytes(x))
    if isinstance(x, np.generic):
        return msgpack.ExtType(SCALAR, _array_bytes(np.asarray(x)))
    if isinstance(x, complex):
        return msgpack.ExtType(COMPLEX, msgpack.packb((x.real, x.imag)))
    return x


def to_bytes(tree: Any) -> bytes:
    return bytes(msgpack.packb(tree, default=_pack_leaf, strict_types=True))


def _unpack_leaf(code: int, data: bytes) -> Any:
    """flax's ``_msgpack_ext_unpack``, bfloat16 and float8 through ml_dtypes as jax does."""
    if code == COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    if code not in (ARRAY, SCALAR):
        return msgpack.ExtType(code, data)
    shape, name, buffer = msgpack.unpackb(data, raw=True)
    kind = getattr(ml_dtypes, name.decode()) if hasattr(ml_dtypes, name.decode()) else name
    array = np.frombuffer(buffer, dtype=np.dtype(kind)).reshape(shape)
    return array[()] if code == SCALAR else array


def restore(raw: bytes) -> Any:
    """flax's ``msgpack_restore`` with ``_unchunk_array_leaves_in_place``."""
    tree = msgpack.unpackb(raw, ext_hook=_unpack_leaf, raw=False, strict_map_key=False)
    return _unchunk(tree)


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict) and "__msgpack_chunked_array__" in tree:
        shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    if isinstance(tree, dict):
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Array leaves by dotted key path (``flax.traverse_util.flatten_dict(sep=".")``)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree} if isinstance(tree, (np.ndarray, np.generic)) else {}


def state_dict() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "params": {
            "Embed_0": {"embedding": rng.normal(size=(10, 4)).astype(ml_dtypes.bfloat16)},
            "Dense_0": {
                "kernel": rng.normal(size=(4, 3)).astype(np.float32),
                "bias": np.zeros(3, np.float32),
            },
            "layers": {
                "0": {"scale": np.arange(6, dtype=np.float16).reshape(2, 3)},
                "1": {"w": np.asfortranarray(rng.normal(size=(3, 2)))},  # written C order
            },
        },
        "batch_stats": {"count": np.asarray(7, np.int64), "mask": np.array([True, False])},
        "opt": {
            "step": np.int32(5),  # a numpy scalar: ext 3
            "ids": np.arange(5, dtype=np.uint8),
            "phase": np.array([1 + 2j], np.complex64),
            "empty": np.zeros((0, 3), np.int16),
            "fp8": np.linspace(-1, 1, 4).astype(ml_dtypes.float8_e4m3fn),
        },
        "meta": {"lr": 0.5, "name": "model", "rot": 3 - 1j, "none": None, "raw": b"\x00\x01"},
        "rng": np.array([0, 42], np.uint32),  # five top keys
    }


def test_tensors_match_what_flax_restores(tmp_path: Path) -> None:
    path = tmp_path / "flax_model.msgpack"
    raw = to_bytes(state_dict())
    path.write_bytes(raw)
    expected = flatten(restore(raw))
    with modelport.open(path) as model:
        assert model.format is Format.FLAX_MSGPACK
        assert list(model.tensors) == list(expected)
        for name, want in expected.items():
            ref = model.tensors[name]
            got = ref.numpy()
            assert got.shape == np.shape(want), name
            assert got.dtype == np.asarray(want).dtype, name
            assert digest(got) == digest(np.asarray(want)), name
            offset, length = ref.byte_range() or (0, -1)
            assert raw[offset : offset + length] == np.asarray(want).tobytes(), name
    with modelport.open(path) as model:
        assert model.tensors["params.Embed_0.embedding"].dtype == "bfloat16"
        assert model.tensors["opt.step"].shape == ()
        assert model.tensors["opt.fp8"].dtype == "float8_e4m3fn"


def test_values_beside_the_arrays(tmp_path: Path) -> None:
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(to_bytes(state_dict()))
    contents = flax_msgpack.READER.contents(Probe.of(path))
    meta = contents.tree["meta"]
    assert meta == restore(path.read_bytes())["meta"]
    assert isinstance(meta["rot"], complex)
    assert contents.details["top_level_keys"] == ["params", "batch_stats", "opt", "meta", "rng"]
    assert contents.warnings == []


def test_inspect_scan_and_convert(tmp_path: Path) -> None:
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(to_bytes(state_dict()))
    report = modelport.inspect(path).to_json()
    assert report["format"] == "flax-msgpack"
    assert report["parameters"] == sum(np.size(a) for a in flatten(state_dict()).values())
    target = tmp_path / "out.safetensors"
    modelport.convert(path, target)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    written = safetensors_torch.load_file(target)
    assert set(written) == set(flatten(state_dict()))
    kernel = state_dict()["params"]["Dense_0"]["kernel"]
    assert digest(written["params.Dense_0.kernel"].numpy()) == digest(kernel)
    assert str(written["params.Embed_0.embedding"].dtype) == "torch.bfloat16"


@pytest.mark.parametrize("keys", [1, 5, 8, 16, 17])
def test_scan_says_safe(tmp_path: Path, keys: int) -> None:
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(to_bytes({f"k{i}": {"w": np.ones(2, np.float32)} for i in range(keys)}))
    report = modelport.scan(path)
    assert (report.verdict, report.files[0].format) == ("safe", "flax-msgpack")


@pytest.mark.parametrize("keys", [2, 3, 4])
def test_scan_of_maps_opening_like_pickle_ext(tmp_path: Path, keys: int) -> None:
    """0x82-0x84 open a map of 2 to 4 keys and are pickle's EXT opcodes: pickle.loads stops
    at the unregistered code, so the file is no pickle reading."""
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(to_bytes({f"k{i}": {"w": np.ones(2, np.float32)} for i in range(keys)}))
    assert modelport.scan(path).verdict == "safe"


def _chunked(arr: np.ndarray, size: int) -> dict[str, Any]:
    """flax's ``_chunk`` with ``MAX_CHUNK_SIZE`` = ``size`` bytes."""
    step = max(1, size // arr.dtype.itemsize)
    flat = arr.reshape(-1)
    pieces = [flat[i : i + step] for i in range(0, flat.size, step)]
    return {
        "__msgpack_chunked_array__": True,
        "shape": {str(i): n for i, n in enumerate(arr.shape)},
        "chunks": {str(i): piece for i, piece in enumerate(pieces)},
    }


def test_chunked_arrays_read_as_one_tensor(tmp_path: Path) -> None:
    big = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(to_bytes({"params": {"big": _chunked(big, 64), "small": big[0]}}))
    expected = flatten(restore(path.read_bytes()))
    with modelport.open(path) as model:
        assert list(model.tensors) == ["params.big", "params.small"]
        ref = model.tensors["params.big"]
        assert ref.shape == (3, 4, 5)
        assert ref.byte_range() is None  # read chunk by chunk, not a flat range
        assert digest(ref.numpy()) == digest(expected["params.big"]) == digest(big)


def test_sniffing_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "x.msgpack"
    cases = {
        to_bytes({"params": {"w": np.ones(2, np.float32)}}): True,
        to_bytes({"params": {"w": 1.0}}): False,  # no array
        to_bytes({1: np.ones(2, np.float32)}): False,  # first key not a str
        to_bytes([np.ones(2, np.float32)]): False,  # not a map
        bytes(msgpack.packb({"a": msgpack.ExtType(1, b"\x93\x91\x01")})): False,  # cut header
        b"\x80\x04\x95": False,  # a pickle's PROTO opcode reads as an empty fixmap
    }
    for raw, expected in cases.items():
        path.write_bytes(raw)
        assert flax_msgpack.sniff(Probe.of(path)) is expected, raw[:20]
    path.write_bytes(to_bytes({"params": {"w": np.ones(100, np.float32)}})[:-1])
    assert flax_msgpack.sniff(Probe.of(path))  # a whole array header: cut, not another format
    with pytest.raises(TruncatedFileError):
        modelport.open(path)


def test_every_cut_is_a_truncated_file(tmp_path: Path) -> None:
    raw = to_bytes(state_dict())
    path = tmp_path / "cut.msgpack"
    detected = 0
    for length in range(1, len(raw)):
        path.write_bytes(raw[:length])
        with pytest.raises(TruncatedFileError):
            flax_msgpack.READER.contents(Probe.of(path))
        if flax_msgpack.sniff(Probe.of(path)):  # open says truncated too, not unknown
            detected += 1
            with pytest.raises(TruncatedFileError):
                modelport.open(path)
    assert detected > len(raw) - 100  # every cut once the first array's header is whole


def test_nesting_past_the_depth_limit(tmp_path: Path) -> None:
    path = tmp_path / "deep.msgpack"
    leaf = msgpack.ExtType(ARRAY, _array_bytes(np.ones(1, np.float32)))
    deep: Any = {"w": leaf}
    for _ in range(modelport.limits.MAX_DEPTH + 5):
        deep = {"a": deep}
    path.write_bytes(bytes(msgpack.packb({"w": leaf, "deep": deep})))
    with pytest.raises(LimitExceededError, match="nesting depth"):
        modelport.open(path)
    nested = b"\x81\xa1a" * 100_000 + b"\xc0"  # far past Python's recursion limit
    path.write_bytes(nested)
    with pytest.raises(LimitExceededError, match="nesting depth"):
        flax_msgpack.READER.contents(Probe.of(path))


def _ext(payload: bytes, code: int = ARRAY) -> bytes:
    return bytes(msgpack.packb({"w": msgpack.ExtType(code, payload)}))


def test_malformed_files_give_typed_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.msgpack"
    good = _array_bytes(np.ones(2, np.float32))
    cases: list[tuple[bytes, type[Exception], str]] = [
        (b"\x81\xa1w\xc1", CorruptFileError, "never used"),
        (b"\x81\xa2\xff\xfe\xc0", CorruptFileError, "UTF-8"),
        (b"\x81\x91\x01\xc0", CorruptFileError, "map key"),
        (b"\xdf\xff\xff\xff\xff\xa1w", TruncatedFileError, "4,294,967,295 entries"),
        (b"\xc6\x7f\xff\xff\xff", TruncatedFileError, "bin"),
        (b"\x91\x01", CorruptFileError, "not a list"),
        (_ext(bytes(msgpack.packb(((2,), "float32", b"\0" * 4)))), CorruptFileError, "do not"),
        (_ext(bytes(msgpack.packb(((1,), "int4", b"\0")))), UnsupportedDtypeError, "int4"),
        (_ext(bytes(msgpack.packb(((-1,), "uint8", b"")))), CorruptFileError, "shape"),
        (_ext(bytes(msgpack.packb(((1,) * 65, "uint8", b"\0")))), LimitExceededError, "rank"),
        (_ext(bytes(msgpack.packb(((1,), "uint8", "x")))), CorruptFileError, "bin"),
        (_ext(good + b"\0"), CorruptFileError, "bin ending"),
        (_ext(bytes(msgpack.packb((1, 2, 3))), COMPLEX), CorruptFileError, "complex"),
    ]
    for raw, error, match in cases:
        path.write_bytes(raw)
        with pytest.raises(error, match=match):
            flax_msgpack.READER.contents(Probe.of(path))


def test_unknown_ext_and_trailing_bytes_are_warnings(tmp_path: Path) -> None:
    path = tmp_path / "odd.msgpack"
    tree = {"w": np.ones(2, np.float32), "x": msgpack.ExtType(9, b"abc")}
    path.write_bytes(to_bytes(tree) + b"\0\0")
    contents = flax_msgpack.READER.contents(Probe.of(path))
    assert repr(contents.tree["x"]) == "<msgpack ext type 9, 3 bytes>"
    assert contents.warnings == [
        "2 bytes after the state dict are ignored",
        "ext types flax does not write (9) are kept as opaque records",
    ]


SCALARS = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, width=32)  # exact in both float widths
    | st.text(max_size=300)
    | st.binary(max_size=300),
    lambda children: (
        st.lists(children, max_size=20)
        | st.dictionaries(st.text(max_size=5) | st.integers(-5, 300), children, max_size=20)
    ),
    max_leaves=60,
)


@settings(max_examples=100, deadline=None)
@given(value=SCALARS, single=st.booleans())
def test_decoder_agrees_with_msgpack(value: Any, single: bool) -> None:
    raw = bytes(msgpack.packb(value, use_bin_type=True, use_single_float=single))
    decoded, end = _msgpack.decode(raw, lambda code, offset, length: None)
    assert end == len(raw)
    assert decoded == msgpack.unpackb(raw, raw=False, strict_map_key=False)


def test_decoder_reads_every_length_width() -> None:
    values = [
        "a" * 40, "b" * 300, "c" * 70_000, b"d" * 300, b"e" * 70_000,
        list(range(20)), list(range(70_000)), {str(i): i for i in range(20)},
        -33, -129, -40_000, -(2**40), 200, 40_000, 2**40, 1.5,
    ]  # fmt: skip
    raw = bytes(msgpack.packb(values, use_bin_type=True))
    decoded, _ = _msgpack.decode(raw, lambda code, offset, length: None)
    assert decoded == values
    exts = [msgpack.ExtType(5, b"x" * n) for n in (1, 2, 4, 8, 16, 3, 300, 70_000)]
    raw = bytes(msgpack.packb(exts))
    seen, _ = _msgpack.decode(
        raw, lambda code, offset, length: (code, raw[offset : offset + length])
    )
    assert seen == [(e.code, e.data) for e in exts]


def test_hf_folder_holding_only_flax_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    tree = {"bert": {"pooler": {"dense": {"kernel": np.ones((2, 2), np.float32)}}}}
    (tmp_path / "flax_model.msgpack").write_bytes(to_bytes(tree))
    with modelport.open(tmp_path) as model:
        assert model.format is Format.HF_DIR
        assert list(model.tensors) == ["bert.pooler.dense.kernel"]
        assert model.tensors["bert.pooler.dense.kernel"].numpy().sum() == 4


def _valid() -> bytes:
    rng = np.random.default_rng(1)
    tree = {
        "params": {"k": rng.normal(size=(3, 2)).astype(np.float32), "b": np.arange(3)},
        "big": _chunked(np.arange(12, dtype=np.int16), 8),
        "s": np.float32(2.0),
    }
    return to_bytes(tree)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_only_raise_modelport_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.msgpack"
    path.write_bytes(damage(data, _valid()))
    assert_typed_error_or_whole(path, inspect=True, intact=_valid())


# -- flax itself as writer and oracle -----------------------------------------------------------


def _linen_variables() -> Any:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    nn = pytest.importorskip("flax.linen")

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, ids: Any) -> Any:
            hidden = nn.Embed(11, 4, param_dtype=jnp.bfloat16, name="embed")(ids)
            hidden = nn.LayerNorm(name="norm")(hidden)
            hidden = nn.BatchNorm(use_running_average=False, name="bn")(hidden)
            return nn.Dense(3, name="head")(hidden)

    return Tiny().init(jax.random.PRNGKey(0), jnp.zeros((2,), jnp.int32))


@pytest.mark.heavy
def test_flax_to_bytes_of_a_linen_model(tmp_path: Path) -> None:
    serialization = pytest.importorskip("flax.serialization")
    traverse_util = pytest.importorskip("flax.traverse_util")
    raw = serialization.to_bytes(_linen_variables())
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(raw)
    expected = traverse_util.flatten_dict(serialization.msgpack_restore(raw), sep=".")
    assert "params.embed.embedding" in expected and "batch_stats.bn.mean" in expected
    with modelport.open(path) as model:
        assert list(model.tensors) == list(expected)
        for name, want in expected.items():
            got = model.tensors[name].numpy()
            assert (got.dtype, got.shape) == (want.dtype, want.shape), name
            assert digest(got) == digest(want), name
        assert model.tensors["params.embed.embedding"].dtype == "bfloat16"
        assert model.tensors["params.head.kernel"].dtype == "float32"
    path.write_bytes(serialization.to_bytes({"params": _linen_variables()["params"]}))
    assert modelport.scan(path).verdict == "safe"  # one top key


@pytest.mark.heavy
def test_flax_chunks_large_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serialization = pytest.importorskip("flax.serialization")
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 16)  # every kernel is chunked
    variables = _linen_variables()
    raw = serialization.to_bytes(variables)
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(raw)
    restored = serialization.msgpack_restore(raw)
    kernel = restored["params"]["head"]["kernel"]
    with modelport.open(path) as model:
        ref = model.tensors["params.head.kernel"]
        assert ref.shape == kernel.shape and math.prod(ref.shape) * 4 > 16
        assert digest(ref.numpy()) == digest(kernel)
        assert model.details["chunked_arrays"] >= 1
