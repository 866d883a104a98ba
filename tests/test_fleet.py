"""Many files at once (``modelport.fleet``): inputs from paths, folders and lists; one JSONL
record per file; the summary rebuilt from the records; --jobs, --shard and resuming. Real
worker processes throughout; the workers' failures are in test_fleet_workers.py."""

from __future__ import annotations

import fcntl
import hashlib
import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import modelport
from modelport.fleet import SCHEMA_VERSION, summarize
from modelport.fleet.inputs import Input, Shard, expand
from modelport.formats import dcp
from tests.conftest import Cli
from tests.formats import test_dcp
from tests.formats.test_tf_bundle import write_bundle

SCHEMA = json.loads((Path(__file__).parent.parent / "docs/fleet-record.schema.json").read_text())
VOLATILE = {"duration_s", "worker", "finished"}


def corpus(root: Path, attacks: dict[str, bytes]) -> Path:
    """A folder of mixed small files: torch, safetensors, numpy, plain pickles, an attack,
    a damaged pickle, and a subfolder."""
    root.mkdir()
    torch.save({"w": torch.ones(3), "b": torch.zeros(2)}, root / "state.pt")
    save_file({"x": np.arange(4, dtype=np.float32)}, str(root / "model.safetensors"))
    np.save(root / "array.npy", np.eye(3))
    (root / "weights.pkl").write_bytes(pickle.dumps({"w": np.ones(3, np.float32)}))
    (root / "evil.bin").write_bytes(attacks["global-reduce"])
    (root / "broken.pkl").write_bytes(b"\x80\x04\x95\xff\xff")
    (root / "sub").mkdir()
    for i in range(3):
        np.save(root / "sub" / f"a{i}.npy", np.arange(i + 1))
    return root


def records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")  # a shard may hold none of a small folder
    return [json.loads(line) for line in text.splitlines()]


