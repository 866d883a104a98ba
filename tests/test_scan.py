"""The scanner: real benign files from their own libraries are safe; attacks built opcode by
opcode are caught, and their payload (it would create a marker file) never runs."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelport
from modelport.errors import SuspiciousModelWarning, UnsafeModelError
from tests.conftest import ATTACKS, Cli, Reduces, benign_twins, os_system_stand_in, short
from tests.models import TiedLM, TinyResNet, trained_checkpoint

# The rule each attack must be caught by (among its critical or high findings).
CAUGHT_BY = {
    "global-reduce": "known-gadget",
    "string-arg": "known-gadget",
    "stack-global": "known-gadget",
    "inst": "known-gadget",
    "obj": "known-gadget",
    "exec": "known-gadget",
    "unlisted-callable": "unknown-call",
    "getattr-chain": "computed-call",
    "dynamic-stack-global": "dynamic-global",
    "ext-code": "extension-code",
    "setstate-smuggling": "attribute-smuggling",
    "nested-loader": "known-gadget",
    "weights-and-call": "known-gadget",
    "newobj-ex": "known-gadget",
    "dotted-name": "unknown-call",
}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_pickles_are_unsafe_and_never_run(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes], name: str
) -> None:
    path = tmp_path / "model.bin"  # an innocent name: the extension never decides
    path.write_bytes(attacks[name])
    report = modelport.scan(path)
    assert report.verdict == "unsafe", report.to_json()
    serious = [f for f in report.files[0].findings if f.severity in ("critical", "high")]
    assert CAUGHT_BY[name] in {f.rule for f in serious}, report.to_json()
    assert all(f.message for f in serious)
    with pytest.raises(UnsafeModelError):
        modelport.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", list(benign_twins()))
def test_benign_twins_of_attacks_are_safe(tmp_path: Path, name: str) -> None:
    """The same file without its payload: the verdict comes from the payload alone."""
    path = tmp_path / "model.bin"
    path.write_bytes(benign_twins()[name])
    assert modelport.scan(path).verdict == "safe"
    expected = pickle.loads(benign_twins()[name])  # plain data: the stdlib is the oracle
    loaded = modelport.load(path)
    assert list(loaded) == list(expected)
    assert all(np.array_equal(loaded[k].numpy(), expected[k]) for k in expected)


@pytest.mark.heavy  # loader reachability: each attack runs under the reference loader
def test_reference_loader_would_run_the_payload(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes]
) -> None:
    """Proves the attack files are real: the stdlib runs them (in a child process)."""
    path = tmp_path / "evil.pkl"
    path.write_bytes(attacks["exec"])
    code = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    # a child process: the payload really runs, and must not run inside the test process
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert marker.exists()


def _inject(archive: Path, payload: bytes, *, duplicate: bool = False) -> None:
    """Replace (or shadow with a second copy of) the data.pkl of a torch archive."""
    with zipfile.ZipFile(archive) as source:
        members = [(info.filename, source.read(info.filename)) for info in source.infolist()]
    with zipfile.ZipFile(archive, "w") as target:
        for name, data in members:
            if name.endswith("data.pkl") and not duplicate:
                data = payload
            target.writestr(name, data)
        if duplicate:
            name = next(n for n, _ in members if n.endswith("data.pkl"))
            with pytest.warns(UserWarning, match="Duplicate name"):
                target.writestr(name, payload)


@pytest.mark.parametrize("duplicate", [False, True], ids=["replaced", "duplicate-member"])
def test_attack_inside_torch_archive(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes], duplicate: bool
) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, path)
    _inject(path, attacks["global-reduce"], duplicate=duplicate)
    report = modelport.scan(path)
    assert report.verdict == "unsafe"
    assert any(f.member.endswith("data.pkl") for f in report.files[0].findings)
    assert not marker.exists()


def test_attack_in_legacy_torch_stream(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "legacy.pt"
    payload = Reduces(print, f"would touch {marker}")
    torch.save({"w": torch.ones(2), "p": payload}, path, _use_new_zipfile_serialization=False)
    report = modelport.scan(path)
    assert report.files[0].format == "torch-legacy"
    assert report.verdict == "unsafe"
    assert any("print" in f.global_name for f in report.files[0].findings)


def test_pickle_with_zip_appended_is_scanned_both_ways(
    tmp_path: Path, attacks: dict[str, bytes]
) -> None:
    benign = pickle.dumps({"a": 1}, protocol=4)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("archive/data.pkl", attacks["exec"])
    path = tmp_path / "polyglot.pt"
    path.write_bytes(benign + archive.getvalue())
    report = modelport.scan(path)
    rules = {f.rule for f in report.files[0].findings}
    assert "polyglot" in rules and report.verdict == "unsafe"


def test_zip_member_escaping_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "traversal.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("../../evil.sh", b"#!/bin/sh\n")
    report = modelport.scan(path)
    assert "zip-path-traversal" in {f.rule for f in report.files[0].findings}
    assert report.verdict == "unsafe"


def benign_files(tmp_path: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}

    def save(name: str, obj: object, **kwargs: object) -> None:
        files[name] = tmp_path / name
        torch.save(obj, files[name], **kwargs)  # type: ignore[arg-type]

    model = TinyResNet()
    save("state_dict.pt", model.state_dict())
    save("checkpoint_adam.pt", trained_checkpoint(model, torch.randn(2, 3, 8, 8)))
    save("sequential.pt", torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()))
    save("legacy.pt", model.state_dict(), _use_new_zipfile_serialization=False)
    save("numpy_values.pt", {"loss": np.float64(0.5), "ids": np.arange(3), "os": 1, "eval": "x"})
    with pytest.warns(UserWarning, match="deprecated"):
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    save("quantized.pt", {"q": quantized})
    save("sparse.pt", {"s": torch.eye(3).to_sparse()})
    save("tied.bin", TiedLM().state_dict())
    files["scripted.pt"] = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(TiedLM()), files["scripted.pt"])
    files["traced.pt"] = tmp_path / "traced.pt"
    torch.jit.save(
        torch.jit.trace(TinyResNet().eval(), torch.randn(1, 3, 8, 8)), files["traced.pt"]
    )
    files["plain.pkl"] = tmp_path / "plain.pkl"
    files["plain.pkl"].write_bytes(pickle.dumps({"w": np.ones((3, 3)), "n": [1, 2]}, protocol=5))
    files["arrays.npz"] = tmp_path / "arrays.npz"
    np.savez(files["arrays.npz"], a=np.ones(3), b=np.arange(4))
    return files


def test_ordinary_files_are_safe(tmp_path: Path) -> None:
    for name, path in benign_files(tmp_path).items():
        report = modelport.scan(path)
        assert report.verdict == "safe", (name, report.to_json())


def test_custom_class_save_is_suspicious_not_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(TinyResNet(), path)
    report = modelport.scan(path)
    assert report.verdict == "suspicious"
    assert {f.rule for f in report.files[0].findings} == {"custom-class"}
    with pytest.warns(SuspiciousModelWarning):
        weights = modelport.load(path)
    assert "fc.weight" in weights


def test_allow_unsafe_extracts_tensors_without_running(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes]
) -> None:
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    with zipfile.ZipFile(path) as zf:
        original = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    # Append an attack value to the dict: SETITEM 'evil' -> exec(...), the call without its STOP
    evil = original[:-1] + b"X\x04\x00\x00\x00evil" + attacks["exec"][:-1] + b"s."
    _inject(path, evil)
    with pytest.raises(UnsafeModelError, match="exec"):
        modelport.load(path)
    with pytest.warns(SuspiciousModelWarning):
        weights = modelport.load(path, allow_unsafe=True)
    assert torch.equal(weights["w"], torch.arange(4.0))
    assert not marker.exists()


def test_cli_exit_codes_json_and_directories(
    tmp_path: Path, marker: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(attacks["global-reduce"])
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(b"\x80\x04\x95\xff\xff")

    assert cli("scan", good).code == 0
    result = cli("scan", bad, "--json")
    assert result.code == 1
    payload = result.json
    assert payload["verdict"] == "unsafe" and payload["path"] == str(bad)
    finding = payload["findings"][0]
    assert set(finding) >= {
        "severity",
        "rule",
        "member",
        "offset",
        "opcode",
        "global",
        "usage",
        "message",
    }
    assert finding["global"] == "posix.system" and finding["usage"] == "called"
    assert finding["opcode"] == "REDUCE"
    assert cli("scan", broken).code == 2
    payload = cli("scan", tmp_path, "--json").json
    assert payload["verdict"] == "unsafe" and len(payload["files"]) == 3
    assert {f["verdict"] for f in payload["files"]} == {"safe", "unsafe", "error"}
    sarif = json.loads(cli("scan", tmp_path, "--sarif").out)
    assert sarif["version"] == "2.1.0"
    results = sarif["runs"][0]["results"]
    assert sorted(
        (r["ruleId"], Path(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]).name)
        for r in results
    ) == [("known-gadget", "bad.pkl"), ("not-analysed", "broken.pkl")]
    assert not marker.exists()


def test_truncated_pickle_is_an_error_never_safe(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:60])
    assert modelport.scan(path).verdict == "error"


_BENIGN: list[bytes] = []


def verdict_of(findings: tuple[Any, ...]) -> str:
    """The verdict findings make, as ``scan`` documents it, worst first: ``unsafe`` (a high
    or critical finding), ``error`` (a part not analysed), ``suspicious`` (medium), ``safe``."""
    if any(f.severity in ("critical", "high") and f.rule != "not-analysed" for f in findings):
        return "unsafe"
    if any(f.rule == "not-analysed" for f in findings):
        return "error"
    return "suspicious" if any(f.severity == "medium" for f in findings) else "safe"


def stdlib_parses(data: bytes) -> bool:
    """Whether the stdlib's pickle disassembler (it runs nothing) reads a whole stream."""
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception:
        return False
    return True


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_never_crash_the_scanner(tmp_path: Path, data: st.DataObject) -> None:
    if not _BENIGN:
        buffer = io.BytesIO()
        torch.save({"w": torch.ones(3), "m": torch.nn.Linear(2, 2)}, buffer)
        _BENIGN.append(buffer.getvalue())
        _BENIGN.append(pickle.dumps({"a": np.ones(4), "b": [1, "x"]}, protocol=2))
    seed = data.draw(st.sampled_from(_BENIGN))
    raw = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "m.bin"
    mutated = bytes(raw[: data.draw(st.integers(1, len(raw)))])
    path.write_bytes(mutated)
    report = modelport.scan(path)
    (file,) = report.files
    assert report.verdict == file.verdict == verdict_of(file.findings), report.to_json()
    if seed is _BENIGN[1] and file.format == "pickle" and not stdlib_parses(mutated):
        assert report.verdict != "safe", report.to_json()  # a pickle the stdlib rejects


