"""The Python API in the habits people have: ``load`` as ``torch.load`` places tensors,
``open`` as ``safetensors.safe_open`` reads them, one error class for a cut file, one set of
dtype spellings, and command-line output whose names survive a pipe.

Files are written by torch, safetensors, gguf-py and onnx in ``tmp_path``; the oracle is the
library that wrote them (``torch.load``, ``safe_open``, ``gguf.quants.dequantize``)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import modelport
from modelport import dtypes
from modelport.conversion.options import ConvertOptions
from modelport.errors import (
    TensorNotFoundError,
    TruncatedFileError,
    UnsupportedDtypeError,
    UsageError,
)
from tests.conftest import Cli

LONG_NAME = ("encoder." + "attention_block_with_a_long_name." * 3 + "projection.weight").ljust(
    150, "_"
)


def _tied_state_dict(path: Path) -> dict[str, torch.Tensor]:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"a.weight": weight, "a.row": weight[1], "b.bias": torch.arange(5, dtype=torch.int64)}
    torch.save(state, path)
    return state


def _remember(seen: list[tuple[str, str]]) -> Callable[[Any, str], Any]:
    def keep(storage: Any, location: str) -> Any:
        seen.append((type(storage).__name__, location))
        return storage

    return keep


# -- load(map_location=..., strip_prefix=...) against torch.load ------------------------------


@pytest.mark.parametrize(
    "where",
    ["cpu", torch.device("cpu"), {"cpu": "cpu"}, None],
    ids=["string", "device", "dict", "none"],
)
def test_load_places_tensors_as_torch_load_does(tmp_path: Path, where: Any) -> None:
    path = tmp_path / "tied.pt"
    _tied_state_dict(path)
    expected = torch.load(path, map_location=where, weights_only=True)
    loaded = modelport.load(path, map_location=where)
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert loaded[name].device == tensor.device
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    shared = loaded["a.row"].untyped_storage().data_ptr()
    assert shared == loaded["a.weight"].untyped_storage().data_ptr()  # tied, as in torch


def test_a_callable_map_location_sees_what_torch_load_passes(tmp_path: Path) -> None:
    path = tmp_path / "tied.pt"
    _tied_state_dict(path)
    torch_seen: list[tuple[str, str]] = []
    ours_seen: list[tuple[str, str]] = []
    expected = torch.load(path, map_location=_remember(torch_seen), weights_only=True)
    loaded = modelport.load(path, _remember(ours_seen))
    assert ours_seen == torch_seen == [("UntypedStorage", "cpu"), ("UntypedStorage", "cpu")]
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def test_saved_device_tags_reach_dicts_and_callables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file saved from ``cuda:1`` (tagged so by torch's own serialization registry, as a
    GPU would tag it): a dict maps that tag, a callable receives it, as with torch.load."""
    from torch import serialization

    path = tmp_path / "gpu.pt"
    registry = list(serialization._package_registry)
    monkeypatch.setattr(serialization, "_package_registry", registry)
    serialization.register_package(1, lambda obj: "cuda:1", lambda obj, location: obj)
    torch.save({"w": torch.randn(2, 3), "v": torch.ones(4)}, path)
    registry.pop(0)

    torch_seen: list[tuple[str, str]] = []
    ours_seen: list[tuple[str, str]] = []
    torch.load(path, map_location=_remember(torch_seen), weights_only=True)
    modelport.load(path, map_location=_remember(ours_seen))
    assert ours_seen == torch_seen == [("UntypedStorage", "cuda:1")] * 2
    remap = {"cuda:1": "cpu"}
    expected = torch.load(path, map_location=remap, weights_only=True)
    loaded = modelport.load(path, map_location=remap)
    assert loaded["w"].device == expected["w"].device == torch.device("cpu")
    assert torch.equal(loaded["w"], expected["w"])


def test_load_refuses_a_map_location_torch_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "tied.pt"
    _tied_state_dict(path)
    with pytest.raises(UsageError, match="map_location"):
        modelport.load(path, map_location=3)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not both"):
        modelport.load(path, "cpu", device="cpu")