def stable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def test_paths_folders_and_lists_give_one_record_per_file(
    tmp_path: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    folder = corpus(tmp_path / "models", attacks)
    single = tmp_path / "single.npy"
    np.save(single, np.ones(2))
    listed = tmp_path / "listed.npy"
    np.save(listed, np.zeros(2))
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{listed}\n\n{single}\n")  # a blank line; single named twice
    out = tmp_path / "out.jsonl"
    result = cli("scan", single, folder, "--from-file", manifest, "--jsonl", out, "--json")
    assert result.code == 1, result.err  # the attack: unsafe
    written = records(out)
    paths = [r["path"] for r in written]
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert sorted(paths) == sorted([str(single), str(listed), *files])
    assert len(set(paths)) == len(paths)  # each file once
    by_path = {r["path"]: r for r in written}
    assert by_path[str(folder / "evil.bin")]["result"]["verdict"] == "unsafe"
    assert by_path[str(folder / "broken.pkl")]["result"]["verdict"] == "error"
    assert by_path[str(folder / "state.pt")]["format"] == "torch-zip"
    assert {r["status"] for r in written} == {"ok"}
    for record in written:
        stat = Path(record["path"]).stat()
        assert (record["size"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
        assert (record["device"], record["inode"]) == (stat.st_dev, stat.st_ino)
        assert record["modelport_version"] == record["rules_version"] == modelport.__version__
        assert record["worker"] > 0 and record["duration_s"] >= 0
    # the printed summary lists the files in the order named, the folder's in walk order
    printed = [f["path"] for f in result.json["files"]]
    assert printed == [str(single), *[f.path for f in modelport.scan(folder).files], str(listed)]
    count = len(files) + 2
    assert f"{count} inputs: {count} processed now, 0 already recorded in {out}" in result.err


def test_records_follow_the_documented_schema(
    tmp_path: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    folder = corpus(tmp_path / "models", attacks)
    (tmp_path / "models" / "gone").symlink_to(tmp_path / "nowhere")  # decided without a worker
    out = tmp_path / "out.jsonl"
    cli("scan", folder, "--jsonl", out)
    cli("hash", folder / "state.pt", tmp_path / "missing.pt", "--jsonl", tmp_path / "h.jsonl")
    (folder / "sub" / "copy").mkdir()
    shutil.copyfile(folder / "sub" / "a0.npy", folder / "sub" / "copy" / "a0.npy")
    cli("scan", folder / "sub", "--dedupe", "--jsonl", tmp_path / "d.jsonl")
    written = records(out) + records(tmp_path / "h.jsonl") + records(tmp_path / "d.jsonl")
    assert {r["status"] for r in written} == {"ok", "error"}
    assert any("deduplicated_from" in r for r in written)
    for record in written:
        assert set(SCHEMA["required"]) <= set(record) <= set(SCHEMA["properties"])
        for key, rule in SCHEMA["properties"].items():
            if key in record:
                check_value(record[key], rule, key)
    assert SCHEMA["properties"]["schema"]["const"] == SCHEMA_VERSION


def check_value(value: Any, rule: dict[str, Any], key: str) -> None:
    """The parts of JSON Schema the record schema uses: const, enum, type, oneOf, pattern."""
    if "pattern" in rule:
        assert re.search(rule["pattern"], value), key
    if "const" in rule:
        assert value == rule["const"], key
    if "enum" in rule:
        assert value in rule["enum"], key
    if "oneOf" in rule:
        assert any(
            value is None if r["type"] == "null" else isinstance(value, dict) for r in rule["oneOf"]
        ), key
    kinds = rule.get("type")
    if kinds is not None:
        python = {
            "integer": int,
            "number": (int, float),
            "string": str,
            "object": dict,
            "array": list,
            "null": type(None),
        }
        allowed = [kinds] if isinstance(kinds, str) else kinds
        assert isinstance(value, tuple(python[k] for k in allowed)), key  # type: ignore[arg-type]


def test_the_summary_is_rebuilt_from_the_jsonl_alone(
    tmp_path: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    folder = corpus(tmp_path / "models", attacks)
    (folder / "gone").symlink_to(tmp_path / "nowhere")  # judged without a worker
    np.save(tmp_path / "elsewhere.npy", np.ones(2))
    (folder / "linked.npy").symlink_to(tmp_path / "elsewhere.npy")  # noted as leaving
    out = tmp_path / "out.jsonl"
    direct = cli("scan", folder, "--jsonl", out, "--json")
    assert direct.json == modelport.scan(folder).to_json()  # workers judge as one process does
    rebuilt = cli("scan", "--from-jsonl", out, "--json")
    assert (rebuilt.code, rebuilt.out) == (direct.code, direct.out)
    assert summarize(out).scan_report() == modelport.scan(folder)
    for form in ("--sarif", None):
        argv = [form] if form else []
        assert cli("scan", "--from-jsonl", out, *argv).out == cli("scan", folder, *argv).out
    table = cli("scan", folder).out
    assert table.splitlines()[-1].startswith("verdict: unsafe (")
    assert cli("scan", "--from-jsonl", out, folder).code == 2  # nothing to scan with it


def test_jobs_2_gives_the_records_of_jobs_1(
    tmp_path: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    folder = corpus(tmp_path / "models", attacks)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert cli("scan", folder, "--jobs", "1", "--jsonl", one).code == 1
    assert cli("scan", folder, "--jobs", "2", "--jsonl", two).code == 1
    first = sorted((stable(r) for r in records(one)), key=lambda r: r["path"])
    second = sorted((stable(r) for r in records(two)), key=lambda r: r["path"])
    assert first == second
    assert 1 <= len({r["worker"] for r in records(two)}) <= 2  # small files: one may do all


def test_shards_partition_the_inputs_exactly(
    tmp_path: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    folder = corpus(tmp_path / "models", attacks)
    everything = expand("scan", [str(folder)])
    parts = [expand("scan", [str(folder)], Shard(i, 3)) for i in (1, 2, 3)]
    assert sorted(p.path for part in parts for p in part) == sorted(p.path for p in everything)
    names = [f"hub/model-{i}.bin" for i in range(300)]  # fixed names: a fixed split
    sizes = [sum(Shard(i, 3).holds(n) for n in names) for i in (1, 2, 3)]
    assert sum(sizes) == 300 and min(sizes) > 70, sizes  # each name in one part, evenly
    merged = tmp_path / "merged.jsonl"
    for i in (1, 2, 3):
        out = tmp_path / f"part{i}.jsonl"
        cli("scan", folder, "--shard", f"{i}/3", "--jsonl", out)
        assert sorted(r["path"] for r in records(out)) == sorted(p.path for p in parts[i - 1])
        with merged.open("a") as handle:
            handle.write(out.read_text())
    assert summarize(merged).scan_report() == modelport.scan(folder)  # shards merge back
    assert cli("scan", folder, "--shard", "4/3").code == 2
    assert cli("scan", folder, "--shard", "x").code == 2


def test_a_rerun_resumes_and_redoes_only_what_changed(
    tmp_path: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    folder = corpus(tmp_path / "models", attacks)
    out = tmp_path / "out.jsonl"
    cli("scan", folder, "--jsonl", out)
    first = records(out)
    again = cli("scan", folder, "--jsonl", out)
    assert "0 processed now, 9 already recorded" in again.err
    assert records(out) == first  # nothing appended
    (folder / "sub" / "a0.npy").unlink()
    (folder / "weights.pkl").write_bytes(attacks["global-reduce"])  # rewritten in place
    np.save(folder / "sub" / "a0.npy", np.arange(7))  # replaced: same name, new inode
    third = cli("scan", folder, "--jsonl", out, "--json")
    assert "2 processed now, 7 already recorded" in third.err
    latest = summarize(out)
    assert [r.path for r in latest.records] == [f["path"] for f in third.json["files"]]
    assert latest.scan_report().to_json() == third.json == modelport.scan(folder).to_json()
    assert len(records(out)) == 11
    hashed = tmp_path / "hash.jsonl"
    assert cli("hash", folder / "state.pt", folder / "array.npy", "--jsonl", hashed).code == 0
    resumed = cli("hash", folder / "state.pt", folder / "array.npy", "--jsonl", hashed)
    assert "0 processed now" in resumed.err and resumed.out.count("\n") == 2
    other = cli("hash", folder / "state.pt", "--allow-unsafe", "--jsonl", hashed)
    assert "1 processed now" in other.err  # other options: another result


def test_a_cut_last_line_is_dropped_and_its_file_redone(
    tmp_path: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    folder = corpus(tmp_path / "models", attacks)
    out = tmp_path / "out.jsonl"
    cli("scan", folder, "--jsonl", out)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 40])  # killed while writing the last record
    result = cli("scan", folder, "--jsonl", out)
    assert "1 processed now, 8 already recorded" in result.err and "cut a partial" in result.err
    written = records(out)
    assert len(written) == 9 and len({r["path"] for r in written}) == 9


def test_a_second_run_on_the_same_output_is_refused(tmp_path: Path, cli: Cli) -> None:
    np.save(tmp_path / "a.npy", np.ones(2))
    out = tmp_path / "out.jsonl"
    with out.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = cli("scan", tmp_path / "a.npy", "--jsonl", out)
    assert result.code == 2 and "another modelport run is writing" in result.err
    assert out.read_text() == ""


def test_hash_and_inspect_take_model_folders_whole(
    tmp_path: Path, attacks: dict[str, bytes], cli: Cli
) -> None:
    root = tmp_path / "mirror"
    root.mkdir()
    model = root / "org" / "bert"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "bert"}')
    save_file({"w": np.ones(4, np.float32)}, str(model / "model.safetensors"))
    np.save(root / "loose.npy", np.arange(3))
    (root / "README.md").write_text("# models\n")
    inputs = expand("hash", [str(root)])
    assert [i.path for i in inputs] == [
        str(root / "README.md"),
        str(root / "loose.npy"),
        str(model),
    ]
    assert expand("hash", [str(model)]) == [Input(str(model), 0)]  # a model folder: as before
    result = cli("hash", root, "--json")
    assert result.code == 2  # the README is no model
    readme, loose, bert = result.json
    assert readme["error"]["type"] == "UnknownFormatError"
    assert loose["digest"] == modelport.hash(root / "loose.npy").digest
    assert bert["digest"] == modelport.hash(model).digest and bert["format"] == "hf-dir"
    listed = cli("inspect", root / "loose.npy", model)
    assert listed.code == 0
    assert [line.split()[-1] for line in listed.out.splitlines()] == [
        str(root / "loose.npy"),
        str(model),
    ]
    payload = cli("inspect", root / "loose.npy", model, "--json").json
    assert payload[0] == json.loads(cli("inspect", root / "loose.npy", "--json").out)
    assert cli("inspect", root / "loose.npy", model, "--tensors").code == 2


def test_hash_of_several_files_prints_in_the_order_named(tmp_path: Path, cli: Cli) -> None:
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"w{i}.npy")
        np.save(paths[-1], np.full(1000 * (6 - i), i, np.float32))  # the first are slowest
    result = cli("hash", *paths, "--jobs", "2")
    assert result.code == 0, result.err
    assert result.out.splitlines() == [f"{modelport.hash(p).digest}  {p}" for p in paths]


def test_a_list_on_standard_input(tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"a{i}.npy", np.arange(i + 1))
    listing = "".join(f"{tmp_path / f'a{i}.npy'}\n" for i in range(3))
    done = subprocess.run(
        [sys.executable, "-m", "modelport", "scan", "--from-file", "-", "--json"],
        input=listing,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [f["verdict"] for f in json.loads(done.stdout)["files"]] == ["safe"] * 3


def test_workers_never_import_torch_for_files_that_do_not_need_it(tmp_path: Path) -> None:
    """A torch that kills any process importing it: the parent and both workers live."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("import os\nos._exit(97)\n")
    data = tmp_path / "data"
    data.mkdir()
    buffer = {"w": torch.ones(2)}
    torch.save(buffer, data / "state.pt")
    save_file({"x": np.ones(2, np.float32)}, str(data / "m.safetensors"))
    np.savez(data / "arrays.npz", a=np.ones(2))
    (data / "plain.pkl").write_bytes(pickle.dumps({"w": np.ones(2)}))
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "modelport", "scan", str(data), "--jsonl", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["status"] for r in records(out)] == ["ok"] * 4
    assert {r["result"]["verdict"] for r in records(out)} == {"safe"}


@pytest.mark.parametrize("argv", [["--jobs", "0"], ["--timeout", "-1"], ["--max-memory", "lots"]])
def test_bad_many_files_options_are_usage_errors(tmp_path: Path, cli: Cli, argv: list[str]) -> None:
    assert cli("scan", tmp_path, *argv).code == 2


def test_the_output_inside_the_scanned_folder_is_no_input(tmp_path: Path, cli: Cli) -> None:
    np.save(tmp_path / "a.npy", np.ones(2))
    out = tmp_path / "scan.jsonl"
    cli("scan", tmp_path, "--jsonl", out)
    again = cli("scan", tmp_path, "--jsonl", out)
    assert "1 inputs: 0 processed now, 1 already recorded" in again.err
    assert [r["path"] for r in records(out)] == [str(tmp_path / "a.npy")]


def test_dedupe_judges_the_same_bytes_under_the_same_name_once(tmp_path: Path, cli: Cli) -> None:
    """A hub's mirror: one checkpoint in five repositories, another in three."""
    hub = tmp_path / "hub"
    for i in range(8):
        (hub / f"org{i}").mkdir(parents=True)
    torch.save({"w": torch.ones(3), "b": torch.zeros(2)}, hub / "org0" / "pytorch_model.bin")
    checkpoint = {"epoch": 2, "model": {"w": torch.ones(4)}, "step": torch.tensor(10)}
    torch.save(checkpoint, hub / "org5" / "checkpoint.pt")
    for i in range(1, 5):
        shutil.copyfile(hub / "org0" / "pytorch_model.bin", hub / f"org{i}" / "pytorch_model.bin")
    for i in (6, 7):
        shutil.copyfile(hub / "org5" / "checkpoint.pt", hub / f"org{i}" / "checkpoint.pt")
    plain, deduped = tmp_path / "plain.jsonl", tmp_path / "deduped.jsonl"
    assert cli("scan", hub, "--jsonl", plain).code == 0
    result = cli("scan", hub, "--dedupe", "--jsonl", deduped)
    assert result.code == 0, result.err
    assert "8 processed now, 0 already recorded" in result.err
    assert "6 copied from files with the same bytes" in result.err
    written = records(deduped)
    firsts = {str(hub / "org0" / "pytorch_model.bin"), str(hub / "org5" / "checkpoint.pt")}
    assert {r["path"] for r in written if "deduplicated_from" not in r} == firsts
    for record in written:
        data = Path(record["path"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record.get("deduplicated_from", record["path"]) in firsts
        assert record["result"]["path"] == record["path"]  # its own path, not the first's
    extra = {"sha256", "deduplicated_from"}
    with_dedupe = {
        r["path"]: {k: v for k, v in stable(r).items() if k not in extra} for r in written
    }
    assert with_dedupe == {r["path"]: stable(r) for r in records(plain)}
    again = cli("scan", hub, "--dedupe", "--jsonl", deduped)
    assert "0 processed now, 8 already recorded" in again.err


def test_dedupe_keeps_apart_the_same_bytes_under_other_names(tmp_path: Path, cli: Cli) -> None:
    """A .npy's tensor is named after its file: the same bytes as b.npy hash otherwise."""
    np.save(tmp_path / "a.npy", np.arange(5))
    shutil.copyfile(tmp_path / "a.npy", tmp_path / "b.npy")
    out = tmp_path / "out.jsonl"
    deduped = cli("hash", tmp_path / "a.npy", tmp_path / "b.npy", "--dedupe", "--jsonl", out)
    assert deduped.out == cli("hash", tmp_path / "a.npy", tmp_path / "b.npy").out
    named = {Path(r["path"]).name: r["result"]["tensors"][0]["name"] for r in records(out)}
    assert named == {"a.npy": "a", "b.npy": "b"}  # records come in the order files finish
    assert not any("deduplicated_from" in r for r in records(out))
    assert len({r["sha256"] for r in records(out)}) == 1


def test_a_tensorflow_checkpoint_folder_is_one_input(tmp_path: Path, cli: Cli) -> None:
    """Every folder format the readers know is taken whole, a TensorFlow checkpoint too."""
    root = tmp_path / "mirror"
    checkpoint = root / "tf" / "ckpt"
    checkpoint.mkdir(parents=True)
    write_bundle(checkpoint / "model.ckpt", {"dense/kernel": np.ones((2, 3), np.float32)})
    assert [i.path for i in expand("hash", [str(root)])] == [str(checkpoint)]
    record = cli("hash", root, "--json").json[0]
    assert record["format"] == "tf-checkpoint"
    assert record["digest"] == modelport.hash(checkpoint).digest


def test_a_distributed_checkpoint_in_a_folder_is_scanned_by_its_byte_ranges(
    tmp_path: Path,
) -> None:
    """A folder scan reads a distributed checkpoint's data files by the byte ranges its
    metadata names, and only those files."""
    test_dcp.save({"w": torch.arange(6.0), "b": torch.ones(2)}, tmp_path / "ckpt")
    np.save(tmp_path / "other.npy", np.ones(2))
    inputs = {Path(item.path).name: item.context for item in expand("scan", [str(tmp_path)])}
    data = tmp_path / "ckpt" / "__0_0.distcp"
    expected = dcp.segments_of([tmp_path / "ckpt" / dcp.METADATA_NAME, data])[data.resolve()]
    assert inputs["__0_0.distcp"]["segments"] == [list(r) for r in expected]
    assert "segments" not in inputs["other.npy"] and "segments" not in inputs[dcp.METADATA_NAME]
