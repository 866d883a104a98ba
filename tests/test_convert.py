"""modelport convert: every source format x every target modelport writes.

The oracle is the original tensors: written by a source library, converted by modelport,
read back by the target's reference library, and compared bit for bit."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import modelport
from modelport.conversion.options import ConvertOptions
from modelport.conversion.verifying import verify
from modelport.errors import ConversionError, UnsafeModelError, UsageError
from modelport.formats.registry import every_writer
from modelport.transfer import streaming
from modelport.transfer.write_plan import OutputTensor, WritePlan
from modelport.tree import names as trees
from tests.conftest import Cli, torch_digest
from tests.models import TiedLM, TinyResNet, trained_checkpoint

WRITABLE = {r.format.value: r for r in every_writer()}
SUFFIX = {"safetensors": ".safetensors", "torch-zip": ".pt", "npz": ".npz", "gguf": ".gguf"}


def original() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TinyResNet(width=4).state_dict().items()}


def write_source(kind: str, path: Path, state: dict[str, torch.Tensor]) -> Path:
    """The state_dict written by the source format's own library."""
    if kind == "torch-zip":
        torch.save(state, path)
    elif kind == "torch-legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif kind == "checkpoint":
        torch.save({"epoch": 1, "model_state_dict": state, "optimizer_state_dict": {}}, path)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    elif kind == "npz":
        with open(path, "wb") as handle:  # a file object: savez would append .npz to a name
            np.savez(handle, **{k: v.numpy() for k, v in state.items()})
    elif kind == "gguf":
        import gguf

        writer = gguf.GGUFWriter(path, "test")
        for name, tensor in state.items():
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    elif kind == "hdf5":
        import h5py

        with h5py.File(path, "w") as handle:
            for name, tensor in state.items():
                handle.create_dataset(name, data=tensor.numpy())
    else:
        raise AssertionError(kind)
    return path


def read_target(kind: str, path: Path) -> dict[str, torch.Tensor]:
    """The output, read by the target format's reference library."""
    if kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if kind == "torch-zip":
        return dict(torch.load(path, weights_only=True))
    if kind == "npz":
        with np.load(path) as archive:
            return {
                k: torch.from_numpy(archive[k].copy())
                for k in archive.files
                if not k.startswith("__")
            }
    if kind == "gguf":
        import gguf

        reader = gguf.GGUFReader(path)
        return {
            t.name: torch.from_numpy(
                np.array(t.data).reshape(list(reversed(t.shape.tolist()))).copy()
            )
            for t in reader.tensors
        }
    raise AssertionError(kind)


SOURCES = ["torch-zip", "torch-legacy", "checkpoint", "safetensors", "npz", "gguf", "hdf5"]


@pytest.mark.parametrize("target", sorted(WRITABLE))
@pytest.mark.parametrize("source", SOURCES)
def test_matrix_bit_exact(tmp_path: Path, source: str, target: str) -> None:
    state = original()
    if target == "gguf" or source == "gguf":  # GGUF has no 0-d tensors: keep shapes >= 1-d
        state = {k: v for k, v in state.items() if v.dim() > 0}
    src = write_source(source, tmp_path / f"source{'.h5' if source == 'hdf5' else '.bin'}", state)
    dst = tmp_path / f"out{SUFFIX[target]}"
    report = modelport.convert(src, dst)
    assert report.verified
    assert modelport.scan(dst).verdict == "safe"  # every output modelport writes scans safe
    got = read_target(target, dst)
    assert sorted(got) == sorted(state)
    for name, tensor in state.items():
        assert torch_digest(got[name].reshape(tensor.shape)) == torch_digest(tensor), name


