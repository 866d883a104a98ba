"""Objects behind URLs: ``inspect``, ``scan`` and ``hash`` over a local HTTP server that
honours ``Range`` and over moto's S3 server, both on loopback. Oracles: the same commands
on the local file (the readers' own tests tie those to the reference libraries), and
``safetensors.safe_open`` for the large file."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import modelport
from modelport.fleet.records import Identity
from modelport.scanning import remote_inputs
from modelport.scanning.scanner import scan_file
from tests.remote_checks import (
    assert_read_as_local,
    big_safetensors,
    deduplicated,
    same_inspect,
    small_safetensors,
    store_files,
    torch_zip,
)

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves ``root``'s files with ``Range: bytes=a-b`` (python's http.server has none),
    counting the body bytes it sends."""

    root: ClassVar[Path]
    sent: ClassVar[list[int]]
    tagged: ClassVar[bool] = True

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        path = self.root / self.path.lstrip("/").split("?", 1)[0]
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end = 0, size
        wanted = _RANGE.match(self.headers.get("Range", ""))
        if wanted:
            start = int(wanted.group(1))
            end = min(size, int(wanted.group(2)) + 1) if wanted.group(2) else size
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        if self.tagged:  # as nginx names a file's version: mtime and size
            info = path.stat()
            self.send_header("ETag", f'"{info.st_mtime_ns:x}-{size:x}"')
            self.send_header("Last-Modified", self.date_time_string(int(info.st_mtime)))
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if body:
            with open(path, "rb") as handle:
                handle.seek(start)
                self.wfile.write(handle.read(end - start))
            self.sent.append(end - start)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest treats stray output as noise."""


@dataclass
class Served:
    root: Path
    url: str
    sent: list[int]


@pytest.fixture
def http_files(tmp_path: Path) -> Iterator[Served]:
    root = tmp_path / "served"
    root.mkdir()
    sent: list[int] = []
    handler = type("Handler", (_RangeHandler,), {"root": root, "sent": sent})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Served(root, f"http://127.0.0.1:{server.server_address[1]}", sent)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _fill_holes(copy: Any, byte: int) -> None:
    with open(copy.path, "r+b") as handle:
        for start, end in copy.holes():
            os.pwrite(handle.fileno(), bytes([byte]) * (end - start), start)


# -- HTTP ---------------------------------------------------------------------------------------


def test_large_safetensors_inspected_by_its_header(http_files: Served, cli: Any) -> None:
    """64 MiB of tensor data behind a small header: inspect fetches the header and the ends
    the sniffers and the scanner look at, far under a megabyte."""
    path = big_safetensors(http_files.root / "big.safetensors")

    result = cli("inspect", f"{http_files.url}/big.safetensors", "--json")
    assert result.code == 0, result.err
    found = result.json
    assert found["format"] == "safetensors"
    assert found["size_bytes"] == path.stat().st_size
    assert [t["name"] for t in found["tensors"]] == ["big"]
    assert found["safety"]["verdict"] == "safe"
    assert 0 < found["bytes_fetched"] < 1 << 20
    assert found["bytes_fetched"] == sum(http_files.sent)  # every byte that arrived counts
    human = cli("inspect", f"{http_files.url}/big.safetensors")
    assert re.search(r"fetched[^\n]*bytes", human.out)


def test_http_inspect_and_scan_match_local(http_files: Served) -> None:
    path = small_safetensors(http_files.root / "small.safetensors")
    url = f"{http_files.url}/small.safetensors"
    same_inspect(modelport.inspect(url).to_json(), modelport.inspect(path).to_json())
    remote_scan, local_scan = modelport.scan(url).to_json(), modelport.scan(path).to_json()
    assert remote_scan.pop("bytes_fetched") > 0
    assert remote_scan.pop("path") == url
    local_scan.pop("path")
    assert remote_scan == local_scan


def test_credentials_never_reported(http_files: Served) -> None:
    small_safetensors(http_files.root / "model.safetensors")
    host = http_files.url.removeprefix("http://")
    url = f"http://someone:s3cret@{host}/model.safetensors?X-Amz-Signature=abc"
    text = json.dumps(modelport.inspect(url).to_json())
    assert "s3cret" not in text and "X-Amz-Signature" not in text
    assert f"http://{host}/model.safetensors" in text


def test_missing_object_is_an_error(http_files: Served, cli: Any) -> None:
    result = cli("inspect", f"{http_files.url}/absent.safetensors")
    assert result.code != 0
    assert "absent.safetensors" in result.err
    scanned = cli("scan", f"{http_files.url}/absent.safetensors", "--json")
    assert scanned.json["verdict"] == "error"


def _gguf(path: Path) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    rng = np.random.default_rng(1)
    writer.add_tensor("tok_embd.weight", rng.standard_normal((1000, 96)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(96, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _npy(path: Path) -> Path:
    np.save(path, np.random.default_rng(2).standard_normal((600, 256)).astype(np.float32))
    return path


@pytest.mark.parametrize(
    "name, build",
    [
        ("small.safetensors", small_safetensors),
        ("model.gguf", _gguf),
        ("array.npy", _npy),
        pytest.param("model.pt", torch_zip, marks=pytest.mark.heavy),
    ],
)
def test_holes_never_read(http_files: Served, name: str, build: Any) -> None:
    """The copy of a format read by range reads the same with its holes full of other
    bytes: no reader and no scanner reading depends on what was not fetched."""
    path = build(http_files.root / name)
    local = modelport.inspect(path).to_json()
    local_scan = scan_file(path).to_json()
    with remote_inputs.local_copy(f"{http_files.url}/{name}") as copy:
        assert not copy.whole and copy.holes(), name
        assert copy.bytes_fetched < path.stat().st_size
        _fill_holes(copy, 0xA5)
        poisoned = modelport.inspect(copy.path).to_json()
        poisoned_scan = scan_file(copy.path).to_json()
    for report in (poisoned, local, poisoned_scan, local_scan):
        report.pop("path")
    assert poisoned == local, name
    assert poisoned_scan == local_scan, name


def test_temporary_copy_removed(http_files: Served) -> None:
    small_safetensors(http_files.root / "small.safetensors")
    with remote_inputs.local_copy(f"{http_files.url}/small.safetensors") as copy:
        folder = copy.path.parent
        assert copy.path.is_file()
    assert not folder.exists()
    with (
        pytest.raises(RuntimeError),
        remote_inputs.local_copy(f"{http_files.url}/small.safetensors") as copy,
    ):
        folder = copy.path.parent
        raise RuntimeError("stop")
    assert not folder.exists()


# -- S3 (moto's server) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """A bucket on moto's S3 server on loopback; s3fs finds it through AWS_ENDPOINT_URL."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
        try:
            yield "models"
        finally:
            server.stop()


