"""``convert --from-file MANIFEST``: many conversions as one fleet run. Each entry is checked
against torch and safetensors (the oracle), each gets its JSONL record, a rerun redoes only
what no longer stands, and a manifest that would write an output twice is refused whole."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import modelport
from modelport.cli import _many_files
from modelport.cli.main import build_parser
from modelport.conversion.options import ConvertOptions
from modelport.errors import ModelportError
from modelport.fleet import SCHEMA_VERSION, summarize
from tests.conftest import Cli

SCHEMA = json.loads((Path(__file__).parent.parent / "docs/fleet-record.schema.json").read_text())
VOLATILE = {"duration_s", "worker", "finished"}


def sources(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Three small sources, each saved by its own library, and a file that is no model."""
    made = {
        "a.pt": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)},
        "b.safetensors": {"x": torch.linspace(0, 1, 5), "n": torch.arange(3)},
        "c.pt": {"model.w": torch.randn(4, 2), "model.v": torch.randn(3, dtype=torch.float64)},
    }
    torch.save(made["a.pt"], root / "a.pt")
    save_file(made["b.safetensors"], str(root / "b.safetensors"))
    torch.save(made["c.pt"], root / "c.pt")
    (root / "bad.pt").write_bytes(b"this is no model file at all\n")
    for name in ("kept.safetensors", "replaced.safetensors"):  # outputs already there
        save_file({"old": torch.zeros(1)}, str(root / name))
    return made


def manifest(root: Path) -> str:
    """Six entries: one plain, one that is no model, one with its own options, one that sets
    ``dtype`` to null (no cast) over the command line's, and two onto outputs already there,
    of which one may overwrite."""
    entries: list[dict[str, Any]] = [
        {"source": str(root / "a.pt"), "target": str(root / "a.safetensors")},
        {"source": str(root / "bad.pt"), "target": str(root / "bad.safetensors")},
        {
            "source": str(root / "c.pt"),
            "target": str(root / "c.safetensors"),
            "strip_prefix": "model.",
            "dtype": "bf16",
            "exclude": ["model.v"],
        },
        {"source": str(root / "b.safetensors"), "target": str(root / "b.npz"), "dtype": None},
        {"source": str(root / "a.pt"), "target": str(root / "kept.safetensors")},
        {
            "source": str(root / "a.pt"),
            "target": str(root / "replaced.safetensors"),
            "overwrite": True,
            "dtype": "float32",
        },
    ]
    return "".join(json.dumps(e) + "\n" for e in entries) + "\n"  # a blank last line


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stable(record: dict[str, Any]) -> dict[str, Any]:
    """A record less what differs from run to run: timings, pids, the output's inode."""
    kept = {k: v for k, v in record.items() if k not in VOLATILE}
    if isinstance(record["result"], dict):
        kept["result"] = {
            k: v for k, v in record["result"].items() if k not in ("seconds", "target_identity")
        }
    return kept


def assert_outputs_match_the_oracle(root: Path, made: dict[str, dict[str, torch.Tensor]]) -> None:
    a = load_file(str(root / "a.safetensors"))  # the command line's --dtype float16
    assert a.keys() == made["a.pt"].keys()
    for name, tensor in made["a.pt"].items():
        assert torch.equal(a[name], tensor.to(torch.float16))
    c = load_file(str(root / "c.safetensors"))  # its own dtype, prefix and exclude
    assert list(c) == ["w"] and torch.equal(c["w"], made["c.pt"]["model.w"].to(torch.bfloat16))
    with np.load(root / "b.npz") as b:  # dtype null: no cast
        assert sorted(b.files) == ["n", "x"]
        for name, tensor in made["b.safetensors"].items():
            assert np.array_equal(b[name], tensor.numpy()) and b[name].dtype == tensor.numpy().dtype
    assert not (root / "bad.safetensors").exists()
    assert list(load_file(str(root / "kept.safetensors"))) == ["old"]  # no overwrite: kept
    replaced = load_file(str(root / "replaced.safetensors"))
    assert replaced.keys() == made["a.pt"].keys()
    assert all(torch.equal(replaced[k], v) for k, v in made["a.pt"].items())
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporaries


def test_a_manifest_converts_every_entry_records_each_and_resumes(tmp_path: Path, cli: Cli) -> None:
    made = sources(tmp_path)
    listed = tmp_path / "manifest.jsonl"
    listed.write_text(manifest(tmp_path))
    out = tmp_path / "out.jsonl"
    argv = ("convert", "--from-file", listed, "--jsonl", out, "--dtype", "float16", "--jobs", "1")
    result = cli(*argv)
    assert result.code == 2, result.err  # two entries failed; the others ran
    assert_outputs_match_the_oracle(tmp_path, made)
    with pytest.raises(ModelportError) as raised:  # the bad entry fails as one convert does
        modelport.convert(tmp_path / "bad.pt", tmp_path / "x.safetensors")
    written = records(out)
    assert sorted(r["index"] for r in written) == list(range(6))
    by_target = {Path(r["target"]).name: r for r in written}
    bad, kept = by_target["bad.safetensors"], by_target["kept.safetensors"]
    assert (bad["status"], bad["error"]["type"]) == ("error", type(raised.value).__name__)
    assert bad["result"] is None and bad["path"] == str(tmp_path / "bad.pt")
    assert kept["status"] == "error" and "exists; pass --overwrite" in kept["error"]["message"]
    for record in written:
        assert set(SCHEMA["required"]) <= set(record) <= set(SCHEMA["properties"])
        assert record["command"] in SCHEMA["properties"]["command"]["enum"]
        assert (record["schema"], record["command"]) == (SCHEMA_VERSION, "convert")
        assert record["worker"] > 0 and record["duration_s"] >= 0
        source = Path(record["path"]).stat()
        assert (record["size"], record["mtime_ns"]) == (source.st_size, source.st_mtime_ns)
        assert (record["device"], record["inode"]) == (source.st_dev, source.st_ino)
    for name in ("a.safetensors", "c.safetensors", "b.npz", "replaced.safetensors"):
        record = by_target[name]
        assert record["status"] == "ok" and record["error"] is None
        assert record["result"]["verified"] is True and record["result"]["bytes_written"] > 0
        assert record["result"]["target_identity"]["size"] == (tmp_path / name).stat().st_size
    assert by_target["c.safetensors"]["options"]["dtype"] == "bfloat16"  # the entry's own
    assert by_target["a.safetensors"]["options"]["dtype"] == "float16"  # the command line's
    printed = [Path(line.split()[1]).name for line in result.out.splitlines()]
    assert printed == ["a.safetensors", "c.safetensors", "b.npz", "replaced.safetensors"]
    assert f"error: {tmp_path / 'bad.pt'} -> {tmp_path / 'bad.safetensors'}: " in result.err

    unchanged = (tmp_path / "a.safetensors").stat()
    (tmp_path / "b.npz").unlink()
    again = cli(*argv, "--json")
    assert again.code == 2
    assert f"6 inputs: 3 processed now, 3 already recorded in {out}" in again.err
    redone = {Path(r["target"]).name: r for r in records(out)[len(written) :]}
    assert sorted(redone) == ["b.npz", "bad.safetensors", "kept.safetensors"]  # failed, deleted
    assert stable(redone["b.npz"]) == stable(by_target["b.npz"])
    now = (tmp_path / "a.safetensors").stat()
    assert (now.st_ino, now.st_mtime_ns) == (unchanged.st_ino, unchanged.st_mtime_ns)
    assert_outputs_match_the_oracle(tmp_path, made)
    in_order = [json.loads(line)["target"] for line in listed.read_text().splitlines() if line]
    assert [item["target"] for item in again.json] == in_order  # reused ones included
    standing = summarize(out).records  # one per entry: a.pt went to three targets
    assert sorted(r.target or "" for r in standing) == sorted(in_order)


