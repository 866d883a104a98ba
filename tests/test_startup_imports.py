"""What the CLI imports at start-up: ``--version``, a scan (of a safetensors, GGUF, ONNX,
torch or pickle file, numpy arrays in the pickle included) and ``inspect`` of a safetensors
header read bytes, never arrays, so they import no numpy (75-100 ms of every run) and no
ml_dtypes; reading an ``.npy``'s arrays still imports numpy, which shows the probe sees it.

A command on one file whose output is not a terminal imports neither rich (the people's
rendering) nor the fleet (worker pools, journals, records): ``scan`` of two files, and the
same scan on a terminal, are the witnesses that the probe sees each. ``--version`` imports
no format and no pickle machine either.

Each case runs ``modelport.cli.main.main(argv)`` in a fresh interpreter (this one has numpy
loaded already) and reads that interpreter's ``sys.modules`` once the command has finished.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import struct
import subprocess
import sys
from dataclasses import is_dataclass
from pathlib import Path

import numpy as np
import pytest

HEAVY = ("numpy", "ml_dtypes", "torch")
# what a one-file command printing to a pipe leaves alone: the people's rendering, the fleet
LEAN = ("rich", "modelport.fleet", "modelport.cli._fleet")
# what --version leaves alone besides: every reader, the pickle machine
COMMAND = ("modelport.formats", "modelport.pickles", "modelport.scanning")

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


def run_cli(
    tmp_path: Path, *argv: str | Path, env: dict[str, str] | None = None
) -> tuple[int, set[str]]:
    """The exit code and the modules imported by one command, run in a fresh interpreter
    whose standard output is a pipe (``env``: variables set for it)."""
    result = tmp_path / "imported.json"
    subprocess.run(
        [sys.executable, "-c", PROBE, str(result), *map(str, argv)],
        check=True,
        capture_output=True,
        env=_environment(env or {}),
    )
    found = json.loads(result.read_text())
    return found["code"], set(found["modules"])


def _environment(extra: dict[str, str]) -> dict[str, str]:
    """This environment less what makes rich treat a pipe as a terminal, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    return {**base, **extra}


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def under(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    """The modules that are one of ``roots`` or inside one."""
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


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
    assert under(modules, LEAN + COMMAND) == []


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_scan_imports_no_numpy(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name)
    code, modules = run_cli(tmp_path, "scan", path)
    assert code == 0  # safe: the scan read the whole file
    assert "modelport.scanning.scanner" in modules
    assert heavy(modules) == []
    assert under(modules, LEAN) == []


def test_inspect_of_a_safetensors_header_imports_no_numpy(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "small.safetensors")
    code, modules = run_cli(tmp_path, "inspect", "--json", path)
    assert code == 0
    assert "modelport.formats.safetensors" in modules
    assert heavy(modules) == []
    assert under(modules, LEAN) == []


# the witness that the probe sees readers: each file's own. A scan of a torch zip reaches
# none: the scanner reads the zip itself, member by member.
OWN_READER = {
    ("inspect", "small.safetensors"): "safetensors",
    ("inspect", "small.gguf"): "gguf",
    ("inspect", "state_dict.pt"): "torch_zip",
    ("scan", "small.safetensors"): "safetensors",
    ("scan", "small.gguf"): "gguf",
}
READERS = ("modelport.formats",)


@pytest.mark.parametrize("command", ["scan", "inspect"])
@pytest.mark.parametrize("name", ["small.safetensors", "small.gguf", "state_dict.pt"])
def test_one_file_imports_only_the_readers_it_reaches(
    tmp_path: Path, command: str, name: str
) -> None:
    """Readers are imported as a probe reaches them: an ONNX, HDF5 or TFLite reader is no
    part of reading a safetensors file, nor any reader of scanning a torch zip."""
    path = WRITERS[name](tmp_path / name)
    code, modules = run_cli(tmp_path, command, path)
    assert code == 0
    readers = {m.split(".")[2] for m in under(modules, READERS) if m.count(".") >= 2}
    public_readers = {r for r in readers if not r.startswith("_")}
    for absent in ("onnx", "hdf5", "tflite", "keras", "flax_msgpack", "tf_savedmodel", "hf_dir"):
        assert absent not in public_readers
    own = OWN_READER.get((command, name))
    if own is None:
        assert public_readers <= {"protocol", "registry", "sniffing"}  # no reader at all
    else:
        assert own in public_readers


# The scanner's parts (``scanner._PARTS``) and what only they import: the pickle stream and
# archive readings, tars, folders, URLs, and the readers whose helpers they use.
SCANNER_PARTS = (
    "modelport.scanning.archives",
    "modelport.scanning.tars",
    "modelport.scanning.streams",
    "modelport.scanning.content_kinds",
    "modelport.scanning.folders",
    "modelport.scanning.other_files",
    "modelport.scanning.remote_inputs",
    "modelport.transfer.remote",
    "modelport.formats.remote_ranges",
    "modelport.formats._torch_magic",
    "modelport.formats.torch_legacy",
    "modelport.formats.npy",
    "modelport.formats.dcp",
    "modelport.formats.tf_bundle",
)


def test_a_safetensors_scan_reaches_no_part_of_the_scanner(tmp_path: Path) -> None:
    """A file that holds no pickle, zip or tar, and does not open like one, is judged by its
    reader and the content checks: none of the scanner's pickle, archive, folder or URL
    parts is imported (nor, its reader coming first, any pickle-bearing format's reader)."""
    path = write_safetensors(tmp_path / "small.safetensors")
    code, modules = run_cli(tmp_path, "scan", path)
    assert code == 0
    assert under(modules, SCANNER_PARTS) == []


def test_a_scan_of_a_torch_zip_reaches_the_parts_its_bytes_need(tmp_path: Path) -> None:
    """The witness: the same probe sees the archive, pickle-stream and pickle-judging parts
    where the file is a zip holding a pickle, and still no tar, folder or URL part."""
    path = write_torch(tmp_path / "state_dict.pt")
    code, modules = run_cli(tmp_path, "scan", path)
    assert code == 0
    reached = set(under(modules, SCANNER_PARTS))
    assert {"modelport.scanning.archives", "modelport.scanning.streams"} <= reached
    assert "modelport.pickles.judging" in modules
    assert reached.isdisjoint(
        {
            "modelport.scanning.tars",
            "modelport.scanning.folders",
            "modelport.scanning.remote_inputs",
            "modelport.formats.torch_legacy",
            "modelport.formats.dcp",
        }
    )


def test_inspect_of_an_npy_file_does_import_numpy(tmp_path: Path) -> None:
    """The witness: the same probe sees numpy where the file's content needs it (a record
    dtype is built by numpy's own parser; plain numbers are read without it)."""
    path = tmp_path / "records.npy"
    np.save(path, np.zeros(3, dtype=[("x", "<f4"), ("y", "<i4")]))
    code, modules = run_cli(tmp_path, "inspect", "--json", path)
    assert code == 0
    assert "numpy" in heavy(modules)


def test_a_scan_of_two_files_does_import_the_fleet(tmp_path: Path) -> None:
    """The witness: the probe sees the fleet where a run has one."""
    first = write_safetensors(tmp_path / "a.safetensors")
    second = write_pickle(tmp_path / "b.pkl")
    code, modules = run_cli(tmp_path, "scan", "--jobs", "1", first, second)
    assert code == 0
    assert "modelport.fleet.running" in modules
    assert "modelport.cli._fleet" in modules


def test_a_scan_for_a_terminal_does_import_rich(tmp_path: Path) -> None:
    """The witness: the probe sees rich where the output is (treated as) a terminal."""
    path = write_safetensors(tmp_path / "small.safetensors")
    code, modules = run_cli(tmp_path, "scan", path, env={"FORCE_COLOR": "1"})
    assert code == 0
    assert "rich.console" in modules


def test_a_scan_prints_the_same_text_to_a_pipe_as_to_a_terminal(tmp_path: Path) -> None:
    """Plain lines where rich is not imported, the same words as rich shows a person (its
    styles stripped; a wide terminal, so that rich wraps nothing)."""
    path = tmp_path / "evil [b].pkl"  # brackets rich would read as markup, were it markup
    path.write_bytes(b"\x80\x04" + b"\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.")
    command = [sys.executable, "-m", "modelport", "scan", str(path)]
    piped = subprocess.run(command, capture_output=True, text=True, env=_environment({}))
    terminal = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=_environment({"TTY_COMPATIBLE": "1", "COLUMNS": "1000"}),
    )
    assert piped.returncode == terminal.returncode == 1  # unsafe
    assert "\x1b[" in terminal.stdout  # rich styled it
    assert re.sub(r"\x1b\[[0-9;]*m", "", terminal.stdout) == piped.stdout
    lines = piped.stdout.splitlines()
    assert lines[0].split() == ["UNSAFE", str(tmp_path / "evil"), "[b].pkl", "(pickle)"]
    assert any("os.system" in line for line in lines[1:])


