"""modelport's demo: build a small CNN, save it every way people do, inspect, load, verify.

Run through ``scripts/demo`` (it prepares .venv). Output goes to ./demo-output/.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "demo-output"


class DemoNet(nn.Module):
    """A small ResNet-style CNN: conv, batch norm, a residual block, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def sha(tensor: torch.Tensor) -> str:
    flat = tensor.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def cli(*args: str) -> None:
    print(f"\n$ modelport {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "modelport", *args], check=False)


def save_all(model: DemoNet, example: torch.Tensor) -> dict[str, Path]:
    """The same weights, written by each library's own writer."""
    files: dict[str, Path] = {}

    def save(name: str, write: Callable[[Path], object]) -> None:
        path = OUT / name
        try:
            write(path)
            files[name] = path
        except Exception as exc:  # an optional writer may be missing: say so and go on
            print(f"  (skipped {name}: {exc})")

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    model(example.repeat(2, 1, 1, 1)).pow(2).mean().backward()
    optimizer.step()  # one training step, so the checkpoint carries real Adam state
    model.eval()
    state = model.state_dict()
    save("state_dict.pt", lambda p: torch.save(state, p))
    save("legacy.pt", lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))
    save("whole_model.pt", lambda p: torch.save(model, p))
    save(
        "checkpoint.ckpt",
        lambda p: torch.save(
            {
                "epoch": 7,
                "model_state_dict": state,
                "optimizer_state_dict": optimizer.state_dict(),
                "loss": 0.125,
            },
            p,
        ),
    )
    save("renamed.bin.safetensors", lambda p: torch.save(state, p))  # a lying extension

    def safetensors_file(path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"source": "demo"})

    save("model.safetensors", safetensors_file)
    save("scripted.pt", lambda p: torch.jit.save(torch.jit.script(model), p))
    save(
        "model.npz",
        lambda p: __import__("numpy").savez(p, **{k: v.numpy() for k, v in state.items()}),
    )

    def onnx_file(path: Path) -> None:
        torch.onnx.export(model, (example,), path, dynamo=False)

    save("model.onnx", onnx_file)

    def gguf_file(path: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(path, "demo")
        for name, tensor in state.items():
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    save("model.gguf", gguf_file)

    def hdf5_file(path: Path) -> None:
        import h5py

        with h5py.File(path, "w") as handle:
            for name, tensor in state.items():
                handle.create_dataset(name, data=tensor.numpy())

    save("weights.h5", hdf5_file)
    return files


def attack_file() -> Path:
    """A pickle that would create a file if loaded with pickle or torch.load(weights_only=False)."""
    marker = OUT / "PWNED"
    payload = f"open({str(marker)!r}, 'w').write('ran')".encode()
    path = OUT / "innocent_looking.bin"
    path.write_bytes(b"cbuiltins\nexec\n(V" + payload + b"\ntR.")
    return path


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    torch.manual_seed(0)
    model = DemoNet().eval()
    example = torch.randn(1, 3, 16, 16)
    print(f"Saving a {sum(p.numel() for p in model.parameters()):,}-parameter CNN in {OUT}:")
    files = save_all(model, example)
    for name in files:
        print(f"  {name}")

    cli("inspect", str(files["checkpoint.ckpt"]))
    cli("inspect", str(files["whole_model.pt"]))
    cli("inspect", str(files["renamed.bin.safetensors"]), "--tensors")
    evil = attack_file()
    cli("scan", str(OUT))
    converted = OUT / "from_checkpoint.safetensors"
    cli("convert", str(files["checkpoint.ckpt"]), str(converted))
    cli(
        "convert", str(files["whole_model.pt"]), str(OUT / "half.safetensors"), "--dtype", "float16"
    )
    cli("card", str(converted), "-o", str(OUT / "README.md"))  # a Hugging Face model card
    cli("diff", str(files["legacy.pt"]), str(converted))
    cli("hash", str(files["state_dict.pt"]), str(files["model.safetensors"]), str(converted))
    cli("inspect", str(converted), "--stats")  # per-tensor statistics, streamed
    cli("report", str(files["checkpoint.ckpt"]), "-o", str(OUT / "report.html"))  # one page
    manifest = OUT / "manifest.jsonl"  # many conversions, each in a worker, one record each
    manifest.write_text(
        json.dumps(
            {
                "source": str(files["state_dict.pt"]),
                "target": str(OUT / "sd.bf16.safetensors"),
                "dtype": "bf16",
            }
        )
        + "\n"
        + json.dumps({"source": str(files["legacy.pt"]), "target": str(OUT / "legacy.npz")})
        + "\n"
    )
    cli(
        "convert",
        "--from-file",
        str(manifest),
        "--jsonl",
        str(OUT / "converted.jsonl"),
        "--jobs",
        "1",
    )
    spec = "scripts.demo:DemoNet"  # the class above, imported by name as users name theirs
    cli(
        "export",
        "--model",
        spec,
        "--weights",
        str(converted),
        "--to",
        "onnx",
        "--input",
        "x:2,3,16,16",
        "--dynamic",
        "x:0=batch",
        str(OUT / "exported.onnx"),
    )
    cli(
        "export",
        "--model",
        spec,
        "--weights",
        str(converted),
        "--to",
        "pt2",
        "--input",
        "x:2,3,16,16",
        str(OUT / "exported.pt2"),
    )
    np.savez(OUT / "inputs.npz", x=example.repeat(2, 1, 1, 1).numpy())  # named after forward(x)
    cli(
        "export",
        "--model",
        str(files["scripted.pt"]),  # a TorchScript file as the model: no class needed
        "--example-inputs",
        str(OUT / "inputs.npz"),
        "--to",
        "pt2",
        "--report",
        str(OUT / "export-report.md"),
        str(OUT / "from_torchscript.pt2"),
    )
    whole = str(files["whole_model.pt"])  # refused: loading a whole-model pickle runs its code
    cli("export", "--model", whole, "--input", "x:2,3,16,16", str(OUT / "whole.pt2"))
    ddp = OUT / "ddp_checkpoint.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, ddp)
    cli("check", "--model", spec, str(ddp), "--fix", str(OUT / "fixed.safetensors"))

    import warnings

    import modelport

    warnings.simplefilter("ignore", modelport.errors.SuspiciousModelWarning)
    print("\nFormat by content, scan verdict, and modelport.load vs the state_dict, bit for bit:")
    expected = {k: sha(v) for k, v in model.state_dict().items()}
    failures = 0
    for name, path in files.items():
        report = modelport.inspect(path)
        loaded = modelport.load(path)
        if name == "model.onnx":  # the exporter folds batch norm: compare with onnx itself
            same = _matches_onnx(path, loaded)
        else:
            same = {k: sha(v) for k, v in loaded.items()} == expected
        failures += not same
        verdict = "identical" if same else f"DIFFERENT ({len(loaded)} tensors)"
        print(f"  {name:26} {report.format:13} {report.safety['verdict']:11} {verdict}")
    try:
        modelport.load(evil)
        failures += 1
    except modelport.errors.UnsafeModelError as exc:
        print(f"\nmodelport.load refused the attack file: {str(exc)[:110]}...")
    ran = (OUT / "PWNED").exists()
    print(f"payload ran: {ran}")
    failures += ran
    print("\nAll formats verified." if not failures else f"\n{failures} checks failed.")
    return 1 if failures else 0


def _matches_onnx(path: Path, loaded: dict[str, torch.Tensor]) -> bool:
    """Every initializer equals what the onnx package reads, byte for byte."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    reference = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return set(reference) <= set(loaded) and all(
        reference[name].tobytes() == loaded[name].numpy().tobytes() for name in reference
    )


if __name__ == "__main__":
    raise SystemExit(main())
