"""Attack techniques, each with a benign twin, and malformed files: built byte by byte.

Every attack is a file (or folder) that its natural loader opens and, in doing so, reaches a
payload that would only create the ``marker`` file: a shell ``touch``, an ``open`` of the
marker, a ``logging.FileHandler`` on it. The bytes come from ``writers`` (pickles opcode by
opcode, archives member by member, tar headers packed by hand). Each builder writes inside
the folder it is given and needs no network.

A benign twin keeps everything a legitimate writer could produce (a deflated member, a
legacy layout, a joblib dtype spelling, an HDF5 userblock, a symbolic link) and drops the
payload; where the trick itself breaks the format's rules (a lying entry count or size), the
twin is the well-formed file.

``Technique.kind`` says where the trick lives: ``container`` (archive structure),
``stream`` (what follows what in a byte stream), ``reading`` (one file, several valid
readings), ``call`` (a callable reached through code a scanner allows), ``code`` (code or
object data in a format that carries it), ``directory`` (folder layout).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path

from tests.attacks.corpus_bypasses import BYPASSES
from tests.attacks.corpus_redteam3 import REDTEAM3
from tests.attacks.technique import (
    JOBLIB,
    NUMPY_PICKLE,
    NUMPY_SECOND_LOAD,
    PICKLE,
    PICKLE_RECORDS,
    TORCH_EXPORT,
    TORCH_JIT,
    TORCH_UNSAFE,
    Make,
    Malformed,
    Technique,
    file_technique,
)
from tests.attacks.writers import (
    HEADER_BENIGN,
    OBJECT_DTYPE,
    RECORD_DTYPE,
    bad_tar_checksum,
    call,
    crc_mismatch,
    cut_mid_opcode,
    dtype,
    eocd_count,
    float_npy,
    gguf_too_many_tensors,
    global_,
    hdf5,
    header_shell,
    hidden_local_header,
    hub_cache,
    inflates_past_size,
    joblib_stream,
    joblib_zfile,
    legacy_cut_after_magic,
    legacy_stream,
    legacy_tar_members,
    local_size_lie,
    lzma_alone,
    nested_zips,
    npy,
    object_array_pickle,
    object_npy,
    opaque_constant,
    outside_link,
    pickled_weight,
    plain,
    pt2,
    pt2_parameter,
    pt2_state_dict,
    rebuild_from_type,
    safetensors,
    shell,
    shell1,
    shell2,
    tar_archive,
    tar_pickle_polyglot,
    text,
    torch_zip,
    torchscript,
    touch,
    write,
    zip_archive,
)


def _npz_member(name: str) -> str:
    return f"import numpy as np; np.load(PATH, allow_pickle=True)[{name!r}]"


SNAPSHOT_WEIGHTS = (
    "import glob, torch\n"
    "for weights in glob.glob(PATH + '/snapshots/*/pytorch_model.bin'):\n"
    "    torch.load(weights, weights_only=False)"
)
FOLDER_WEIGHTS = "import torch; torch.load(PATH + '/pytorch_model.bin', weights_only=False)"


# -- the techniques --------------------------------------------------------------------------------


def _pickle(
    name: str, kind: str, payload: Callable[[Path], bytes], note: str, patches: str = ""
) -> Technique:
    """A plain pickle read by pickle.load, which has no safe setting; the twin is data."""

    def make(marker: Path | None) -> bytes:
        return plain(0) if marker is None else payload(marker)

    return file_technique(name, kind, "model.pkl", make, PICKLE, True, note, patches)


def _evil(marker: Path | None) -> bytes | None:
    return None if marker is None else shell2(marker)


_PREFIX = b"#!/bin/sh\n# model package\n" * 8
_SAMPLE_INPUTS = "/sample_inputs/model.pt"


def _from_file(spelling: str) -> Make:
    """TorchScript whose ``__setstate__`` maps a file under the marker (it cannot exist:
    native code the audit hook cannot block fails, naming the path)."""
    line = f'    self.weight = {spelling}("{{path}}", False, 2)\n'
    return lambda m: torchscript(None if m is None else line.format(path=m / "inside"))


def _joblib_file(
    array_dtype: bytes, shape: bytes, nbytes: int, *, order: str = "C", padding: int | None = None
) -> Make:
    """joblib's array layout, then the shell (the array dropped) or, for the twin, STOP."""

    def make(marker: Path | None) -> bytes:
        tail = b"." if marker is None else b"0" + shell(marker)
        return joblib_stream(array_dtype, shape, nbytes, tail, order=order, padding=padding)

    return make