def test_strip_prefix_auto_removes_the_ddp_wrapper(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    path = tmp_path / "ddp.pt"
    torch.save(torch.nn.DataParallel(model).state_dict(), path)  # keys: module.0.weight ...
    expected = model.state_dict()
    for prefix in ("auto", "module."):
        loaded = modelport.load(path, strip_prefix=prefix)
        assert list(loaded) == list(expected)
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert list(modelport.load(path)) == [f"module.{k}" for k in expected]
    model.load_state_dict(modelport.load(path, strip_prefix="auto"), strict=True)


# -- open() as safe_open ----------------------------------------------------------------------


def _safetensors_file(path: Path) -> None:
    save_file(
        {
            "a": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
            "half": torch.linspace(-1, 1, 6, dtype=torch.bfloat16).reshape(3, 2),
            "ids": torch.arange(7, dtype=torch.int32),
        },
        path,
        metadata={"format": "pt", "note": "tiny"},
    )


INDEXES = [
    (slice(0, 1), slice(None), slice(1, 3)),
    (1,),
    (Ellipsis, 2),
    (slice(None), slice(1, None)),
]


@pytest.mark.parametrize("framework", ["np", "pt"])
def test_open_answers_as_safe_open(tmp_path: Path, framework: str) -> None:
    path = tmp_path / "m.safetensors"
    _safetensors_file(path)
    with modelport.open(path, framework=framework) as ours, safe_open(path, framework) as theirs:
        names = theirs.keys()  # a safe_open is not iterable
        assert sorted(ours.keys()) == sorted(names)
        assert ours.metadata() == theirs.metadata() == {"format": "pt", "note": "tiny"}
        for name in names:
            if framework == "np" and name == "half":
                continue  # safetensors' numpy binding has no bfloat16
            mine, reference = ours.get_tensor(name), theirs.get_tensor(name)
            _assert_same(mine, reference)
            piece, reference_piece = ours.get_slice(name), theirs.get_slice(name)
            assert piece.get_shape() == reference_piece.get_shape()
            assert piece.get_dtype() == reference_piece.get_dtype()
        for index in INDEXES:
            _assert_same(ours.get_slice("a")[index], theirs.get_slice("a")[index])


def _assert_same(mine: Any, reference: Any) -> None:
    assert type(mine) is type(reference) or isinstance(mine, np.ndarray)
    if isinstance(reference, torch.Tensor):
        assert mine.dtype == reference.dtype and torch.equal(mine, reference)
    else:
        assert mine.dtype == reference.dtype and np.array_equal(mine, reference)


def test_metadata_is_none_where_safe_open_says_none(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    save_file({"x": torch.ones(2)}, path)
    with modelport.open(path) as ours, safe_open(path, "np") as theirs:
        assert ours.metadata() is None and theirs.metadata() is None
        assert dict(ours.metadata) == {}


def test_get_slice_reads_only_the_rows_it_selects(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    rows, columns = 1024, 4096  # 16 MiB of float32
    save_file({"big": torch.arange(rows * columns, dtype=torch.float32).view(rows, columns)}, path)
    with modelport.open(path) as ours, safe_open(path, "np") as theirs:
        piece = ours.get_slice("big")
        tracemalloc.start()
        try:
            rows_read = piece[500:502]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert np.array_equal(rows_read, theirs.get_slice("big")[500:502])
    assert peak < 1 << 20  # two rows are 32 KiB; the whole tensor would be 16 MiB


def test_open_names_are_load_names_too(tmp_path: Path) -> None:
    """A Lightning-style checkpoint: ``keys()`` names every tensor as inspect does; the names
    ``load`` gives its weights are accepted by ``get_tensor`` and ``get_slice`` as well."""
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "lightning.ckpt"
    checkpoint = {"state_dict": model.state_dict(), "epoch": 3, "global_step": 7}
    torch.save(checkpoint, path)
    expected = torch.load(path, weights_only=True)
    loaded = modelport.load(path)
    assert list(loaded) == list(expected["state_dict"])
    with modelport.open(path, framework="pt") as ours:
        assert ours.keys() == [f"state_dict.{name}" for name in expected["state_dict"]]
        for name, tensor in expected["state_dict"].items():
            assert torch.equal(ours.get_tensor(name), tensor)
            assert torch.equal(ours.get_tensor(f"state_dict.{name}"), tensor)
            assert torch.equal(ours.get_slice(name)[0], tensor[0])
        with pytest.raises(TensorNotFoundError, match="did you mean"):
            ours.get_tensor("state_dict.weigth")


def test_open_refuses_an_unknown_framework(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    _safetensors_file(path)
    with pytest.raises(UsageError, match="framework"):
        modelport.open(path, framework="jax")


# -- GGUF dequantizing from the API -----------------------------------------------------------


def _quantized_gguf(path: Path) -> dict[str, Any]:
    import gguf
    from gguf.quants import quantize

    values = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(path, "llama")
    for kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        writer.add_tensor(f"blk.{kind.name}", quantize(values, kind), raw_dtype=kind)
    writer.add_tensor("norm", values[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_gguf_blocks_dequantize_as_gguf_py_does(tmp_path: Path) -> None:
    from gguf.quants import dequantize

    path = tmp_path / "q.gguf"
    reference = _quantized_gguf(path)
    loaded = modelport.load(path, dequantize=True)
    with modelport.open(path) as ours, modelport.open(path, framework="pt") as as_torch:
        for name in ("blk.Q8_0", "blk.Q4_0"):
            expected = dequantize(reference[name].data, reference[name].tensor_type)
            got = ours.get_tensor(name, dequantize=True)
            assert got.dtype == np.float32 and np.array_equal(got, expected)
            assert torch.equal(as_torch.get_tensor(name, dequantize=True), torch.from_numpy(got))
            assert torch.equal(loaded[name], torch.from_numpy(expected))
            with pytest.raises(UnsupportedDtypeError, match="dequantize=True"):
                ours.get_tensor(name)
        assert np.array_equal(ours.get_tensor("norm", dequantize=True), reference["norm"].data)


# -- one error class for a cut file -----------------------------------------------------------


def test_a_cut_safetensors_is_a_truncated_file_like_a_cut_zip(tmp_path: Path) -> None:
    whole = tmp_path / "whole.safetensors"
    save_file({f"layer.{i}.weight": torch.randn(16, 16) for i in range(4)}, whole)
    data = whole.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    for size in (12, 40, header_end - 1, header_end, header_end + 100, len(data) - 1):
        cut.write_bytes(data[:size])
        with pytest.raises(Exception), safe_open(cut, "np"):  # noqa: B017 (so does safetensors)
            pass
        with pytest.raises(TruncatedFileError):
            modelport.load(cut)
        with pytest.raises(TruncatedFileError):
            modelport.open(cut)
    zipped = tmp_path / "whole.pt"
    torch.save({"w": torch.randn(16, 16)}, zipped)
    (tmp_path / "cut.pt").write_bytes(zipped.read_bytes()[:-40])
    with pytest.raises(TruncatedFileError):
        modelport.load(tmp_path / "cut.pt")


# -- dtype spellings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "torch_dtype"),
    [
        ("fp16", torch.half),
        ("half", torch.half),
        ("F16", torch.float16),
        ("torch.float16", torch.float16),
        ("bf16", torch.bfloat16),
        ("fp32", torch.float),
        ("float", torch.float),
        ("f32", torch.float32),
        ("double", torch.double),
        ("fp64", torch.float64),
        ("fp8", torch.float8_e4m3fn),
        ("fp8_e5m2", torch.float8_e5m2),
    ],
)
def test_dtype_spellings_name_the_torch_dtype(spelling: str, torch_dtype: torch.dtype) -> None:
    name = dtypes.canonical_name(spelling)
    assert getattr(torch, name) is torch_dtype
    assert ConvertOptions(dtype=spelling).dtype == name
    assert dtypes.canonical_name("q8_0") == "q8_0"  # not a float: left for the caller


def test_convert_api_takes_an_alias(tmp_path: Path) -> None:
    source = tmp_path / "m.safetensors"
    _safetensors_file(source)
    target = tmp_path / "half.safetensors"
    modelport.convert(source, target, ConvertOptions(dtype="half"))
    with safe_open(target, "pt") as written:
        assert written.get_tensor("a").dtype == torch.float16
        assert written.get_tensor("ids").dtype == torch.int32


@pytest.mark.parametrize("spelling", ["fp16", "half", "float16", "f16"])
def test_cli_dtype_and_gguf_type_take_the_same_spellings(
    tmp_path: Path, cli: Cli, spelling: str
) -> None:
    import gguf

    source = tmp_path / "m.safetensors"
    _safetensors_file(source)
    target = tmp_path / "out.safetensors"
    result = cli("convert", source, target, "--dtype", spelling)
    assert result.code == 0, result.err
    with safe_open(target, "pt") as written:
        assert written.get_tensor("a").dtype == torch.float16
    as_gguf = tmp_path / "out.gguf"
    result = cli("convert", source, as_gguf, "--gguf-type", spelling)
    assert result.code == 0, result.err
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(as_gguf).tensors}
    assert kinds["a"] == gguf.GGMLQuantizationType.F16
    assert "tensors to f16:" in result.out  # the cast names the type it was to


def test_cli_refuses_an_unknown_dtype(tmp_path: Path, cli: Cli) -> None:
    source = tmp_path / "m.safetensors"
    _safetensors_file(source)
    result = cli("convert", source, tmp_path / "o.safetensors", "--dtype", "fp17")
    assert result.code == 2 and "invalid choice: 'fp17'" in result.err


# -- command-line output that survives a pipe -------------------------------------------------


def test_piped_inspect_and_diff_keep_long_names_whole(tmp_path: Path, cli: Cli) -> None:
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({LONG_NAME: torch.zeros(2, 2), "only_a": torch.ones(1)}, first)
    torch.save({LONG_NAME: torch.ones(2, 2), "only_b": torch.ones(1)}, second)
    assert len(LONG_NAME) == 150
    result = cli("inspect", first, "--tensors")
    assert result.code == 0, result.err
    assert any(LONG_NAME in line for line in result.out.splitlines())
    result = cli("diff", first, second)
    assert result.code == 1, result.err
    assert any(LONG_NAME in line for line in result.out.splitlines())


def test_piped_inspect_keeps_onnx_inputs_and_outputs_whole(tmp_path: Path, cli: Cli) -> None:
    from onnx import TensorProto, helper, save

    names = [f"input_{i}_" + "x" * 120 for i in range(3)]
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"out_{i}"]) for i, name in enumerate(names)],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 768]) for n in names],
        [helper.make_tensor_value_info(f"out_{i}", TensorProto.FLOAT, None) for i in range(3)],
    )
    path = tmp_path / "m.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = cli("inspect", path)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    for name in names:
        assert any(name in line and '["batch", 768]' in line for line in lines), name