@pytest.mark.heavy
def test_jobs_2_on_standard_input_gives_the_records_of_jobs_1(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = sources(tmp_path)
    listed = tmp_path / "manifest.jsonl"
    listed.write_text(manifest(tmp_path))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    first = cli("convert", "--from-file", listed, "--dtype", "fp16", "--jsonl", one)
    for name in ("a.safetensors", "c.safetensors", "b.npz"):
        (tmp_path / name).unlink()
    monkeypatch.setattr(sys, "stdin", io.StringIO(manifest(tmp_path)))
    second = cli("convert", "--from-file", "-", "--dtype", "fp16", "--jsonl", two, "--jobs", "2")
    assert first.code == second.code == 2
    assert_outputs_match_the_oracle(tmp_path, made)
    ordered = [
        sorted((stable(r) for r in records(p)), key=lambda r: r["index"]) for p in (one, two)
    ]
    assert len(ordered[0]) == 6 and ordered[0] == ordered[1]


def to(target: str, source: str = "a.pt", **options: Any) -> str:
    return json.dumps({"source": source, "target": target, **options})


REFUSED = [
    ([to("o.safetensors"), to("o.safetensors", "b.pt")], "line 2: target o.safetensors is also"),
    ([to("o.safetensors"), to("./o.safetensors", "b.pt")], "no output may be written twice"),
    ([to("b.pt"), to("c.safetensors", "b.pt")], "line 1: target b.pt is the source of"),
    ([to("hf", to="hf"), to("hf/x.npz", "b.pt")], "line 2: target hf/x.npz lies inside"),
    ([to("o.safetensors", dtpye="bf16")], "line 1: unknown key 'dtpye'"),
    ([to("o.safetensors", all="yes")], "all is true or false"),
    ([to("o.safetensors", dtype="int3")], "dtype 'int3': choose from"),
    ([to("o.safetensors", rename="noequals")], "expected REGEX=REPL"),
    (['{"source": "a.pt"}'], "line 1: target must be a path"),
    (['["a.pt", "o.safetensors"]'], "line 1: expected a JSON object"),
    (["", "a.pt o.safetensors"], "line 2: not a JSON object"),
]


@pytest.mark.parametrize(("lines", "said"), REFUSED)
def test_a_manifest_that_would_write_twice_or_says_no_option_is_refused_whole(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch, lines: list[str], said: str
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    result = cli("convert", "--from-file", "m.jsonl", "--jsonl", "out.jsonl")
    assert result.code == 2 and said in result.err, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "m.jsonl"]  # nothing ran


@pytest.mark.parametrize(
    "argv",
    [
        ["a.pt", "b.safetensors", "--from-file", "m.jsonl"],
        ["a.pt", "b.safetensors", "--jsonl", "out.jsonl"],
        ["--from-file", "m.jsonl", "--card"],
        ["a.pt"],
        [],
    ],
)
def test_one_conversion_or_a_manifest_not_both(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.jsonl").write_text("")
    result = cli("convert", *argv)
    assert result.code == 2 and "error:" in result.err
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_shards_split_the_entries_by_target_and_check_the_whole_manifest(
    tmp_path: Path,
) -> None:
    entries = [{"source": f"s{i % 7}.pt", "target": f"t{i}.safetensors"} for i in range(60)]
    listed = tmp_path / "m.jsonl"
    listed.write_text("".join(json.dumps(e) + "\n" for e in entries))
    parser = build_parser("convert")
    parts = []
    for i in (1, 2, 3):
        args = parser.parse_args(["convert", "--from-file", str(listed), "--shard", f"{i}/3"])
        plan = _many_files.convert_plan(args, ConvertOptions(dtype="bf16"))
        parts.append([(item.path, item.context["target"], item.index) for item in plan.inputs])
        assert plan.options["dtype"] == "bfloat16" and plan.command == "convert"
    everything = sorted(entry for part in parts for entry in part)
    assert everything == sorted((e["source"], e["target"], i) for i, e in enumerate(entries))
    assert min(len(p) for p in parts) > 10
    listed.write_text(listed.read_text() + json.dumps(entries[0]) + "\n")
    args = parser.parse_args(["convert", "--from-file", str(listed), "--shard", "1/3"])
    with pytest.raises(modelport.errors.UsageError, match=r"line 61: target t0\.safetensors"):
        _many_files.convert_plan(args, ConvertOptions())