@pytest.mark.heavy
def test_s3_inspect_scan_hash_match_local(
    s3_bucket: str, tmp_path: Path, cli: Any, marker: Path
) -> None:
    import boto3

    client = boto3.client("s3")
    for name, path in store_files(tmp_path, marker).items():
        client.upload_file(str(path), s3_bucket, f"dir/{name}")
        assert_read_as_local(cli, f"s3://{s3_bucket}/dir/{name}", path)
    assert not marker.exists()


@pytest.mark.heavy  # worker processes: seconds of start-up
def test_many_urls_run_in_workers(http_files: Served, cli: Any, tmp_path: Path) -> None:
    """Several URLs make a fleet run: each is one input, its record names the URL."""
    for name in ("a.safetensors", "b.safetensors"):
        small_safetensors(http_files.root / name)
    urls = [f"{http_files.url}/a.safetensors", f"{http_files.url}/b.safetensors"]
    out = tmp_path / "scan.jsonl"
    scanned = cli("scan", *urls, "--json", "--jobs", "1", "--jsonl", out)
    assert scanned.code == 0, scanned.err
    assert [f["path"] for f in scanned.json["files"]] == urls
    assert all(f["bytes_fetched"] > 0 for f in scanned.json["files"])
    found = cli("inspect", *urls, "--json", "--jobs", "1")
    assert [f["path"] for f in found.json] == urls
    assert all(f["bytes_fetched"] > 0 for f in found.json)