def test_a_cut_legacy_torch_file_is_a_truncated_file(tmp_path: Path) -> None:
    """torch's pre-zip stream layout cut inside its storage bytes: torch.load refuses it,
    and the error class is the one a cut safetensors or zip gets."""
    whole = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(64, 64)}, whole, _use_new_zipfile_serialization=False)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    for size in (len(data) // 8, len(data) // 2, len(data) - 10):
        cut.write_bytes(data[:size])
        with pytest.raises(RuntimeError):  # torch: "unexpected EOF"
            torch.load(cut, weights_only=True)
        with pytest.raises(TruncatedFileError):
            modelport.load(cut)
        with pytest.raises(TruncatedFileError):
            modelport.open(cut)


@pytest.mark.parametrize(
    ("spelling", "torch_dtype"),
    [("fp16", torch.float16), ("half", torch.float16), ("bf16", torch.bfloat16),
     ("f32", torch.float32), ("int64", torch.int64)],
)  # fmt: skip
def test_example_input_dtypes_take_the_convert_spellings(
    spelling: str, torch_dtype: torch.dtype
) -> None:
    from modelport.cli.cmd_export import parse_input

    name, value = parse_input(f"x:2,3:{spelling}")
    assert (name, value.dtype, tuple(value.shape)) == ("x", torch_dtype, (2, 3))


def test_wide_keeps_long_names_whole_on_a_terminal(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({LONG_NAME: torch.zeros(2, 2)}, first)
    torch.save({LONG_NAME: torch.ones(2, 2)}, second)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")
    fitted = cli("inspect", first, "--tensors")
    assert fitted.code == 0 and LONG_NAME not in fitted.out  # rich fits the terminal
    for argv in (("inspect", first, "--tensors"), ("diff", first, second)):
        result = cli(*argv, "--wide")
        assert result.code in (0, 1), result.err
        assert any(LONG_NAME in line for line in result.out.splitlines()), argv
