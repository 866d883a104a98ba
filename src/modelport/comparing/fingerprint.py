"""Content fingerprints of model weights: one digest for the same tensors in any container.

``modelport.hash(path)`` (``fingerprint`` here, so that no module shadows the builtin)
answers "are these the same weights?" across formats, where a file checksum cannot: a
checkpoint and the bare state_dict saved from it, or the same tensors written as a torch
zip, a legacy torch file, ``.safetensors`` or ``.npz``, all give one digest.

The digest, scheme ``modelport-weights-v1``:

- each tensor becomes a record ``[name, dtype, shape, sha256(bytes)]``: ``dtype`` in
  torch's spelling (``dtypes.py``), ``shape`` a list of ints, the bytes those of its
  elements in C order (little-endian, as every reader presents them; strided views are
  walked in C order, block-quantized tensors give their stored blocks);
- records are sorted by name, so the order of tensors in the file does not matter;
- the digest is the sha256 of the UTF-8 JSON text ``["modelport-weights-v1", records]``
  written with ``separators=(",", ":")`` and ``ensure_ascii=True``.

Edge cases: empty tensors hash the empty byte string (their shape still counts); tensors
saved without data (torch meta tensors) carry ``"no-data"`` instead of a byte digest;
tensors that share storage (tied weights) count once under each name, as ``state_dict``
lists them. The weights are those of ``ModelFile.weights()`` (the rule ``load`` uses)
unless ``weights_only=False``, which takes every tensor in the file (optimizer state
included). Bytes are read in bounded chunks (``streaming.source_chunks``), so memory does
not grow with the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modelport.loading import model_file as api
from modelport.transfer import remote
from modelport.transfer.hashing import tensor_digest
from modelport.tree import names as trees

SCHEME = "modelport-weights-v1"
ALGORITHM = "sha256"


@dataclass(frozen=True)
class TensorDigest:
    """One tensor's record in the fingerprint."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str  # sha256 of the C-order bytes, or NO_DATA

    def record(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.digest]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "digest": self.digest,
        }


@dataclass(frozen=True)
class HashReport:
    """The fingerprint of one file's weights, and the per-tensor digests it is made of."""

    path: str
    format: str
    digest: str
    algorithm: str
    scheme: str
    tensor_count: int
    parameters: int
    weights_source: str  # "" for the whole file, else the checkpoint key taken
    tensors: tuple[TensorDigest, ...]
    bytes_fetched: int | None = None  # an object behind a URL: the bytes copied to hash it

    def to_json(self, *, tensors: bool = True) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "digest": self.digest,
            "algorithm": self.algorithm,
            "scheme": self.scheme,
            "tensor_count": self.tensor_count,
            "parameters": self.parameters,
            "weights_source": self.weights_source,
        }
        if self.bytes_fetched is not None:
            payload["bytes_fetched"] = self.bytes_fetched
        if tensors:
            payload["tensors"] = [t.to_json() for t in self.tensors]
        return payload


def fingerprint(
    path: str | Path, *, allow_unsafe: bool = False, weights_only: bool = True
) -> HashReport:
    """The content fingerprint of a model file's weights (exported as ``modelport.hash``).

    The file is scanned first: ``unsafe`` raises ``UnsafeModelError`` unless
    ``allow_unsafe``. Nothing stored in the file is executed. A URL (``s3://``,
    ``https://``, any fsspec protocol) is copied whole first: every tensor byte counts.
    """
    if remote.is_url(path):
        with remote.whole_copy(str(path)) as copy:
            found = fingerprint(copy.path, allow_unsafe=allow_unsafe, weights_only=weights_only)
            return replace(found, path=copy.url, bytes_fetched=copy.bytes_fetched)
    api.check_safety(path, allow_unsafe=allow_unsafe)
    with api.open(path) as model:
        if weights_only:
            selection = model.weights()
            chosen, source = selection.tensors, selection.source
        else:
            chosen, source = dict(model.tensors), ""
        digests = tuple(
            TensorDigest(name, ref.dtype, ref.shape, tensor_digest(ref))
            for name, ref in sorted(chosen.items())
        )
        return HashReport(
            path=str(model.path),
            format=model.format.value,
            digest=combine(digests),
            algorithm=ALGORITHM,
            scheme=SCHEME,
            tensor_count=len(digests),
            parameters=trees.parameter_count(chosen),
            weights_source=source,
            tensors=digests,
        )


def combine(digests: tuple[TensorDigest, ...] | list[TensorDigest]) -> str:
    """The file digest from per-tensor records, whatever order they come in."""
    records = sorted((d.record() for d in digests), key=lambda r: str(r[0]))
    text = json.dumps([SCHEME, records], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
