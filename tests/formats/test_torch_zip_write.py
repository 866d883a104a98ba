"""Writing torch zip archives, with torch.load (weights_only, with and without mmap) as the
oracle: every tensor equal bit for bit, storages shared as in the source."""

from __future__ import annotations

import collections
import hashlib
import io
import pickletools
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import modelport
from modelport.errors import ConversionError
from modelport.formats import _zip_writer, torch_zip
from modelport.transfer.write_plan import OutputTensor, WritePlan
from tests.models import TiedLM, dtype_zoo
from tests.mutation import assert_typed_error_or_whole, damage, zip_pickles_parse

EXTRA_DTYPES = (
    "uint16",
    "uint32",
    "uint64",
    "int16",
    "complex64",
    "complex128",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)


def raw_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in C order, for every dtype (float8, uint16 ... too)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def zoo() -> dict[str, torch.Tensor]:
    tensors = dtype_zoo()
    for name in EXTRA_DTYPES:
        tensors[name] = torch.arange(1, 7).reshape(2, 3).to(getattr(torch, name))
    return tensors


def plan_of(path: Path, casts: dict[str, tuple[str, str]] | None = None, **meta: str) -> Any:
    """Open ``path`` and plan every tensor as stored, plus ``casts``: new name -> (source
    name, dtype). Returns (plan, model); the model must stay open while writing."""
    model = modelport.open(path)
    tensors = [OutputTensor(name, ref.dtype, ref) for name, ref in model.tensors.items()]
    for name, (source, dtype) in (casts or {}).items():
        tensors.append(OutputTensor(name, dtype, model.tensors[source]))
    return WritePlan(tuple(tensors), dict(meta)), model