def test_server_without_ranges_sends_it_whole(tmp_path: Path) -> None:
    """python's own http.server ignores Range: the whole object arrives, and counts."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    path = small_safetensors(tmp_path / "small.safetensors")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/small.safetensors"
        found = modelport.inspect(url).to_json()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert found["bytes_fetched"] >= path.stat().st_size
    same_inspect(found, modelport.inspect(path).to_json())


# -- resuming over URLs -------------------------------------------------------------------------


def test_an_object_is_identified_by_its_version(http_files: Served, tmp_path: Path) -> None:
    """A URL's identity is what its server says of the bytes (ETag, Last-Modified), so a
    rerun can tell an unchanged object; with neither, it has none and is read again."""
    path = small_safetensors(http_files.root / "a.safetensors")
    url = f"{http_files.url}/a.safetensors"
    first = Identity.of(url)
    assert first is not None
    assert (first.size, first.device, first.inode) == (path.stat().st_size, 0, 0)
    assert first.version.startswith('ETag="')
    assert first.mtime_ns == int(path.stat().st_mtime) * 10**9  # HTTP dates have seconds
    assert Identity.of(url) == first
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5 * 10**9))
    assert Identity.of(url) not in (None, first)
    _RangeHandler.tagged = False
    try:
        assert Identity.of(url) is None
    finally:
        _RangeHandler.tagged = True
    assert Identity.of(f"{http_files.url}/missing.safetensors") is None


@pytest.mark.heavy  # worker processes
def test_a_rerun_skips_unchanged_objects(http_files: Served, cli: Any, tmp_path: Path) -> None:
    for name in ("a.safetensors", "b.safetensors"):
        small_safetensors(http_files.root / name)
    urls = [f"{http_files.url}/a.safetensors", f"{http_files.url}/b.safetensors"]
    out = tmp_path / "scan.jsonl"
    assert cli("scan", *urls, "--jobs", "1", "--jsonl", out).code == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in written) == urls
    assert all(r["version"].startswith("ETag=") and r["device"] == 0 for r in written)
    again = cli("scan", *urls, "--jobs", "1", "--jsonl", out)
    assert "0 processed now, 2 already recorded" in again.err
    b = http_files.root / "b.safetensors"
    later = b.stat().st_mtime_ns + 5 * 10**9
    np.save(http_files.root / "c.npy", np.zeros(3))  # other bytes, renamed over b
    (http_files.root / "c.npy").replace(b)
    os.utime(b, ns=(later, later))
    third = cli("scan", *urls, "--jobs", "1", "--jsonl", out)
    assert "1 processed now, 1 already recorded" in third.err
    last = json.loads(out.read_text().splitlines()[-1])
    assert (last["path"], last["format"]) == (urls[1], "npy")


@pytest.mark.heavy
def test_a_rerun_skips_unchanged_s3_objects(s3_bucket: str, cli: Any, tmp_path: Path) -> None:
    import boto3

    client = boto3.client("s3")
    path = small_safetensors(tmp_path / "small.safetensors")
    client.upload_file(str(path), s3_bucket, "resume/small.safetensors")
    url = f"s3://{s3_bucket}/resume/small.safetensors"
    out = tmp_path / "scan.jsonl"
    assert cli("scan", url, "--jobs", "1", "--jsonl", out).code == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["version"].startswith("ETag=") and record["size"] == path.stat().st_size
    assert "0 processed now, 1 already recorded" in cli("scan", url, "--jsonl", out).err
    np.save(tmp_path / "other.npy", np.ones(4))
    client.upload_file(str(tmp_path / "other.npy"), s3_bucket, "resume/small.safetensors")
    assert "1 processed now, 0 already recorded" in cli("scan", url, "--jsonl", out).err


@pytest.mark.heavy
def test_dedupe_keys_objects_by_their_stored_digest(
    s3_bucket: str, cli: Any, tmp_path: Path
) -> None:
    """The same bytes under one name in two prefixes are judged once, keyed by S3's ETag:
    no byte of the second is fetched; other bytes under the name are judged apart."""
    import boto3

    client = boto3.client("s3")
    path = small_safetensors(tmp_path / "model.safetensors")
    for prefix in ("hub/a", "hub/b"):
        client.upload_file(str(path), s3_bucket, f"{prefix}/model.safetensors")
    np.save(tmp_path / "other.npy", np.ones(4))
    client.upload_file(str(tmp_path / "other.npy"), s3_bucket, "hub/c/model.safetensors")
    urls = [f"s3://{s3_bucket}/hub/{p}/model.safetensors" for p in "abc"]
    out = tmp_path / "scan.jsonl"
    assert cli("scan", *urls, "--dedupe", "--jobs", "1", "--jsonl", out).code == 0
    deduplicated(out, urls)
