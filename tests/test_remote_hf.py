"""hf:// files: ``inspect``, ``scan`` and ``hash`` read through huggingface_hub's HfFileSystem
from olah, a Hugging Face Hub mirror that serves local git repositories (LFS objects
included) through the Hub's API on loopback, as they are from the Hub. Olah answers a ranged
download of a local repository's file with the whole file, so these tests take the
whole-object path. Oracles: the same commands on the local file, and olah's access log, which
says how many downloads it answered (each the whole file).

olah pins fastapi-utils, which pins psutil<6, so it lives in its own environment: the server
runs from ``olah-cli`` (in ``.venv-olah/bin`` or on PATH) or from this interpreter when it can
import olah; without it these tests skip."""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.remote_checks import (
    assert_read_as_local,
    deduplicated,
    small_safetensors,
    store_files,
)

pytestmark = pytest.mark.heavy  # as the S3 and GCS tests: a server process, huggingface_hub

_ROOT = Path(__file__).resolve().parent.parent
_REPO = "org/models"
_ACCESS = re.compile(r'"GET /' + _REPO + r'/resolve/main/(\S+) HTTP/1\.1" (\d{3})')
_DEAD = "127.0.0.1:9"  # the discard port: nothing listens, so any use of it fails at once
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "modelport",
    "GIT_AUTHOR_EMAIL": "tests@localhost",
    "GIT_COMMITTER_NAME": "modelport",
    "GIT_COMMITTER_EMAIL": "tests@localhost",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


@dataclass
class _Audit:
    """Every host that this process looked up or connected to, not loopback, while ``on``.
    Audit hooks stay for the process's life, so it is added once and idle otherwise."""

    on: bool = False
    hooked: bool = False
    outside: list[str] = field(default_factory=list)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.on or event not in ("socket.connect", "socket.getaddrinfo"):
            return
        address = args[1] if event == "socket.connect" else args[:2]
        if isinstance(address, tuple) and address and not _loopback(address[0]):
            self.outside.append(f"{event} {address[0]}")


_AUDIT = _Audit()


def _loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str) or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _olah_command() -> list[str]:
    if importlib.util.find_spec("olah") is not None:
        return [sys.executable, "-m", "olah.server"]
    search = os.pathsep.join([str(_ROOT / ".venv-olah" / "bin"), os.environ.get("PATH", "")])
    found = shutil.which("olah-cli", path=search)
    if found is None:
        hint = "olah not found: python -m venv .venv-olah && .venv-olah/bin/pip install olah"
        if os.environ.get("MODELPORT_REQUIRE_OLAH"):  # scripts/test installs it: never skip
            pytest.fail(hint)
        pytest.skip(hint)
    return [found]


@dataclass
class Hub:
    """A model repository ``org/models`` on olah: a git repository on disk, read live."""

    endpoint: str
    repo: Path
    log: Path
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, path: Path, name: str, *, lfs: bool = True) -> str:
        """Commit ``path``'s bytes as ``name`` (an LFS pointer with its object under
        ``.git/lfs/objects``, as git-lfs leaves them, or a plain blob); its hf:// URL."""
        data = path.read_bytes()
        target = self.repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if lfs:
            oid = hashlib.sha256(data).hexdigest()
            stored = self.repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_bytes(data)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\n"
            target.write_text(pointer + f"size {len(data)}\n")
        else:
            target.write_bytes(data)
        _git(self.repo, "add", name)
        _git(self.repo, "commit", "-q", "-m", f"add {name}")
        self.sizes[name] = len(data)
        # With the revision: offline, olah answers a repository's info only for a revision.
        return f"hf://{_REPO}@main/{name}"

    def downloads(self) -> list[tuple[str, int]]:
        """``(file, status)`` of every download olah has answered, oldest first."""
        return [(m[1], int(m[2])) for m in _ACCESS.finditer(self.log.read_text(errors="replace"))]

    def sent_since(self, mark: int) -> int:
        """Body bytes of the downloads after the first ``mark``: each sent its whole file."""
        answered = self.downloads()[mark:]
        assert all(status == 200 for _, status in answered), answered
        return sum(self.sizes[name] for name, _ in answered)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, env={**os.environ, **_GIT_ENV})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _config(root: Path, port: int) -> Path:
    """Offline, so olah answers from the mirrors folder and never asks upstream; upstream is a
    dead loopback port all the same."""
    path = root / "olah.toml"
    path.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{root / "cache"}"\nmirrors-path = ["{root / "mirrors"}"]\n'
        f'hf-scheme = "http"\nhf-netloc = "{_DEAD}"\nhf-lfs-netloc = "{_DEAD}"\n'
        f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
        "[accessibility]\noffline = true\n"
    )
    return path


