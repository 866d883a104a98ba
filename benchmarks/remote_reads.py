"""Bytes fetched for remote header reads: a 1 GB safetensors file (written sparse: a real
header, zero tensor bytes), inspected over a local HTTP server with Range support and over
moto's S3 server, both on loopback; prints bytes fetched and wall time of each inspect."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _handler(root: Path) -> type[BaseHTTPRequestHandler]:
    class Ranges(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, *, body: bool) -> None:
            path = root / self.path.lstrip("/")
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
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if body:
                with open(path, "rb") as handle:
                    handle.seek(start)
                    self.wfile.write(handle.read(end - start))

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Ranges


def big_safetensors(path: Path, size: int = 1 << 30, tensors: int = 256) -> Path:
    """``tensors`` float16 tensors filling ``size`` bytes, header first, data as holes."""
    each = size // tensors // 2
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for i in range(tensors):
        header[f"layers.{i}.weight"] = {
            "dtype": "F16",
            "shape": [each],
            "data_offsets": [i * each * 2, (i + 1) * each * 2],
        }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.truncate(8 + len(text) + tensors * each * 2)
    return path


def remote_header_reads() -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    import modelport

    folder = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    path = big_safetensors(folder / "big.safetensors")
    size = path.stat().st_size
    http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(folder))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto._server.server_port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="x",
        AWS_DEFAULT_REGION="us-east-1",
        NO_PROXY="127.0.0.1,localhost",
    )
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    s3.upload_file(str(path), "bench", "big.safetensors")
    print(f"\nremote header reads: a {size / 1e9:.2f} GB safetensors file")
    for name, url in (
        ("local file", str(path)),
        ("http (Range)", f"http://127.0.0.1:{http.server_address[1]}/big.safetensors"),
        ("s3 (moto)", "s3://bench/big.safetensors"),
    ):
        started = time.perf_counter()
        report = modelport.inspect(url)
        wall = time.perf_counter() - started
        fetched = report.bytes_fetched
        shown = "-" if fetched is None else f"{fetched:,} B ({fetched / size:.5%} of the file)"
        print(f"  {name:14} {len(report.tensors)} tensors  fetched {shown:>36}  {wall:6.2f} s")
    http.shutdown()
    shutil.rmtree(folder)
    moto.stop()


if __name__ == "__main__":
    remote_header_reads()