TECHNIQUES: tuple[Technique, ...] = (
    # -- containers
    file_technique(
        "torch-zip-deflated-data-pkl",
        "container",
        "model.pt",
        lambda m: torch_zip(_evil(m), deflated=("/data.pkl",)),
        TORCH_UNSAFE,
        False,
        "data.pkl DEFLATED, not stored as torch writes it: torch's reader inflates it; a "
        "scanner that reads stored bytes in place sees compressed noise",
    ),
    file_technique(
        "pt2-deflated-nested-sample-inputs",
        "container",
        "model.pt2",
        lambda m: pt2(
            replace=() if m is None else ((_SAMPLE_INPUTS, torch_zip(shell2(m))),),
            deflated=(_SAMPLE_INPUTS,),
        ),
        TORCH_EXPORT,
        True,
        "a torch zip nested DEFLATED in a .pt2: torch.export.load falls back to "
        "weights_only=False when the sample inputs fail the safe load",
    ),
    file_technique(
        "pt2-legacy-weights-member",
        "container",
        "model.pt2",
        lambda m: pt2(
            add=(
                (
                    "data/weights/model.pt",
                    pt2_state_dict() if m is None else torch_zip(shell2(m)),
                ),
            )
        ),
        TORCH_EXPORT,
        True,
        "data/weights/<model>.pt, the legacy name torch.export.load reads before the weights "
        "config (no config entry points at it), loaded with a weights_only=False fallback",
    ),
    file_technique(
        "pt2-opaque-constant-raw-pickle",
        "container",
        "model.pt2",
        lambda m: opaque_constant(plain(0) if m is None else shell(m)),
        TORCH_EXPORT,
        True,
        "data/constants/opaque_obj_0: no extension, no zip, named only in a JSON config; "
        "torch.export.load hands it to pickle.loads",
    ),
    file_technique(
        "pt2-prepended-bytes",
        "container",
        "model.pt2",
        lambda m: pt2(
            replace=() if m is None else ((_SAMPLE_INPUTS, torch_zip(shell2(m))),),
            prefix=_PREFIX,
        ),
        TORCH_EXPORT,
        True,
        "text before the zip (as in self-extracting archives), offsets absolute: torch's "
        "reader finds the zip from its end; a scanner sniffing the first bytes sees text",
    ),
    file_technique(
        "npz-eocd-count-lies",
        "container",
        "arrays.npz",
        lambda m: (
            zip_archive([("weight.npy", float_npy()), ("extra.npy", float_npy())])
            if m is None
            else eocd_count(
                zip_archive([("weight.npy", float_npy()), ("extra.npy", object_npy(shell2(m)))]), 1
            )
        ),
        _npz_member("extra"),
        False,
        "the end record counts 1 entry of 2: Python's zipfile walks the whole central "
        "directory and numpy unpickles the object array a counting reader never sees",
    ),
    file_technique(
        "pt2-weight-marked-pickled",
        "container",
        "model.pt2",
        lambda m: pickled_weight(pt2_parameter() if m is None else torch_zip(shell2(m))),
        TORCH_EXPORT,
        True,
        "the weights config marks weight_0 use_pickle (as torch.export.save does for tensor "
        "subclasses): torch.export.load reads that raw-looking member with weights_only=False",
    ),
    file_technique(
        "torch-zip-hidden-local-header",
        "container",
        "model.pt",
        lambda m: hidden_local_header(_evil(m)),
        TORCH_UNSAFE,
        False,
        "the central directory points data.pkl at a second local header inside another "
        "member's bytes: torch reads that one, a local-header walker sees the benign first",
    ),
    file_technique(
        "torch-legacy-v7-tar",
        "container",
        "model.pt",
        lambda m: tar_archive(legacy_tar_members(_evil(m))),
        TORCH_UNSAFE,
        False,
        "torch 0.1-0.3's tar (sys_info, storages, tensors, pickle) in the V7 format, no "
        "ustar magic: torch.load still tries it first; the object is in member 'pickle'",
    ),
    file_technique(
        "torch-legacy-tar-protocol0-storages",
        "container",
        "model.pt",
        lambda m: tar_archive(
            legacy_tar_members(storage_count=b"I1\n." if m is None else shell(m)), ustar=True
        ),
        TORCH_UNSAFE,
        False,
        "the payload in member 'storages' (unpickled before 'pickle') as a protocol-0 text "
        "pickle: no .pkl name and no 0x80 first byte",
    ),
    file_technique(
        "npz-protocol1-member-without-extension",
        "container",
        "arrays.npz",
        lambda m: zip_archive(
            [
                ("weight.npy", float_npy()),
                ("extra", object_npy(plain(1) if m is None else shell1(m))),
            ]
        ),
        _npz_member("extra"),
        False,
        "an npz member named 'extra', not 'extra.npy': numpy still reads it as an array "
        "(by its magic) and unpickles its object data, a protocol-1 pickle (no 0x80)",
    ),
    file_technique(
        "torch-zip-local-header-size-lies",
        "container",
        "model.pt",
        lambda m: torch_zip() if m is None else local_size_lie(torch_zip(shell2(m)), "/data.pkl"),
        TORCH_UNSAFE,
        False,
        "data.pkl's local header claims 0 bytes while the central directory has the real "
        "size: torch reads by the central directory; a local-header walker sees nothing",
    ),
    # -- streams
    file_technique(
        "legacy-stream-evil-protocol-pickle",
        "stream",
        "model.pt",
        functools.partial(legacy_stream, 1),
        TORCH_UNSAFE,
        False,
        "torch's pre-zip stream is five pickles; the 2nd (the protocol version) is the "
        "payload, where a scanner of the object pickle does not look",
    ),
    file_technique(
        "legacy-stream-evil-sys-info",
        "stream",
        "model.pt",
        functools.partial(legacy_stream, 2),
        TORCH_UNSAFE,
        False,
        "the 3rd pickle of the pre-zip stream (sys_info) is the payload",
    ),
    file_technique(
        "legacy-stream-evil-storage-keys",
        "stream",
        "model.pt",
        functools.partial(legacy_stream, 4),
        TORCH_UNSAFE,
        False,
        "the pickle after the object pickle's STOP (the storage keys) is the payload",
    ),
    file_technique(
        "pickle-records-second-evil",
        "stream",
        "records.pkl",
        lambda m: plain(2) + (plain(0) if m is None else shell(m)),
        PICKLE_RECORDS,
        True,
        "bytes after the final STOP are a second, protocol-0 pickle: one pickle.load stops "
        "before it, a reader of records (pickle.load until EOF) runs it",
    ),
    file_technique(
        "joblib-dtype-spelled-float64",
        "stream",
        "model.joblib",
        _joblib_file(dtype("float64"), b"K\x03\x85", 24),
        JOBLIB,
        True,
        "numpy.dtype('float64', ...) instead of 'f8': a reader with a table of joblib's own "
        "spellings cannot size the array, and its bytes are all STOP",
    ),
    file_technique(
        "joblib-shape-list-fortran",
        "stream",
        "model.joblib",
        _joblib_file(dtype("f8"), b"](K\x02K\x03e", 48, order="F"),
        JOBLIB,
        True,
        "shape as a list [2, 3], order 'F': joblib multiplies whatever shape holds; a reader "
        "expecting a tuple skips nothing and stops on the data",
    ),
    file_technique(
        "joblib-record-dtype-state",
        "stream",
        "model.joblib",
        _joblib_file(RECORD_DTYPE, b"K\x02\x85", 32),
        JOBLIB,
        True,
        "a record dtype 'V16' sized by its pickled state (two float64 fields), not by its "
        "spelling: a reader that sizes by the spelling alone misplaces the rest",
    ),
    file_technique(
        "joblib-alignment-padding-dots",
        "stream",
        "model.joblib",
        _joblib_file(dtype("f8"), b"K\x03\x85", 24, padding=46),
        JOBLIB,
        True,
        "numpy_array_alignment_bytes present: joblib reads a padding length byte (46) and "
        "skips that much, whatever the alignment; padding and data are STOP bytes",
    ),
    file_technique(
        "joblib-object-array-nested-pickle",
        "stream",
        "model.joblib",
        lambda m: joblib_stream(
            OBJECT_DTYPE,
            b"K\x02\x85",
            0,
            (object_array_pickle() if m is None else shell2(m)) + b".",
        ),
        JOBLIB,
        True,
        "an object-dtype array: what follows the wrapper's BUILD is a whole second pickle "
        "that joblib runs with a fresh unpickler, not array bytes to skip",
    ),
    file_technique(
        "joblib-lzma-alone-compressed",
        "stream",
        "model.joblib",
        lambda m: lzma_alone(_joblib_file(dtype("f8"), b"K\x03\x85", 24)(m)),
        JOBLIB,
        True,
        "a joblib stream in the .lzma 'alone' container, which joblib.load detects by its "
        "first bytes (5d 00) and inflates, whatever the file's name",
    ),
    file_technique(
        "joblib-zfile-legacy",
        "stream",
        "model.joblib",
        lambda m: joblib_zfile(plain(2) if m is None else shell2(m)),
        JOBLIB,
        True,
        "joblib's pre-0.9.3 'ZF' format (hex length, then zlib): joblib.load still reads it "
        "through its compatibility unpickler",
    ),
    # -- several readings
    file_technique(
        "tar-header-holds-evil-pickle",
        "reading",
        "model.tar",
        lambda m: tar_pickle_polyglot(HEADER_BENIGN if m is None else header_shell(m), None),
        PICKLE,
        True,
        "a valid torch 0.x tar of benign members whose first header is also a pickle (its "
        "name field starts it, a BINBYTES skips the numeric fields): pickle.load runs it",
    ),
    file_technique(
        "pickle-header-then-evil-legacy-tar",
        "reading",
        "model.pt",
        lambda m: tar_pickle_polyglot(HEADER_BENIGN, _evil(m)),
        TORCH_UNSAFE,
        False,
        "a benign pickle at offset 0 that is also the first header of a torch 0.x tar whose "
        "'pickle' member is the payload: torch.load tries the tar reading first",
    ),
    file_technique(
        "hdf5-userblock-pickle",
        "reading",
        "model.h5",
        lambda m: hdf5(plain(2) if m is None else shell2(m)),
        PICKLE,
        True,
        "an HDF5 file (h5py opens it) with a 512-byte userblock holding a pickle: HDF5 "
        "readers skip the userblock, pickle.load runs it",
    ),
    file_technique(
        "evil-pickle-then-torch-zip",
        "reading",
        "model.pt",
        lambda m: (plain(2) if m is None else shell2(m)) + torch_zip(),
        PICKLE,
        True,
        "a pickle followed by a benign torch zip that zipfile finds from the end: a scanner "
        "that trusts the zip reading never looks at offset 0",
    ),
    _pickle(
        "text-pickle-third-party-class",
        "reading",
        lambda m: (
            call(
                global_("copyreg", "_reconstructor"),
                global_("joblib.logger", "PrintTime"),
                global_("joblib.logger", "PrintTime"),
                text(str(m)),
            )
            + b"."
        ),
        "protocol 0: copyreg._reconstructor(PrintTime, PrintTime, path) calls joblib's "
        "PrintTime.__init__(path), which opens the path for writing",
    ),
    # -- calls made by allowed code
    file_technique(
        "rebuild-from-type-v2-filehandler-in-torch-zip",
        "call",
        "model.pt",
        lambda m: torch_zip(None if m is None else rebuild_from_type(m)),
        TORCH_UNSAFE,
        False,
        "torch's own _rebuild_from_type_v2(func, type, args, state) calls func(*args): "
        "func is logging.FileHandler, args the marker, inside data.pkl",
    ),
    _pickle(
        "rebuild-from-type-v2-filehandler-pickle",
        "call",
        rebuild_from_type,
        "the same call in a plain pickle",
    ),
    _pickle(
        "copyreg-reconstructor-filehandler",
        "call",
        lambda m: (
            call(
                global_("copyreg", "_reconstructor"),
                global_("logging", "FileHandler"),
                global_("logging", "FileHandler"),
                text(str(m)),
            )
            + b"."
        ),
        "copyreg._reconstructor(cls, base, state) calls base.__init__(obj, state): "
        "FileHandler.__init__(marker)",
    ),
    _pickle(
        "reduce-filehandler",
        "call",
        lambda m: call(global_("logging", "FileHandler"), text(str(m))) + b".",
        "REDUCE of logging.FileHandler(marker): a stdlib class, on no gadget list",
    ),
    _pickle(
        "inst-filehandler",
        "call",
        lambda m: b"(" + text(str(m)) + b"ilogging\nFileHandler\n.",
        "INST (protocol 0's call of a class) of logging.FileHandler(marker)",
    ),
    _pickle(
        "obj-filehandler",
        "call",
        lambda m: b"(" + global_("logging", "FileHandler") + text(str(m)) + b"o.",
        "OBJ (protocol 1's call of a class) of logging.FileHandler(marker)",
    ),
    _pickle(
        "build-patches-torch-load-kwdefaults",
        "call",
        lambda m: (
            b"\x80\x02"
            + global_("torch.serialization", "load")
            + b"(N}(V__kwdefaults__\n}(Vweights_only\n\x89Vmmap\nNuutb."
        ),
        "BUILD on a function with a (None, {attr: value}) slot state sets its attributes: "
        "torch.load.__kwdefaults__ becomes weights_only=False for the rest of the process",
        patches="__kwdefaults__",
    ),
    _pickle(
        "randomstate-ctor-calls-numpy-function",
        "call",
        lambda m: (
            call(
                global_("numpy.random._pickle", "__randomstate_ctor"),
                text(str(m)),
                global_("numpy.lib.format", "open_memmap"),
            )
            + b"."
        ),
        "numpy's allowed RandomState constructor calls its 2nd argument with its 1st: "
        "numpy.lib.format.open_memmap, a third-party function, opens the marker",
    ),
    _pickle(
        "pydoc-pipepager",
        "call",
        lambda m: call(global_("pydoc", "pipepager"), text(""), text(touch(m))) + b".",
        "pydoc.pipepager(text, cmd) runs cmd through the shell (subprocess, shell=True)",
    ),
    _pickle(
        "imaplib-imap4-stream",
        "call",
        lambda m: call(global_("imaplib", "IMAP4_stream"), text(touch(m))) + b".",
        "imaplib.IMAP4_stream(command) starts the command through the shell to talk to it",
    ),
    _pickle(
        "uuid-get-command-stdout",
        "call",
        lambda m: call(global_("uuid", "_get_command_stdout"), text("touch"), text(str(m))) + b".",
        "uuid._get_command_stdout(cmd, *args) runs any program on PATH (uuid.UUID is "
        "allowed, so the module looks harmless)",
    ),
    _pickle(
        "logging-config-dictconfig",
        "call",
        lambda m: (
            call(
                global_("logging.config", "dictConfig"),
                b"(Vversion\nI1\nVhandlers\n(Vfile\n(Vclass\nVlogging.FileHandler\nVfilename\n"
                + text(str(m))
                + b"ddd",
            )
            + b"."
        ),
        "logging.config.dictConfig builds handlers (or any '()' factory) it names by string",
    ),
    _pickle(
        "codecs-open",
        "call",
        lambda m: call(global_("codecs", "open"), text(str(m)), text("w")) + b".",
        "codecs.open(path, 'w') creates any file; only builtins.open and io.open are listed",
    ),
    # -- code in data formats
    file_technique(
        "npy-descr-spelled-object",
        "code",
        "array.npy",
        lambda m: object_npy(plain(2) if m is None else shell2(m), "'object'"),
        NUMPY_PICKLE,
        False,
        "descr 'object' rather than '|O': numpy parses it to the object dtype and unpickles "
        "the data",
    ),
    file_technique(
        "npy-record-nested-object-field",
        "code",
        "array.npy",
        lambda m: object_npy(
            plain(2) if m is None else shell2(m), "[('a', '<f8'), ('b', [('c', '|O')])]"
        ),
        NUMPY_PICKLE,
        False,
        "a record dtype with an object field nested one level down: the array holds "
        "objects, so its data is a pickle",
    ),
    file_technique(
        "npy-pickle-after-plain-array",
        "code",
        "arrays.npy",
        lambda m: float_npy() + (plain(2) if m is None else shell2(m)),
        NUMPY_SECOND_LOAD,
        False,
        "a plain array, then a pickle: np.load reads the array, and np.load of the same "
        "handle again (arrays saved one after another) unpickles what follows",
    ),
    file_technique(
        "npy-version-3-header",
        "code",
        "array.npy",
        lambda m: object_npy(plain(2) if m is None else shell2(m), version=3),
        NUMPY_PICKLE,
        False,
        "format 3.0: a 4-byte header length and a UTF-8 header; a reader of 1.0's 2-byte "
        "length misplaces the data, an object array's pickle",
    ),
    file_technique(
        "torchscript-ops-aten-from-file",
        "code",
        "scripted.pt",
        _from_file("ops.aten.from_file"),
        TORCH_JIT,
        True,
        "__setstate__ (run by torch.jit.load) calls ops.aten.from_file, which a list of "
        "'torch.from_file' misses; it maps any file (shared=True writes to it)",
    ),
    file_technique(
        "torchscript-from-file-line-continuation",
        "code",
        "scripted.pt",
        _from_file("torch.\\\n      from_file"),
        TORCH_JIT,
        True,
        "torch.\\<newline> from_file(...): the TorchScript parser joins the lines",
    ),
    # -- folders
    Technique(
        "dir-link-into-blobs",
        "directory",
        lambda tmp, m: hub_cache(tmp, torch_zip(shell2(m))),
        lambda tmp: hub_cache(tmp, torch_zip()),
        SNAPSHOT_WEIGHTS,
        False,
        "a Hugging Face cache entry: snapshots/<rev>/pytorch_model.bin is a relative link to "
        "blobs/<sha256>, a file with no extension",
    ),
    Technique(
        "dir-link-outside",
        "directory",
        lambda tmp, m: outside_link(tmp, torch_zip(shell2(m))),
        lambda tmp: outside_link(tmp, torch_zip()),
        FOLDER_WEIGHTS,
        False,
        "pytorch_model.bin is a relative link out of the folder: a scan of the folder that "
        "skips links sees only config.json",
    ),
    *BYPASSES,  # a red-team audit's finds
    *REDTEAM3,  # a third audit's
)