def test_damage_is_an_error_with_its_diagnosis_never_safe_or_unsafe(
    tmp_path: Path, cli: Cli
) -> None:
    """Damage alone is ``error`` in every format: a size that lies, a cut file, an empty
    file, random bytes, a Git LFS pointer, a web page saved as the model."""
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    model = tmp_path / "model"
    torch.save({"w": torch.ones(3)}, model)
    cases = {
        "lying.safetensors": struct.pack("<Q", len(header)) + header + b"\0" * 8,
        "cut.pt": model.read_bytes()[:-300],
        "empty.bin": b"",
        "random.pt": bytes(range(7, 250)) * 40,
        "lfs.safetensors": b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
        "page.bin": b"<!DOCTYPE html><html><body>Not found</body></html>\n",
        "README.md": b"# my model\n",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        report = modelport.scan(path)
        assert report.verdict == "error", (name, report.to_json())
        (finding,) = report.files[0].findings
        assert finding.rule == "not-analysed" and finding.message, name
        assert "allow-unsafe" not in cli("scan", path).out + cli("scan", path).err


class Estimator:
    """A scikit-learn-like object: arrays as attributes, saved with joblib."""

    def __init__(self) -> None:
        self.coef_ = np.arange(12.0).reshape(3, 4)
        self.classes_ = np.array(["a", None, 3], dtype=object)


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)])
def test_joblib_files_are_scanned_through_their_arrays(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch, compress: object
) -> None:
    import joblib

    monkeypatch.setattr(Estimator, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "Estimator", Estimator, raising=False)
    path = tmp_path / "model.joblib"
    joblib.dump({"est": Estimator(), "big": np.ones(50_000)}, path, compress=compress)
    report = modelport.scan(path)
    assert report.verdict == "suspicious", report.to_json()
    assert {f.rule for f in report.files[0].findings} == {"custom-class"}

    evil = tmp_path / "evil.joblib"
    payload = Reduces(os_system_stand_in, f"touch {marker}")
    joblib.dump({"arr": np.ones(50_000), "p": payload}, evil, compress=compress)
    report = modelport.scan(evil)
    assert report.verdict == "unsafe"
    assert any(f.global_name.endswith("os_system_stand_in") for f in report.files[0].findings)
    assert not marker.exists()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: np.random.RandomState(0), id="random-state"),
        pytest.param(lambda: np.random.default_rng(0), id="generator"),
        pytest.param(
            lambda: np.matrix([[1.0, 2.0], [3.0, 4.0]]),
            id="matrix",
            marks=pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
        ),
        pytest.param(lambda: np.ma.masked_array([1.0, 2.0], mask=[False, True]), id="masked"),
    ],
)
def test_numpys_own_objects_are_safe(tmp_path: Path, make: Any) -> None:
    """scikit-learn estimators keep RandomState objects; old code saves matrices and masked
    arrays: numpy's own constructors, which run nothing from the file."""
    value = make()
    path = tmp_path / "estimator.pkl"
    path.write_bytes(pickle.dumps({"state": value}, protocol=4))
    report = modelport.scan(path)
    assert report.verdict == "safe", report.to_json()
    assert "library-object" in {f.rule for f in report.files[0].findings}
    assert type(pickle.loads(path.read_bytes())["state"]) is type(value)  # what it rebuilds