# The pickle machine: the restricted unpickler, its resolvers, and the rules and tables that
# judge what it reads. Severities and the gadget table are core types beside it.
PICKLE_MACHINE = (
    "modelport.pickles.machine",
    "modelport.pickles.opcodes",
    "modelport.pickles.reading",
    "modelport.pickles.judging",
    "modelport.pickles.rules",
    "modelport.pickles.policy",
    "modelport.pickles.symbols",
    "modelport.pickles.fast_scan",
)


def test_a_safetensors_scan_imports_no_pickle_machine(tmp_path: Path) -> None:
    """A file that holds no pickle is rated by severities and gadget names alone, and its
    reader decodes no typed-JSON tree (nor imports the pickle records one rebuilds) when
    its metadata holds none."""
    path = write_safetensors(tmp_path / "small.safetensors")
    code, modules = run_cli(tmp_path, "scan", path)
    assert code == 0
    assert "modelport.scanning.content_checks" in modules
    assert under(modules, PICKLE_MACHINE) == []
    assert "modelport.tree.typed_json_decoding" not in modules


def test_a_safetensors_scan_imports_no_writer_and_no_tree(tmp_path: Path) -> None:
    """Judging a safetensors file needs neither the byte movers its writer streams with nor
    the tree's names (which bring the pickle records); the LoRA reader, tried first, is the
    witness that the probe saw the readers."""
    path = write_safetensors(tmp_path / "small.safetensors")
    code, modules = run_cli(tmp_path, "scan", path)
    assert code == 0
    assert "modelport.formats.adapters" in modules
    assert under(modules, ("modelport.transfer", "modelport.tree")) == []
    assert "modelport.formats.safetensors_writer" not in modules


