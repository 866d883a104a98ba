"""What the tests of every object store (S3, GCS, the Hub, a web server) build and check
alike: small files made by the real libraries, and that a URL's scan, inspect and hash
are what the same commands say of the local file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

import modelport
from tests.conftest import attack_pickles


def small_safetensors(path: Path) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file(
        {
            "embed.weight": rng.standard_normal((2000, 128)).astype(np.float32),
            "head.bias": np.arange(64, dtype=np.int64),
        },
        str(path),
        metadata={"format": "np"},
    )
    return path


def torch_zip(path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 8)
    )
    torch.save(model.state_dict(), path)
    return path


def big_safetensors(path: Path) -> Path:
    """64 MiB of float32 behind a header of a hundred bytes, sparse on disk (it costs no
    disk), as safetensors' own reader opens it."""
    from safetensors import safe_open

    count = 16 << 20
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "big": {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [0, count * 4]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + count * 4)
    with safe_open(str(path), framework="np") as reference:
        assert list(reference.keys()) == ["big"]
        assert reference.get_slice("big").get_shape() == [4096, 4096]
    return path


def same_inspect(remote: dict[str, Any], local: dict[str, Any]) -> None:
    assert remote.pop("bytes_fetched") > 0
    remote.pop("path")
    local.pop("path")
    assert remote == local


def store_files(folder: Path, marker: Path) -> dict[str, Path]:
    """A safetensors file, a torch zip and an attack pickle (whose payload would create
    ``marker``), by name."""
    files = {
        "small.safetensors": small_safetensors(folder / "small.safetensors"),
        "model.pt": torch_zip(folder / "model.pt"),
        "attack.pkl": folder / "attack.pkl",
    }
    files["attack.pkl"].write_bytes(attack_pickles(marker)["global-reduce"])
    return files


def assert_read_as_local(
    cli: Any, url: str, path: Path, sent: Callable[[], int] | None = None
) -> None:
    """``scan``, ``inspect`` and ``hash`` of ``url`` say what they say of ``path``, and the
    scan counts the bytes the server sent (``sent``: its running total, where the server
    can tell; otherwise some bytes)."""
    before = sent() if sent is not None else 0
    scanned = cli("scan", url, "--json")
    local_scan = cli("scan", path, "--json")
    assert scanned.code == local_scan.code
    assert scanned.json["path"] == url
    assert scanned.json["verdict"] == local_scan.json["verdict"], url
    assert scanned.json["findings"] == local_scan.json["findings"], url
    fetched = scanned.json["bytes_fetched"]
    assert fetched > 0 and (sent is None or fetched == sent() - before)
    if scanned.json["verdict"] == "unsafe":
        return
    found = cli("inspect", url, "--json")
    assert found.code == 0, found.err
    same_inspect(found.json, cli("inspect", path, "--json").json)
    hashed = cli("hash", url, "--json").json[0]
    local_hash = modelport.hash(path)
    assert hashed["digest"] == local_hash.digest
    assert hashed["bytes_fetched"] == path.stat().st_size
    assert replace(modelport.hash(url), path="", bytes_fetched=None) == replace(local_hash, path="")


def deduplicated(records: Path, urls: list[str]) -> dict[str, Any]:
    """The records of a ``--dedupe`` run over ``urls``, by path, once checked: the second
    holds the first one's bytes and copies its verdict; the third, other bytes (an npy),
    was judged on its own."""
    written = {r["path"]: r for r in map(json.loads, records.read_text().splitlines())}
    first, twin, other = urls
    assert written[twin]["deduplicated_from"] == first
    assert "deduplicated_from" not in written[first]
    assert "deduplicated_from" not in written[other]
    assert written[twin]["result"]["path"] == twin
    assert written[twin]["result"]["verdict"] == written[first]["result"]["verdict"]
    assert written[other]["format"] == "npy"
    return written