def test_a_numpy_constructor_handed_a_gadget_is_still_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(
        b"\x80\x04"
        + short(b"numpy.random._pickle")
        + short(b"__randomstate_ctor")
        + b"\x93"
        + short(b"MT19937")
        + short(b"os")
        + short(b"system")
        + b"\x93\x86R."
    )
    serious = modelport.scan(path).serious
    assert [(f.rule, f.global_name) for f in serious] == [("known-gadget", "os.system")]


class _Buffers(torch.nn.Module):
    """Raw tensor bytes that open like pickle opcodes: ``N.`` parses whole, ``B`` + a length
    runs past the end."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("whole", torch.tensor(list(b"N.\0\0"), dtype=torch.uint8))
        self.register_buffer("cut", torch.tensor(list(b"B\xff\xff\x7f\0\0"), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.whole.float().sum() + self.cut.float().sum()


def test_raw_tensor_bytes_that_look_like_pickles_are_data(tmp_path: Path) -> None:
    module = _Buffers()
    saves = {"model.pt": tmp_path / "model.pt", "model.pt2": tmp_path / "model.pt2"}
    torch.save(module.state_dict(), saves["model.pt"])
    torch.export.save(torch.export.export(module, (torch.ones(2),)), saves["model.pt2"])
    for name, path in saves.items():
        report = modelport.scan(path)
        assert report.verdict == "safe", (name, report.to_json())


class Tagger:
    """A plain third-party object, as sklearn-crfsuite pickles its CRF (a model file kept in
    an upper-case dunder field)."""


@pytest.mark.parametrize(
    ("field", "rules"),
    [
        ("__FILE_RESOURCE_DATA__", {"custom-class"}),  # an application's field
        ("__reduce_ex__", {"custom-class", "attribute-smuggling"}),  # copy and pickle call it
    ],
)
def test_only_pythons_own_special_names_are_smuggling(
    tmp_path: Path, field: str, rules: set[str]
) -> None:
    tagger = Tagger()
    tagger.__dict__[field.upper()] = b"model bytes"  # pickling an instance whose dict
    written = pickle.dumps(tagger, protocol=4)  # holds __reduce_ex__ would call it
    path = tmp_path / "tagger.pkl"
    path.write_bytes(written.replace(field.upper().encode(), field.encode()))
    report = modelport.scan(path)
    assert {f.rule for f in report.files[0].findings} == rules
    assert report.verdict == ("suspicious" if len(rules) == 1 else "unsafe")