def test_whole_module_without_class_to_safetensors(tmp_path: Path) -> None:
    model = TinyResNet()
    src = tmp_path / "whole.pt"
    torch.save(model, src)
    with pytest.warns(modelport.errors.SuspiciousModelWarning):
        report = modelport.convert(src, tmp_path / "w.safetensors")
    assert "pickled" in report.selection
    from safetensors.torch import load_file

    got = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_checkpoint_selection_and_left_out(tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    torch.save(trained_checkpoint(TinyResNet(), torch.randn(2, 3, 8, 8)), src)
    report = modelport.convert(src, tmp_path / "w.safetensors")
    assert report.selection == "took the weights under 'model_state_dict'"
    assert set(report.left_out) == {"epoch", "optimizer_state_dict", "loss"}
    report = modelport.convert(
        src,
        tmp_path / "adam.safetensors",
        modelport.ConvertOptions(extract="optimizer_state_dict.state"),
    )
    assert any(name.endswith("exp_avg") for name, *_ in report.tensors)


def test_tied_weights_stored_once_and_restored(tmp_path: Path) -> None:
    model = TiedLM()
    src = tmp_path / "tied.bin"
    torch.save(model.state_dict(), src)
    out = tmp_path / "tied.safetensors"
    report = modelport.convert(src, out)
    assert report.aliases == {"head.weight": "embed.weight"}
    from safetensors import safe_open

    with safe_open(out, "pt") as handle:
        assert "head.weight" not in handle.keys()  # noqa: SIM118 - not a dict
        assert handle.metadata()["head.weight"] == "embed.weight"
    restored = modelport.load(out)
    assert restored["head.weight"].data_ptr() == restored["embed.weight"].data_ptr()
    loaded = TiedLM()
    from safetensors.torch import load_model

    missing, unexpected = load_model(loaded, out)
    assert not missing and not unexpected
    assert torch.equal(loaded.head.weight, model.head.weight)
    for suffix in (".npz", ".gguf", ".pt"):  # no alias record there: every name is written
        other = tmp_path / f"tied{suffix}"
        assert modelport.convert(src, other).aliases == {}
        assert set(modelport.load(other)) == set(model.state_dict())
    flat = tmp_path / "flat.safetensors"
    modelport.convert(src, flat, modelport.ConvertOptions(materialize_ties=True))
    from safetensors.torch import load_file

    assert set(load_file(flat)) == set(model.state_dict())


def test_dtype_cast_touches_floats_only_and_reports_error(tmp_path: Path) -> None:
    state = {
        "w": torch.randn(64, 64) * 10,
        "big": torch.tensor([1e6, -1e6, 1.0]),
        "ids": torch.arange(5),
    }
    src = tmp_path / "s.pt"
    torch.save(state, src)
    out = tmp_path / "half.safetensors"
    report = modelport.convert(src, out, modelport.ConvertOptions(dtype="float16"))
    from safetensors.torch import load_file

    got = load_file(out)
    assert got["w"].dtype == torch.float16 and got["ids"].dtype == torch.int64
    assert torch.equal(got["w"], state["w"].half())
    checks = {c.name: c for c in report.casts}
    assert checks["big"].overflow == 2
    assert checks["w"].max_abs_error == pytest.approx(
        float((state["w"].half().float() - state["w"]).abs().max())
    )
    bf16 = tmp_path / "bf16.safetensors"
    modelport.convert(src, bf16, modelport.ConvertOptions(dtype="bfloat16"))
    assert torch.equal(load_file(bf16)["w"], state["w"].bfloat16())


def test_prefixes_renames_and_globs(tmp_path: Path) -> None:
    state = {f"module.{k}": v for k, v in original().items()}
    src = tmp_path / "ddp.pt"
    torch.save(state, src)
    report = modelport.convert(src, tmp_path / "a.safetensors")
    assert any("module." in note for note in report.notes)
    assert all(name.startswith("module.") for name, *_ in report.tensors)  # reported, not stripped
    report = modelport.convert(
        src,
        tmp_path / "b.safetensors",
        modelport.ConvertOptions(
            strip_prefix="auto",
            add_prefix="net.",
            renames=((r"\.bn(\d)\.", r".norm\1."),),
            exclude=("*num_batches_tracked",),
        ),
    )
    names = [name for name, *_ in report.tensors]
    assert "net.layer1.0.norm1.weight" in names
    assert not any("num_batches_tracked" in n for n in names)
    with pytest.raises(UsageError, match="two tensors"):
        modelport.convert(
            src, tmp_path / "c.safetensors", modelport.ConvertOptions(renames=((".*", "x"),))
        )


def test_refusals_leave_nothing(tmp_path: Path, marker: Path, attacks: dict[str, bytes]) -> None:
    src = tmp_path / "s.pt"
    torch.save(original(), src)
    with pytest.raises(ConversionError, match="overwrite the input"):
        modelport.convert(src, src, modelport.ConvertOptions(to="torch", overwrite=True))
    existing = tmp_path / "exists.safetensors"
    existing.write_text("keep me")
    with pytest.raises(ConversionError, match="exists"):
        modelport.convert(src, existing)
    assert existing.read_text() == "keep me"
    with pytest.raises(UsageError, match="format"):
        modelport.convert(src, tmp_path / "out.unknown")
    evil = tmp_path / "evil.bin"
    evil.write_bytes(attacks["exec"])
    with pytest.raises(UnsafeModelError):
        modelport.convert(evil, tmp_path / "e.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.bin", "exists.safetensors", "s.pt"]
    assert not marker.exists()


def test_interrupted_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "s.pt"
    torch.save(original(), src)
    calls = {"n": 0}
    real: Callable[..., int] = streaming.write_tensor

    def interrupted(*args: object, **kwargs: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("modelport.formats.safetensors_writer.write_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        modelport.convert(src, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def test_disk_full_is_reported_and_cleaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "s.pt"
    torch.save(original(), src)

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("modelport.formats.safetensors_writer.write_tensor", full)
    with pytest.raises(ConversionError, match="disk is full"):
        modelport.convert(src, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


@pytest.mark.parametrize("target", ["out.safetensors", "out.pt", "out.npz", "out.gguf"])
def test_verification_catches_a_corrupted_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """A byte that changes on its way to the output fails the verification (made while
    the writing goes on), and nothing is installed."""
    src = tmp_path / "s.pt"
    torch.save({"w": torch.ones(8)}, src)
    real = streaming._copy_range

    def corrupting(path: object, offset: int, length: int, handle: Any) -> object:
        result = real(path, offset, length, handle)
        handle.seek(-1, 1)
        handle.write(b"\x7f")
        return result

    monkeypatch.setattr(streaming, "_copy_range", corrupting)
    with pytest.raises(modelport.errors.VerificationError):
        modelport.convert(src, tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def test_verification_without_background_checks_reads_everything_back(tmp_path: Path) -> None:
    """``verify`` alone (no ranges compared while writing) still finds a changed byte."""
    src = tmp_path / "s.pt"
    torch.save({"w": torch.arange(16, dtype=torch.float32)}, src)
    out = tmp_path / "out.safetensors"
    assert modelport.convert(src, out).verified
    with modelport.open(src) as model:
        tensors = trees.tensors_of(model.tree)
        plan = WritePlan(tuple(OutputTensor(n, t.dtype, t) for n, t in tensors.items()), {})
        assert verify(out, plan) == ()
        data = bytearray(out.read_bytes())
        data[-1] ^= 0xFF
        out.write_bytes(bytes(data))
        with pytest.raises(modelport.errors.VerificationError):
            verify(out, plan)


def test_cli_convert_json_and_exit_codes(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "s.pt"
    torch.save(original(), src)

    result = cli("convert", src, tmp_path / "o.safetensors", "--json")
    assert result.code == 0, result.err
    payload = result.json
    assert payload["verified"] is True and payload["target_format"] == "safetensors"
    assert cli("convert", src, tmp_path / "o.safetensors").code == 2  # exists
    dry = cli("convert", src, tmp_path / "d.safetensors", "--dry-run")
    assert dry.code == 0 and "would write" in dry.out
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "out.pt"])
def test_verification_catches_a_wrong_cast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """A cast written wrong fails the verification (made on the checking thread while the
    file is written), and nothing is installed."""
    src = tmp_path / "s.pt"
    torch.save({"w": torch.linspace(-2, 2, 64), "steps": torch.arange(3)}, src)
    real = streaming.cast_chunk

    def off_by_one_ulp(chunk: Any, source_dtype: str, target_dtype: str) -> Any:
        out = real(chunk, source_dtype, target_dtype).copy()
        out.view(np.uint16)[5] ^= 1
        return out

    monkeypatch.setattr(streaming, "cast_chunk", off_by_one_ulp)
    options = modelport.ConvertOptions(dtype="bfloat16")
    with pytest.raises(modelport.errors.VerificationError, match=r"^w: "):
        modelport.convert(src, tmp_path / target, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]
    monkeypatch.undo()
    report = modelport.convert(src, tmp_path / target, options)
    assert report.verified and [c.name for c in report.casts] == ["w"]


@pytest.mark.parametrize("target", ["out.safetensors", "out.pt", "out.npz"])
def test_without_linux_only_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """macOS builds of Python have neither ``os.copy_file_range`` nor ``os.preadv``: the
    conversion, its checks and a strided view fall back to ``pread``/``pwrite``."""
    src = tmp_path / "s.pt"
    base = torch.randn(6, 8)
    torch.save({"w": torch.randn(16, 4), "view": base[:, :3], "half": torch.randn(5)}, src)
    monkeypatch.delattr("os.copy_file_range", raising=False)
    monkeypatch.delattr("os.preadv", raising=False)
    report = modelport.convert(src, tmp_path / target)
    assert report.verified
    options = modelport.ConvertOptions(dtype="bfloat16")
    cast = modelport.convert(src, tmp_path / f"bf16-{target}", options)
    assert cast.verified
    loaded = modelport.load(tmp_path / target)
    assert torch.equal(loaded["view"], base[:, :3]) and loaded["w"].shape == (16, 4)


def test_an_output_that_appears_meanwhile_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs to one target: the one that finishes second is refused at install time."""
    src = tmp_path / "s.pt"
    torch.save(original(), src)
    target = tmp_path / "out.safetensors"
    real: Callable[..., int] = streaming.write_tensor

    def other_run_finishes_first(*args: object, **kwargs: object) -> int:
        if not target.exists():
            target.write_bytes(b"the other run's output")
        return real(*args, **kwargs)

    monkeypatch.setattr(
        "modelport.formats.safetensors_writer.write_tensor", other_run_finishes_first
    )
    with pytest.raises(ConversionError, match="appeared while the output was being written"):
        modelport.convert(src, target)
    assert target.read_bytes() == b"the other run's output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "s.pt"]


def test_temporary_files_of_a_killed_run_are_removed_by_the_next(tmp_path: Path) -> None:
    """kill -9 leaves a run's temporary file behind; the next run to that target removes it,
    and never one whose process is still alive."""
    import os
    import subprocess
    import sys

    from modelport.transfer import placing

    src = tmp_path / "s.pt"
    torch.save(original(), src)
    target = tmp_path / "out.safetensors"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)  # a process that has exited
    live = placing.sibling(target, "tmp")  # this process's own name scheme
    stale = live.with_name(live.name.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    stale.write_bytes(b"half of a killed conversion")
    live.write_bytes(b"another conversion still running")
    modelport.convert(src, target)
    assert not stale.exists()
    assert live.read_bytes() == b"another conversion still running"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, "out.safetensors", "s.pt"]
    )


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write into: a read-only tmpfs where this runs as root (root
    ignores permission bits), a folder without write permission otherwise."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("root without the right to mount a tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("target", ["out.safetensors", "hf-folder"])
def test_a_read_only_target_is_refused_and_nothing_is_left(
    tmp_path: Path, read_only_folder: Path, target: str
) -> None:
    src = tmp_path / "s.pt"
    torch.save(original(), src)
    options = ConvertOptions(to="hf" if target == "hf-folder" else None)
    reason = "read-only" if os.geteuid() == 0 else "permission denied"
    with pytest.raises(ConversionError, match=reason):
        modelport.convert(src, read_only_folder / target, options)
    assert list(read_only_folder.iterdir()) == []