def _wait_until_serving(server: subprocess.Popen[bytes], endpoint: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, f"olah exited:\n{log.read_text(errors='replace')}"
        try:
            with urllib.request.urlopen(f"{endpoint}/api/models/{_REPO}/revision/main") as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError(f"olah did not answer:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def hf_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """olah on 127.0.0.1 serving one repository. huggingface_hub reads HF_ENDPOINT when first
    imported, so this process is told through fsspec's ``hf`` config (HfFileSystem's
    ``endpoint``, with the file systems it already cached dropped), worker processes through
    HF_ENDPOINT and FSSPEC_HF_ENDPOINT. ``constants.ENDPOINT`` stays: ``hf_hub_url`` swaps in
    the endpoint only where a URL starts with it, so patching it sends downloads to the Hub."""
    fsspec = pytest.importorskip("fsspec")
    constants = pytest.importorskip("huggingface_hub.constants")
    from huggingface_hub import HfFileSystem

    command = _olah_command()
    root = tmp_path_factory.mktemp("hub")
    repo = root / "mirrors" / "models" / _REPO
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("A repository for modelport's tests.\n")
    _git(repo, "add", "README.md")
    _git(repo, "commit", "-q", "-m", "start")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = root / "olah.log"
    proxies = {  # a request for anywhere but loopback goes to a dead proxy
        "HTTP_PROXY": f"http://{_DEAD}",
        "HTTPS_PROXY": f"http://{_DEAD}",
        "ALL_PROXY": f"http://{_DEAD}",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    if not _AUDIT.hooked:
        sys.addaudithook(_AUDIT)
        _AUDIT.hooked = True
    with pytest.MonkeyPatch.context() as env, open(log, "wb") as out:
        for name, value in proxies.items():
            env.setenv(name, value)
        env.setenv("HF_ENDPOINT", endpoint)
        env.setenv("FSSPEC_HF_ENDPOINT", endpoint)
        env.setenv("HF_HUB_OFFLINE", "0")
        env.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        env.setenv("HF_HOME", str(root / "hf-home"))
        env.delenv("HF_TOKEN", raising=False)
        env.setattr(constants, "HF_HUB_OFFLINE", False)
        hf_conf = {**fsspec.config.conf.get("hf", {}), "endpoint": endpoint}
        env.setitem(fsspec.config.conf, "hf", hf_conf)
        HfFileSystem.clear_instance_cache()
        server = subprocess.Popen(
            [*command, "-c", str(_config(root, port)), "--log-path", str(root / "logs")],
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        _AUDIT.on = True
        try:
            _wait_until_serving(server, endpoint, log)
            yield Hub(endpoint, repo, log)
        finally:
            _AUDIT.on = False
            HfFileSystem.clear_instance_cache()
            server.terminate()
            server.wait(timeout=30)


def test_hf_inspect_scan_hash_match_local(
    hf_hub: Hub, tmp_path: Path, cli: Any, marker: Path
) -> None:
    files = store_files(tmp_path, marker)
    # one commit before any read: the Hub's file system caches what a folder lists
    urls = {
        name: hf_hub.add(path, f"dir/{name}", lfs=name != "attack.pkl")
        for name, path in files.items()
    }
    for name, path in files.items():
        assert_read_as_local(cli, urls[name], path, lambda: hf_hub.sent_since(0))
    assert not marker.exists()
    assert _AUDIT.outside == []


def test_missing_hf_file_is_an_error(hf_hub: Hub, cli: Any) -> None:
    url = f"hf://{_REPO}@main/absent.safetensors"
    result = cli("inspect", url)
    assert result.code != 0
    assert f"error: {url}: No such file" in result.err
    scanned = cli("scan", url, "--json")
    assert scanned.json["verdict"] == "error"
    assert _AUDIT.outside == []


def test_dedupe_keys_hf_files_by_their_lfs_sha256(hf_hub: Hub, cli: Any, tmp_path: Path) -> None:
    """The same bytes under one name in two folders are judged once, keyed by the sha256 the
    LFS pointer holds: no byte of the second is fetched; other bytes are judged apart."""
    path = small_safetensors(tmp_path / "model.safetensors")
    urls = [hf_hub.add(path, f"hub/{folder}/model.safetensors") for folder in "ab"]
    np.save(tmp_path / "other.npy", np.ones(4))
    urls.append(hf_hub.add(tmp_path / "other.npy", "hub/c/model.safetensors"))
    out = tmp_path / "scan.jsonl"
    mark = len(hf_hub.downloads())
    assert cli("scan", *urls, "--dedupe", "--jobs", "1", "--jsonl", out).code == 0
    written = deduplicated(out, urls)
    fetched = [written[url]["result"]["bytes_fetched"] for url in (urls[0], urls[2])]
    assert hf_hub.sent_since(mark) == sum(fetched)
    assert _AUDIT.outside == []


def test_a_rerun_skips_unchanged_hf_files(hf_hub: Hub, cli: Any, tmp_path: Path) -> None:
    """A file is known by its git blob id: the same one is not read again, a new commit of
    other bytes under the name is."""
    from huggingface_hub import HfFileSystem

    path = small_safetensors(tmp_path / "small.safetensors")
    url = hf_hub.add(path, "resume/small.safetensors")
    out = tmp_path / "scan.jsonl"
    assert cli("scan", url, "--jobs", "1", "--jsonl", out).code == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["version"].startswith("blob_id=") and record["size"] == path.stat().st_size
    assert "0 processed now, 1 already recorded" in cli("scan", url, "--jsonl", out).err
    np.save(tmp_path / "other.npy", np.ones(4))
    hf_hub.add(tmp_path / "other.npy", "resume/small.safetensors")
    # A rerun is a new process: HfFileSystem's listings, cached in this one, go with it.
    HfFileSystem.clear_instance_cache()
    assert "1 processed now, 0 already recorded" in cli("scan", url, "--jsonl", out).err
    assert _AUDIT.outside == []


def test_hf_files_read_in_worker_processes(hf_hub: Hub, cli: Any, tmp_path: Path) -> None:
    """Workers are new processes: they find the server through HF_ENDPOINT and
    FSSPEC_HF_ENDPOINT alone."""
    path = small_safetensors(tmp_path / "small.safetensors")
    urls = [hf_hub.add(path, f"workers/{name}.safetensors") for name in "ab"]
    mark = len(hf_hub.downloads())
    scanned = cli("scan", *urls, "--json", "--jobs", "2")
    assert scanned.code == 0, scanned.err
    assert sorted(f["path"] for f in scanned.json["files"]) == urls
    assert all(f["verdict"] == "safe" for f in scanned.json["files"])
    fetched = sum(f["bytes_fetched"] for f in scanned.json["files"])
    assert fetched == hf_hub.sent_since(mark) > 0