def test_a_torch_scan_does_import_the_pickle_machine(tmp_path: Path) -> None:
    """The witness: the same probe sees the pickle machine where the file holds a pickle."""
    path = write_torch(tmp_path / "state_dict.pt")
    code, modules = run_cli(tmp_path, "scan", path)
    assert code == 0
    assert set(PICKLE_MACHINE) <= modules


# What a scan of a pickle defines as it imports the pickle machine: its values are plain
# classes (``pickles.interface.Value``), for a dataclass compiles its methods when defined
# (some 4M instructions each, twenty of them were a fifth of a torch file's scan).
PLAIN_VALUES = (
    "modelport.pickles.interface",
    "modelport.pickles.records",
    "modelport.pickles.symbols",
    "modelport.pickles.torch_types",
    "modelport.pickles.numpy_types",
    "modelport.pickles.reading",
    "modelport.pickles.policy",
    "modelport.pickles.joblib_arrays",
    "modelport.pickles.judging",
)


@pytest.mark.parametrize("name", PLAIN_VALUES)
def test_the_pickle_machine_defines_no_dataclass(name: str) -> None:
    module = importlib.import_module(name)
    classes = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == name]
    assert classes  # the witness: the module's own classes are seen
    assert [c.__name__ for c in classes if is_dataclass(c)] == []