def in_file_order(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` in the order modelport lists them in ``path`` (safetensors sorts them)."""
    with modelport.open(path) as model:
        return {name: tensors[name] for name in model.tensors}


def write(plan: WritePlan, path: Path) -> Path:
    with open(path, "w+b", buffering=0) as handle:
        torch_zip.write(handle, plan)
    return path


def assert_loads_equal(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """torch.load with and without mmap gives an OrderedDict equal to ``expected``."""
    results = {}
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert type(loaded) is collections.OrderedDict
        assert list(loaded) == list(expected)
        for name, tensor in expected.items():
            got = loaded[name]
            assert got.dtype == tensor.dtype, name
            assert got.shape == tensor.shape, name
            assert not got.requires_grad
            assert raw_digest(got) == raw_digest(tensor), name
        results[str(mmap)] = loaded
    return results["False"]


@pytest.mark.parametrize("source_kind", ["torch", "safetensors"])
def test_dtypes_casts_and_views_load_in_torch(tmp_path: Path, source_kind: str) -> None:
    tensors = zoo()
    if source_kind == "torch":
        source = tmp_path / "zoo.pt"
        torch.save(tensors, source)
    else:  # safetensors stores contiguous tensors, in its own order
        kept = {n: t for n, t in tensors.items() if "fnuz" not in n and n != "complex128"}
        tensors = {n: t.contiguous().clone() for n, t in kept.items()}
        source = tmp_path / "zoo.safetensors"
        save_file(tensors, source)
        tensors = in_file_order(source, tensors)
    casts = {"f32_as_f16": ("f32", "float16"), "t_as_bf16": ("f32", "bfloat16")}
    plan, model = plan_of(source, casts, source="zoo")
    with model:
        out = write(plan, tmp_path / "out.pt")
    expected = dict(tensors)
    expected["f32_as_f16"] = tensors["f32"].half()
    expected["t_as_bf16"] = tensors["f32"].bfloat16()
    loaded = assert_loads_equal(out, expected)
    if source_kind == "torch":  # views keep their strides and their one storage
        for name in ("transposed", "sliced", "view_of_base"):
            assert loaded[name].stride() == tensors[name].stride()
            base = loaded["base"].untyped_storage().data_ptr()
            assert loaded[name].untyped_storage().data_ptr() == base
    with modelport.open(out) as written:
        assert written.format == "torch-zip"
        assert written.metadata == {"source": "zoo"}
        assert list(written.tensors) == list(expected)
        for name, tensor in expected.items():
            ref = written.tensors[name]
            assert ref.dtype == str(tensor.dtype).removeprefix("torch.")
            assert ref.shape == tuple(tensor.shape)
            assert raw_digest(ref.torch()) == raw_digest(tensor), name


def test_tied_weights_share_one_storage_unless_cast(tmp_path: Path) -> None:
    source = tmp_path / "tied.bin"
    state = TiedLM().state_dict()
    torch.save(state, source)
    plan, model = plan_of(source)
    with model:
        out = write(plan, tmp_path / "tied.pt")
        names = [t.name for t in plan.tensors]
        cast = WritePlan(
            tuple(OutputTensor(n, "float16", model.tensors[n]) for n in names), plan.metadata
        )
        out16 = write(cast, tmp_path / "tied16.pt")
    loaded = assert_loads_equal(out, dict(state))
    assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert len([n for n in zipfile.ZipFile(out).namelist() if "/data/" in n]) == len(state) - 1
    halves = torch.load(out16, weights_only=True)
    assert halves["head.weight"].data_ptr() != halves["embed.weight"].data_ptr()
    assert torch.equal(halves["head.weight"], state["head.weight"].half())
    assert modelport.inspect(out).aliases == (("embed.weight", "head.weight"),)


def test_archive_mirrors_torch_save(tmp_path: Path) -> None:
    """Same members in the same order, and data.pkl equal to torch's once both pickles' memo
    indices are renumbered (pickletools.optimize)."""
    base = torch.randn(6, 4)
    state = collections.OrderedDict(
        weight=torch.randn(3),
        base=base,
        transposed=base.t(),
        row=base[2],
        wide=torch.arange(3).to(torch.uint16),
        scalar=torch.tensor(1.5),
        empty=torch.zeros(0, 3),
        long=torch.zeros(70_000, dtype=torch.int8),
    )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    reference = zipfile.ZipFile(buffer)
    source = tmp_path / "ref.pt"
    source.write_bytes(buffer.getvalue())
    plan, model = plan_of(source)
    with model:
        out = write(plan, tmp_path / "out.pt")
    ours = zipfile.ZipFile(out)
    assert ours.namelist() == reference.namelist()
    assert ours.testzip() is None
    assert pickletools.optimize(ours.read("archive/data.pkl")) == pickletools.optimize(
        reference.read("archive/data.pkl")
    )
    for name in ("version", ".format_version", ".storage_alignment", "byteorder"):
        assert ours.read(f"archive/{name}") == reference.read(f"archive/{name}")
    assert len(ours.read("archive/.data/serialization_id")) == 40
    with modelport.open(out) as written:
        for name in state:  # stored members: data 64-byte aligned in the file
            storage = written.tensors[name].storage
            assert storage is not None and storage.offset % 64 == 0
    assert_loads_equal(out, dict(state))
    # equal plans, equal files
    with modelport.open(source) as model:
        plan = WritePlan(tuple(OutputTensor(n, r.dtype, r) for n, r in model.tensors.items()), {})
        assert write(plan, tmp_path / "again.pt").read_bytes() == out.read_bytes()


def test_zip64_records_load_in_torch_and_modelport(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 4 GiB sizes and offsets move to zip64 extra fields; lowering the threshold
    writes them for every member of a small file."""
    monkeypatch.setattr(_zip_writer, "ZIP64_LIMIT", 8)
    tensors = {"a": torch.randn(100), "b": torch.arange(40, dtype=torch.int64), "c": torch.ones(3)}
    source = tmp_path / "src.safetensors"
    save_file(tensors, source)
    plan, model = plan_of(source, meta="x")
    with model:
        out = write(plan, tmp_path / "zip64.pt")
    infos = zipfile.ZipFile(out).infolist()
    assert all(info.extract_version == 45 for info in infos if info.file_size >= 8)
    assert zipfile.ZipFile(out).testzip() is None
    assert_loads_equal(out, in_file_order(source, tensors))
    with modelport.open(out) as written:
        assert written.metadata == {"meta": "x"}
        for name, tensor in tensors.items():
            assert raw_digest(written.tensors[name].torch()) == raw_digest(tensor)


def test_large_tensor_streams_in_bounded_memory(tmp_path: Path) -> None:
    big = torch.randn(16_000_000)  # 64 MB: four 16 MiB streaming chunks
    source = tmp_path / "big.safetensors"
    save_file({"big": big, "small": torch.ones(2)}, source)
    del big
    plan, model = plan_of(source)
    with model:
        tracemalloc.start()
        try:
            out = write(plan, tmp_path / "big.pt")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 40 << 20  # two chunks in flight at most, never the whole tensor
    loaded = torch.load(out, weights_only=True, mmap=True)
    with modelport.open(source) as model:
        assert raw_digest(loaded["big"]) == raw_digest(model.tensors["big"].torch())


def test_inspect_json_of_a_written_archive(tmp_path: Path) -> None:
    source = tmp_path / "src.safetensors"
    save_file({"w": torch.randn(4, 3), "ids": torch.arange(5)}, source)
    plan, model = plan_of(source, {"w16": ("w", "float16")}, origin="src.safetensors")
    with model:
        out = write(plan, tmp_path / "weights.npz")  # a misleading extension
    report = modelport.inspect(out).to_json()
    assert report["format"] == "torch-zip"
    assert report["metadata"] == {"origin": "src.safetensors"}
    assert report["parameters"] == 12 + 5 + 12
    assert {t["name"]: (t["dtype"], t["shape"], t["nbytes"]) for t in report["tensors"]} == {
        "w": ("float32", [4, 3], 48),
        "ids": ("int64", [5], 40),
        "w16": ("float16", [4, 3], 24),
    }
    assert any(".npz" in w for w in report["warnings"])
    assert report["safety"]["verdict"] == "safe"


def test_holds_and_refusals(tmp_path: Path) -> None:
    for dtype in ("float32", "bfloat16", "float8_e4m3fn", "uint64", "bool", "complex128"):
        assert torch_zip.holds(dtype)
    for dtype in ("Q8_0", "qint8", "quint4x2"):
        assert not torch_zip.holds(dtype)
    assert torch_zip.READER.shares_storage
    source = tmp_path / "src.safetensors"
    save_file({"w": torch.ones(2)}, source)
    plan, model = plan_of(source, {"q": ("w", "Q8_0")})
    with model, pytest.raises(ConversionError, match="Q8_0"):
        write(plan, tmp_path / "out.pt")
    plan, model = plan_of(source, {"f4": ("w", "float4_e2m1fn_x2")})
    with model, pytest.raises(ConversionError, match="copied, not cast"):
        write(plan, tmp_path / "out.pt")
    plan, model = plan_of(source, {"w": ("w", "float16")})
    with model, pytest.raises(ConversionError, match="two tensors of one name"):
        write(plan, tmp_path / "out.pt")


def test_bad_metadata_member_is_ignored_with_a_warning(tmp_path: Path) -> None:
    source = tmp_path / "src.safetensors"
    save_file({"w": torch.ones(2)}, source)
    plan, model = plan_of(source, note="x")
    with model:
        raw = bytearray(write(plan, tmp_path / "out.pt").read_bytes())
    member = b'{"note": "x"}'
    at = raw.index(member)
    raw[at : at + len(member)] = b'{"note": 1.5}'  # same length; the CRC no longer matches
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with modelport.open(bad) as written:
        assert written.metadata == {}
        assert any("modelport.json" in w for w in written.warnings)


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True), max_size=5))
    out = {}
    for name in dict.fromkeys(names):
        dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "int64", "uint8", "bool"]))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        values = torch.randn(shape) * 100
        out[name] = values.to(getattr(torch, dtype))
        if draw(st.booleans()) and len(shape) >= 2:
            out[name] = out[name].transpose(0, 1)
    return out


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tensors=tensor_dicts(), cast=st.booleans())
def test_round_trip_random_state_dicts(
    tmp_path: Path, tensors: dict[str, torch.Tensor], cast: bool
) -> None:
    source = tmp_path / "src.pt"
    torch.save(tensors, source)
    with modelport.open(source) as model:
        plan = WritePlan(
            tuple(
                OutputTensor(
                    n, "float16" if cast and r.dtype == "float32" else r.dtype, model.tensors[n]
                )
                for n, r in model.tensors.items()
            ),
            {},
        )
        out = write(plan, tmp_path / "out.pt")
    expected = {n: t.half() if cast and t.dtype == torch.float32 else t for n, t in tensors.items()}
    assert_loads_equal(out, expected)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_damaged_written_archives_raise_only_modelport_errors(
    tmp_path: Path, data: st.DataObject
) -> None:
    source = tmp_path / "src.safetensors"
    if not source.exists():
        save_file({"w": torch.randn(8, 4), "b": torch.arange(3)}, source)
    clean = tmp_path / "clean.pt"
    if not clean.exists():
        plan, model = plan_of(source, {"h": ("w", "float16")}, note="x")
        with model:
            write(plan, clean)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(damage(data, clean.read_bytes()))
    assert_typed_error_or_whole(damaged, pickles=zip_pickles_parse, intact=clean.read_bytes())
