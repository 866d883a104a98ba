"""What the CLI imports at start-up: ``--version``, a scan (of a safetensors, GGUF, ONNX,
torch or pickle file, numpy arrays in the pickle included) and ``inspect`` of a safetensors
header read bytes, never arrays, so they import no numpy (75-100 ms of every run) and no
ml_dtypes; reading an ``.npy``'s arrays still imports numpy, which shows the probe sees it.

Each case runs ``modelport.cli.main.main(argv)`` in a fresh interpreter (this one has numpy
loaded already) and reads that interpreter's ``sys.modules`` once the command has finished.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HEAVY = ("numpy", "ml_dtypes", "torch")

# argv[1] is where to write the result; the rest is the command line.
PROBE = """
import json, sys
from modelport.cli.main import main
try:
    code = main(sys.argv[2:])
except SystemExit as stop:
    code = stop.code
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "modules": sorted(sys.modules)}, out)
"""


def run_cli(tmp_path: Path, *argv: str | Path) -> tuple[int, set[str]]:
    """The exit code and the modules imported by one command, run in a fresh interpreter."""
    result = tmp_path / "imported.json"
    subprocess.run(
        [sys.executable, "-c", PROBE, str(result), *map(str, argv)],
        check=True,
        capture_output=True,
    )
    found = json.loads(result.read_text())
    return found["code"], set(found["modules"])


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def write_safetensors(path: Path) -> Path:
    """One 2x2 float32 tensor, written byte by byte as the format's README lays it out."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<4f", 1, 2, 3, 4))
    return path


def write_gguf(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", np.ones((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_onnx(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    onnx.save(helper.make_model(graph), str(path))
    return path


def write_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"name": "run-7", "sizes": [1, 2, 3]}, protocol=4))
    return path


def write_array_pickle(path: Path) -> Path:
    """numpy arrays and a scalar in a pickle: scanning reads their opcodes, builds none."""
    state = {"weight": np.ones((2, 3), np.float32), "step": np.int64(7)}
    path.write_bytes(pickle.dumps(state, protocol=2))
    return path


def write_torch(path: Path) -> Path:
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}, path)
    return path


WRITERS = {
    "small.safetensors": write_safetensors,
    "small.gguf": write_gguf,
    "small.onnx": write_onnx,
    "plain.pkl": write_pickle,
    "arrays.pkl": write_array_pickle,
    "state_dict.pt": write_torch,
}


def test_version_imports_no_numpy(tmp_path: Path) -> None:
    code, modules = run_cli(tmp_path, "--version")
    assert code == 0
    assert heavy(modules) == []


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_scan_imports_no_numpy(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name)
    code, modules = run_cli(tmp_path, "scan", path)
    assert code == 0  # safe: the scan read the whole file
    assert "modelport.scanning.scanner" in modules
    assert heavy(modules) == []


def test_inspect_of_a_safetensors_header_imports_no_numpy(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "small.safetensors")
    code, modules = run_cli(tmp_path, "inspect", "--json", path)
    assert code == 0
    assert "modelport.formats.safetensors" in modules
    assert heavy(modules) == []


def test_inspect_of_an_npy_file_does_import_numpy(tmp_path: Path) -> None:
    """The witness: the same probe sees numpy where the file's content needs it."""
    path = tmp_path / "arange.npy"
    np.save(path, np.arange(3, dtype=np.float32))
    code, modules = run_cli(tmp_path, "inspect", "--json", path)
    assert code == 0
    assert "numpy" in heavy(modules)
