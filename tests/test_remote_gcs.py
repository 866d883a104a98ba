"""gs:// objects: ``inspect``, ``scan`` and ``hash`` read through gcsfs from
gcp-storage-emulator's GCS JSON API on loopback, as they are from a real bucket. Files go up
through Google's own client (google-cloud-storage). Oracles: the same commands on the local
file, ``safetensors.safe_open`` for the large file, and the body bytes the server sent."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.remote_checks import (
    assert_read_as_local,
    big_safetensors,
    deduplicated,
    small_safetensors,
    store_files,
)

emulator = pytest.importorskip("gcp_storage_emulator.server")
emulator_storage = pytest.importorskip("gcp_storage_emulator.storage")

pytestmark = pytest.mark.heavy  # as the S3 tests: a server, gcsfs and Google's client


class _CountingHandler(emulator.RequestHandler):
    """The emulator's handler, noting the body size of each media download (``alt=media``,
    how gcsfs reads an object's bytes)."""

    def __init__(self, sent: list[int], *args: Any) -> None:
        self.sent = sent
        super().__init__(*args)

    def send_header(self, keyword: str, value: str) -> None:
        super().send_header(keyword, value)
        if keyword.lower() == "content-length" and "alt=media" in self.path:
            self.sent.append(int(value))


@dataclass
class Bucket:
    name: str
    client: Any  # google.cloud.storage.Client
    sent: list[int]  # body bytes of every media download the server answered

    def upload(self, path: Path, key: str) -> str:
        """``path``'s bytes as the object ``key``; its gs:// URL."""
        self.client.bucket(self.name).blob(key).upload_from_filename(str(path))
        return f"gs://{self.name}/{key}"

    def received_since(self, mark: int) -> int:
        return sum(self.sent[mark:])


@pytest.fixture(scope="module")
def gcs_bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    """A bucket on the emulator, in memory on 127.0.0.1; gcsfs finds it through
    STORAGE_EMULATOR_HOST and reads it anonymously (fsspec's ``gs`` config)."""
    fsspec = pytest.importorskip("fsspec")
    with pytest.MonkeyPatch.context() as env:
        # gcsfs's default class probes each bucket's layout over gRPC, which no emulator
        # serves (a minute of retries per call): the plain JSON-API class reads it.
        env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        env.setenv("FSSPEC_GS_TOKEN", "anon")  # for worker processes
        env.setitem(fsspec.config.conf, "gs", {**fsspec.config.conf.get("gs", {}), "token": "anon"})
        env.setenv("NO_GCE_CHECK", "true")  # never ask a metadata server for credentials
        gcsfs = pytest.importorskip("gcsfs")
        gcs = pytest.importorskip("google.cloud.storage")  # gcsfs brings it
        assert fsspec.get_filesystem_class("gs") is gcsfs.core.GCSFileSystem, (
            "gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was set"
        )
        from google.auth.credentials import AnonymousCredentials

        sent: list[int] = []
        storage = emulator_storage.Storage(
            use_memory_fs=True, data_dir=str(tmp_path_factory.mktemp("gcs"))
        )
        server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_CountingHandler, sent, storage)
        )
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")
        try:
            client = gcs.Client(project="test", credentials=AnonymousCredentials())
            client.create_bucket("models")
            yield Bucket("models", client, sent)
        finally:
            server.shutdown()
            server.server_close()
            thread.join()


def test_gcs_inspect_scan_hash_match_local(
    gcs_bucket: Bucket, tmp_path: Path, cli: Any, marker: Path
) -> None:
    for name, path in store_files(tmp_path, marker).items():
        url = gcs_bucket.upload(path, f"dir/{name}")
        assert_read_as_local(cli, url, path, lambda: sum(gcs_bucket.sent))
    assert not marker.exists()


def test_large_gcs_safetensors_inspected_by_its_header(
    gcs_bucket: Bucket, tmp_path: Path, cli: Any
) -> None:
    """64 MiB of tensor data behind a small header: inspect fetches the header and the ends
    the sniffers and the scanner look at, far under a megabyte."""
    path = big_safetensors(tmp_path / "big.safetensors")
    url = gcs_bucket.upload(path, "large/big.safetensors")

    mark = len(gcs_bucket.sent)
    result = cli("inspect", url, "--json")
    assert result.code == 0, result.err
    found = result.json
    assert found["format"] == "safetensors"
    assert found["size_bytes"] == path.stat().st_size
    assert [t["name"] for t in found["tensors"]] == ["big"]
    assert found["tensors"][0]["shape"] == [4096, 4096]
    assert found["safety"]["verdict"] == "safe"
    assert 0 < found["bytes_fetched"] < 1 << 20
    assert found["bytes_fetched"] == gcs_bucket.received_since(mark)


def test_missing_gcs_object_is_an_error(gcs_bucket: Bucket, cli: Any) -> None:
    url = f"gs://{gcs_bucket.name}/absent/model.safetensors"
    result = cli("inspect", url)
    assert result.code != 0
    assert "absent/model.safetensors" in result.err
    scanned = cli("scan", url, "--json")
    assert scanned.json["verdict"] == "error"


def test_a_rerun_skips_unchanged_gcs_objects(gcs_bucket: Bucket, cli: Any, tmp_path: Path) -> None:
    """An object is known by its generation: the same one is not read again, a new upload
    under the name is."""
    path = small_safetensors(tmp_path / "small.safetensors")
    url = gcs_bucket.upload(path, "resume/small.safetensors")
    out = tmp_path / "scan.jsonl"
    assert cli("scan", url, "--jobs", "1", "--jsonl", out).code == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["version"].startswith("generation=") and record["size"] == path.stat().st_size
    assert record["mtime_ns"] > 0
    assert "0 processed now, 1 already recorded" in cli("scan", url, "--jsonl", out).err
    np.save(tmp_path / "other.npy", np.ones(4))
    gcs_bucket.upload(tmp_path / "other.npy", "resume/small.safetensors")
    assert "1 processed now, 0 already recorded" in cli("scan", url, "--jsonl", out).err


def test_dedupe_keys_gcs_objects_by_their_md5(gcs_bucket: Bucket, cli: Any, tmp_path: Path) -> None:
    """The same bytes under one name in two prefixes are judged once, keyed by the MD5 GCS
    keeps: no byte of the second is fetched; other bytes under the name are judged apart."""
    path = small_safetensors(tmp_path / "model.safetensors")
    urls = [gcs_bucket.upload(path, f"hub/{prefix}/model.safetensors") for prefix in "ab"]
    np.save(tmp_path / "other.npy", np.ones(4))
    urls.append(gcs_bucket.upload(tmp_path / "other.npy", "hub/c/model.safetensors"))
    out = tmp_path / "scan.jsonl"
    mark = len(gcs_bucket.sent)
    assert cli("scan", *urls, "--dedupe", "--jobs", "1", "--jsonl", out).code == 0
    written = deduplicated(out, urls)
    fetched = [written[url]["result"]["bytes_fetched"] for url in (urls[0], urls[2])]
    assert gcs_bucket.received_since(mark) == sum(fetched)
