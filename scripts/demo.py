"""modelport's demo: build a small CNN, save it every way people do, inspect, load, verify.

Run through ``scripts/demo`` (it prepares .venv). Output goes to ./demo-output/.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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

    state = model.state_dict()
    save("state_dict.pt", lambda p: torch.save(state, p))
    save("legacy.pt", lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))
    save("whole_model.pt", lambda p: torch.save(model, p))
    optimizer = torch.optim.Adam(model.parameters())
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
    return files


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

    import modelport

    print("\nFormat by content, and modelport.load vs the state_dict, bit for bit:")
    expected = {k: sha(v) for k, v in model.state_dict().items()}
    failures = 0
    for name, path in files.items():
        try:
            detected = modelport.inspect(path).format
            loaded = modelport.load(path)
        except modelport.errors.ModelportError as exc:
            print(f"  {name:28} {'-':14} not readable yet: {exc}")
            continue
        same = {k: sha(v) for k, v in loaded.items()} == expected
        failures += not same
        verdict = "identical" if same else f"DIFFERENT ({len(loaded)} tensors)"
        print(f"  {name:28} {detected:14} {verdict}")
    print("\nAll formats verified." if not failures else f"\n{failures} formats differ.")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