MALFORMED: tuple[Malformed, ...] = (
    Malformed(
        "truncated-torch-zip",
        lambda tmp: write(tmp / "model.pt", torch_zip()[:700]),
        "a torch zip cut short: no central directory, no end record",
    ),
    Malformed(
        "zip-crc-mismatch",
        lambda tmp: write(tmp / "model.pt", crc_mismatch()),
        "data.pkl's CRC-32 (local and central) does not match its bytes",
    ),
    Malformed(
        "deflate-past-declared-size",
        lambda tmp: write(tmp / "model.pt", inflates_past_size()),
        "data.pkl inflates to 1 MiB more than the size its headers declare",
    ),
    Malformed(
        "tar-bad-checksum",
        lambda tmp: write(tmp / "model.pt", bad_tar_checksum()),
        "a torch 0.x tar whose first header checksum is off by one",
    ),
    Malformed(
        "npy-short-data",
        lambda tmp: write(tmp / "array.npy", npy("'<f8'", (1000,), bytes(16))),
        "the header promises 1000 float64 values, the file holds 2",
    ),
    Malformed(
        "safetensors-overlapping-offsets",
        lambda tmp: write(
            tmp / "model.safetensors",
            safetensors(
                '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
                '"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}',
                bytes(24),
            ),
        ),
        "two tensors whose byte ranges overlap",
    ),
    Malformed(
        "safetensors-header-past-eof",
        lambda tmp: write(
            tmp / "model.safetensors",
            safetensors(
                '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4), 1 << 20
            ),
        ),
        "the header length runs a megabyte past the end of the file",
    ),
    Malformed(
        "safetensors-size-mismatch",
        lambda tmp: write(
            tmp / "model.safetensors",
            safetensors('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}', bytes(8)),
        ),
        "a [4] float32 tensor given 8 bytes",
    ),
    Malformed(
        "gguf-tensor-count-past-eof",
        lambda tmp: write(tmp / "model.gguf", gguf_too_many_tensors()),
        "a million tensors announced in a 60-byte file",
    ),
    Malformed("empty-file", lambda tmp: write(tmp / "model.pt", b""), "zero bytes"),
    Malformed(
        "random-bytes",
        lambda tmp: write(tmp / "model.pt", b"\x00\x13" + random.Random(7).randbytes(4094)),
        "4 KiB of random bytes named model.pt",
    ),
    Malformed(
        "pickle-cut-mid-opcode",
        lambda tmp: write(tmp / "model.pkl", cut_mid_opcode()),
        "a protocol-4 pickle cut inside a BINFLOAT argument",
    ),
    Malformed(
        "zips-nested-too-deep",
        lambda tmp: write(tmp / "model.zip", nested_zips(64)),
        "a zip in a zip, 64 levels deep",
    ),
    Malformed(
        "legacy-stream-cut-after-magic",
        lambda tmp: write(tmp / "model.pt", legacy_cut_after_magic()),
        "torch's pre-zip stream cut after its first pickle (the magic number)",
    ),
)
