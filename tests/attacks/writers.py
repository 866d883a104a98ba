"""Byte-level writers for the attack corpus: pickle opcodes, zip and tar archives, numpy,
joblib, torch (zip, legacy stream, legacy tar, export, TorchScript) and folders.

Archives are written member by member with ``zipfile`` and tar headers packed by hand, so
every field is the one the corpus means; torch, h5py and joblib write only the benign files
whose own layout the attacks start from. Nothing here touches the disk except ``write``,
``hub_cache`` and ``outside_link``, which write inside the folder they are given.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import lzma
import os
import pickle
import pickletools
import shlex
import struct
import zipfile
import zlib
from pathlib import Path

import torch

# -- pickle opcodes --------------------------------------------------------------------------------


def text(value: str) -> bytes:
    """UNICODE (protocol 0): the text up to a newline."""
    assert "\n" not in value and "\\" not in value, value
    return b"V" + value.encode("raw-unicode-escape") + b"\n"


def global_(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def call(function: bytes, *args: bytes) -> bytes:
    """MARK args TUPLE REDUCE: ``function(*args)``."""
    return function + b"(" + b"".join(args) + b"tR"


def touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def shell(marker: Path) -> bytes:
    """``os.system("touch MARKER")`` in protocol 0: the best-known gadget of all."""
    return call(global_("os", "system"), text(touch(marker))) + b"."


def shell1(marker: Path) -> bytes:
    """The same call in protocol 1: binary opcodes (BINUNICODE), no PROTO, no 0x80."""
    command = touch(marker).encode()
    argument = b"X" + struct.pack("<I", len(command)) + command
    return call(global_("os", "system"), argument) + b"."


def shell2(marker: Path) -> bytes:
    return b"\x80\x02" + shell(marker)


def plain(protocol: int = 2) -> bytes:
    return pickle.dumps({"weight": [0.5, 1.5], "step": 3}, protocol=protocol)


def _pickles(raw: bytes, count: int) -> tuple[list[bytes], bytes]:
    """The first ``count`` pickles of a stream, and what follows them."""
    stream, found = io.BytesIO(raw), []
    for _ in range(count):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        found.append(raw[start : stream.tell()])
    return found, raw[stream.tell() :]


# -- zip archives ----------------------------------------------------------------------------------


def _members(raw: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def zip_archive(
    members: list[tuple[str, bytes]],
    *,
    deflated: tuple[str, ...] = (),
    prefix: bytes = b"",
) -> bytes:
    """Members in order, stored unless their name ends with one in ``deflated``; offsets
    count from the start of the file, ``prefix`` included."""
    out = io.BytesIO()
    out.write(prefix)
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members:
            method = zipfile.ZIP_DEFLATED if name.endswith(deflated) else zipfile.ZIP_STORED
            archive.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data, method)
    return out.getvalue()


def _replace(members: list[tuple[str, bytes]], suffix: str, data: bytes) -> list[tuple[str, bytes]]:
    assert any(name.endswith(suffix) for name, _ in members), suffix
    return [(name, data if name.endswith(suffix) else old) for name, old in members]


def _torch_save(obj: object = None, *, legacy: bool = False) -> bytes:
    """torch.save of ``obj`` (a small state_dict by default); ``legacy``: the pre-zip stream."""
    out = io.BytesIO()
    state = {"weight": torch.arange(4, dtype=torch.float32)} if obj is None else obj
    torch.save(state, out, _use_new_zipfile_serialization=not legacy)
    return out.getvalue()


def torch_zip(data_pkl: bytes | None = None, *, deflated: tuple[str, ...] = ()) -> bytes:
    """torch.save of a small state_dict, its data.pkl replaced when given."""
    members = _members(_torch_save())
    if data_pkl is not None:
        members = _replace(members, "/data.pkl", data_pkl)
    return zip_archive(members, deflated=deflated)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- tar archives: headers packed by hand ----------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def _tar_header(name: bytes, size: int, *, ustar: bool) -> bytearray:
    """A regular file's 512-byte header; V7 (no magic, as torch 0.1-0.3 wrote) unless
    ``ustar``. The checksum is left to ``_sealed``."""
    header = bytearray(512)
    header[0:100] = name.ljust(100, b"\x00")
    header[100:108] = _octal(0o644, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(1_500_000_000, 12)
    header[156:157] = b"0"
    if ustar:
        header[257:265] = b"ustar\x0000"
        header[265:269] = b"root"
        header[297:301] = b"root"
    return header


def _sealed(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def tar_archive(
    members: list[tuple[bytes, bytes]], *, ustar: bool = False, first: bytes = b""
) -> bytes:
    """Members in order after ``first`` (a ready header and its data), then the end blocks."""
    out = bytearray(first)
    for name, data in members:
        out += _sealed(_tar_header(name, len(data), ustar=ustar))
        out += data + b"\x00" * (-len(data) % 512)
    return bytes(out + b"\x00" * 1024)


_VALUES = struct.pack("<q2f", 2, 0.5, 1.5)  # a storage: its element count, then its bytes


def legacy_tar_members(
    object_pickle: bytes | None = None, storage_count: bytes | None = None
) -> list[tuple[bytes, bytes]]:
    """torch 0.1-0.3's tar layout (torch/serialization.py ``legacy_load``): ``storages``
    (a count, then per storage a pickled (key, location, type) and its raw bytes, then the
    views), ``tensors`` (a count, then per tensor a pickled (key, storage, type) and its
    geometry), ``pickle`` (the object, tensors by persistent id), ``sys_info``. Given
    ``storage_count``, the storages member is all protocol 0 and starts with it."""
    if storage_count is None:
        storages = b"\x80\x02K\x01.\x80\x02(K\x00Vcpu\nctorch\nFloatStorage\nt." + _VALUES
        storages += b"\x80\x02]."
    else:
        storages = storage_count + b"(I0\nVcpu\nctorch\nFloatStorage\nt." + _VALUES + b"(l."
    tensors = (
        b"\x80\x02K\x01.\x80\x02(K\x01K\x00ctorch\nFloatTensor\nt."
        + struct.pack("<ii", 1, 0)  # dimensions, then 4 bytes torch skips
        + struct.pack("<qqq", 2, 1, 0)  # size, stride, storage offset
    )
    sys_info = b"\x80\x02}(Vprotocol_version\nM\xe8\x03Vlittle_endian\n\x88u."
    return [
        (b"sys_info", sys_info),
        (b"storages", storages),
        (b"tensors", tensors),
        (b"pickle", b"\x80\x02}(Vweight\nP1\nu." if object_pickle is None else object_pickle),
    ]


def _pickle_in_tar_header(head: bytes, tail: bytes, size: int) -> bytes:
    """A valid header whose first bytes are also a pickle: ``head`` in the name field, a
    SHORT_BINBYTES that swallows mode..typeflag (bytes 100-156), POP, then ``tail`` in
    linkname, magic and owner names (bytes 157-328, which tar reads only as text)."""
    start = len(head) + 2
    assert start < 100 and len(tail) + 1 <= 329 - 157, "payload does not fit the header"
    header = _tar_header(b"", size, ustar=False)
    header[0:start] = head + b"C" + bytes([157 - start])
    header[157 : 158 + len(tail)] = b"0" + tail
    return _sealed(header)


def tar_pickle_polyglot(header: tuple[bytes, bytes], member_pickle: bytes | None) -> bytes:
    """A torch 0.1-0.3 tar whose first header is also a pickle (see above)."""
    readme = b"weights for a tiny model\n"
    first = _pickle_in_tar_header(*header, len(readme))
    first += readme + b"\x00" * (-len(readme) % 512)
    return tar_archive(legacy_tar_members(member_pickle), first=first)


def header_shell(marker: Path) -> tuple[bytes, bytes]:
    return global_("os", "system"), b"(" + text(touch(marker)) + b"tR."


HEADER_BENIGN = (b"(Vweight\nF0.5\n", b"d.")  # {"weight": 0.5}


# -- numpy files -----------------------------------------------------------------------------------


def npy(descr: str, shape: tuple[int, ...], body: bytes, *, version: int = 1) -> bytes:
    """Magic, version, header length (2 bytes in format 1.0, 4 from 2.0 on), the header dict
    padded to a multiple of 64, then the data."""
    length = "<H" if version == 1 else "<I"
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * (-(8 + struct.calcsize(length) + len(header) + 1) % 64) + "\n"
    encoded = header.encode("latin1" if version < 3 else "utf-8")
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack(length, len(encoded)) + encoded + body


def float_npy() -> bytes:
    return npy("'<f8'", (2,), struct.pack("<2d", 0.5, 1.5))


def object_npy(payload: bytes, descr: str = "'|O'", *, version: int = 1) -> bytes:
    """An object array: numpy unpickles whatever follows the header."""
    return npy(descr, (2,), payload, version=version)


def eocd_count(raw: bytes, count: int) -> bytes:
    """The End Of Central Directory record (no comment) rewritten to claim ``count`` entries."""
    assert raw[-22:-18] == b"PK\x05\x06"
    return raw[:-22] + raw[-22:-14] + struct.pack("<HH", count, count) + raw[-10:]


# -- joblib ----------------------------------------------------------------------------------------


_F8_STATE = b"(K\x03V<\nNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"


def dtype(spec: str, state: bytes = _F8_STATE) -> bytes:
    return call(global_("numpy", "dtype"), text(spec), b"\x89\x88") + state


# numpy's own pickle of dtype([('a', '<f8'), ('b', '<f8')]): 'V16' sized by its state
RECORD_DTYPE = dtype(
    "V16",
    b"(K\x03V|\nN(Va\nVb\nt(Va\n("
    + dtype("f8")
    + b"K\x00tVb\n("
    + dtype("f8")
    + b"K\x08tdK\x10K\x01K\x10tb",
)


def joblib_stream(
    array_dtype: bytes,
    shape: bytes,
    nbytes: int,
    tail: bytes,
    *,
    order: str = "C",
    padding: int | None = None,
) -> bytes:
    """joblib's layout (joblib/numpy_pickle.py): a NumpyArrayWrapper built with its state,
    then the array's raw bytes in the stream right after BUILD (after one padding-length
    byte and the padding when the state has numpy_array_alignment_bytes), then the rest of
    the pickle. Every data and padding byte is ``.`` (STOP): a reader that skips the wrong
    number of bytes lands on one and stops, before ``tail``."""
    state = (
        b"}(Vsubclass\n"
        + global_("numpy", "ndarray")
        + b"Vshape\n"
        + shape
        + b"Vorder\n"
        + text(order)
        + b"Vdtype\n"
        + array_dtype
        + b"Vallow_mmap\n\x89"
        + (b"" if padding is None else b"Vnumpy_array_alignment_bytes\nK\x10")
        + b"ub"
    )
    wrapper = b"\x80\x02" + global_("joblib.numpy_pickle", "NumpyArrayWrapper") + b")\x81"
    aligned = b"" if padding is None else bytes([padding]) + b"." * padding
    return wrapper + state + aligned + b"." * nbytes + tail


OBJECT_DTYPE = dtype("O8", b"(K\x03V|\nNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb")


def object_array_pickle() -> bytes:
    """numpy's own pickle of a small object array (plain values)."""
    import numpy as np

    return pickle.dumps(np.array([0.5, "label"], dtype=object), protocol=2)


def lzma_alone(data: bytes) -> bytes:
    """The .lzma ("alone") container joblib detects by its first bytes and inflates."""
    return lzma.compress(data, format=lzma.FORMAT_ALONE)


def joblib_zfile(data: bytes) -> bytes:
    """joblib's format before 0.9.3 (joblib/numpy_pickle_compat.py ``write_zfile``): "ZF",
    the pickle's length in hex padded to 19 characters, then the pickle zlib-compressed."""
    return b"ZF" + f"{len(data):#x}".ljust(19).encode() + zlib.compress(data)


# -- torch.export and TorchScript ------------------------------------------------------------------


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


class _Stateful(torch.nn.Module):
    """A scripted module with ``__setstate__``: torch.jit.load runs it while loading."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.ones(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.training = state[1]


@functools.cache
def _exported() -> tuple[tuple[str, bytes], ...]:
    """torch.export.save of a tiny module, as members (export takes seconds: done once)."""
    out = io.BytesIO()
    torch.export.save(torch.export.export(_Linear(), (torch.ones(1, 2),)), out)
    return tuple(_members(out.getvalue()))


@functools.cache
def _scripted() -> tuple[tuple[str, bytes], ...]:
    out = io.BytesIO()
    torch.jit.save(torch.jit.script(_Stateful()), out)
    return tuple(_members(out.getvalue()))


def pt2(
    *,
    replace: tuple[tuple[str, bytes], ...] = (),
    add: tuple[tuple[str, bytes], ...] = (),
    deflated: tuple[str, ...] = (),
    prefix: bytes = b"",
) -> bytes:
    members = list(_exported())
    for suffix, data in replace:
        members = _replace(members, suffix, data)
    root = members[0][0].split("/")[0]
    members += [(f"{root}/{name}", data) for name, data in add]
    return zip_archive(members, deflated=deflated, prefix=prefix)


def pt2_state_dict() -> bytes:
    module = _Linear()
    return _torch_save({f"linear.{k}": v for k, v in module.linear.named_parameters()})


def pickled_weight(weight: bytes) -> bytes:
    """weight_0 marked ``use_pickle`` in the weights config, as torch.export.save marks
    tensor subclasses: torch.export.load reads it with torch.load(weights_only=False)."""
    members = dict(_exported())
    name = next(n for n in members if n.endswith("_weights_config.json"))
    config = json.loads(members[name])
    entry = next(e for e in config["config"].values() if e["path_name"] == "weight_0")
    entry["use_pickle"] = True
    return pt2(
        replace=(
            (name.partition("/")[2], json.dumps(config).encode()),
            ("/data/weights/weight_0", weight),
        )
    )


def pt2_parameter() -> bytes:
    return _torch_save(torch.nn.Parameter(torch.ones(2, 2)))


def opaque_constant(data: bytes) -> bytes:
    config = (
        '{"config": {"note": {"path_name": "opaque_obj_0", "is_param": false, '
        '"use_pickle": true, "tensor_meta": null}}}'
    )
    return pt2(
        replace=(("/model_constants_config.json", config.encode()),),
        add=(("data/constants/opaque_obj_0", data),),
    )


def torchscript(payload_line: str | None) -> bytes:
    """The scripted module, its ``__setstate__`` first line replaced when given."""
    members = list(_scripted())
    line = "    self.weight = (state)[0]\n"
    for index, (name, data) in enumerate(members):
        code = data.decode("utf-8", "replace")
        if name.endswith(".py") and "def __setstate__" in code and payload_line is not None:
            assert line in code, code
            members[index] = (name, code.replace(line, payload_line).encode())
    return zip_archive(members)


# -- folders ---------------------------------------------------------------------------------------


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def hub_cache(tmp: Path, weights: bytes) -> Path:
    """A Hugging Face cache entry: snapshot files are relative links to content-named
    blobs in a sibling folder."""
    repo = tmp / "models--org--tiny"
    config = b'{"model_type": "tiny"}'
    for name, data in (("pytorch_model.bin", weights), ("config.json", config)):
        blob = write(repo / "blobs" / hashlib.sha256(data).hexdigest(), data)
        _link(repo / "snapshots" / "0123abcd" / name, blob)
    return repo


def outside_link(tmp: Path, weights: bytes) -> Path:
    folder = tmp / "model"
    write(folder / "config.json", b'{"model_type": "tiny"}')
    _link(folder / "pytorch_model.bin", write(tmp / "shared" / "weights.bin", weights))
    return folder


# -- whole files -----------------------------------------------------------------------------------


def legacy_stream(index: int, marker: Path | None) -> bytes:
    """torch's pre-zip stream (magic, protocol, sys_info, object, storage keys, then the
    storages' bytes) with pickle ``index`` replaced by the shell."""
    parts, rest = _pickles(_torch_save(legacy=True), 5)
    if marker is not None:
        parts[index] = shell2(marker)
    return b"".join(parts) + rest


def hdf5(userblock: bytes) -> bytes:
    import h5py
    import numpy as np

    out = io.BytesIO()
    with h5py.File(out, "w", userblock_size=512) as f:
        f["weight"] = np.arange(4, dtype=np.float32)
    assert len(userblock) <= 512
    return userblock + out.getvalue()[len(userblock) :]


def local_size_lie(raw: bytes, suffix: str) -> bytes:
    """The member's local header claims 0 bytes; the central directory keeps the truth."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    patched = bytearray(raw)
    assert patched[info.header_offset : info.header_offset + 4] == b"PK\x03\x04"
    patched[info.header_offset + 18 : info.header_offset + 26] = bytes(8)
    return bytes(patched)


def hidden_local_header(hidden: bytes | None) -> bytes:
    """A torch zip with a member ``.data/padding`` whose bytes are a second local header
    for data.pkl, holding ``hidden``; the central directory points data.pkl there. Readers
    that walk local headers see the first, benign data.pkl and opaque padding; torch reads
    by the central directory. With ``hidden`` None, the padding is plain bytes."""
    members = _members(_torch_save())
    name = next(n for n, _ in members if n.endswith("/data.pkl"))
    record, info = b"\x00" * 64, None
    if hidden is not None:
        solo = zip_archive([(name, hidden)])
        with zipfile.ZipFile(io.BytesIO(solo)) as archive:
            info = archive.infolist()[0]
        record = solo[: 30 + len(name) + info.compress_size]
    padding = name.rpartition("/")[0] + "/.data/padding"
    raw = zip_archive([*members, (padding, record)])
    if info is None:
        return raw
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        pad = archive.getinfo(padding)
    hidden_at = pad.header_offset + 30 + len(padding)
    patched = bytearray(raw)
    central = raw.rindex(name.encode()) - 46  # data.pkl's central directory entry
    assert raw[central : central + 4] == b"PK\x01\x02"
    patched[central + 16 : central + 28] = struct.pack(
        "<III", info.CRC, info.compress_size, info.file_size
    )
    patched[central + 42 : central + 46] = struct.pack("<I", hidden_at)
    return bytes(patched)


def rebuild_from_type(marker: Path) -> bytes:
    """torch._tensor._rebuild_from_type_v2(FileHandler, Tensor, (marker,), {})."""
    return (
        b"\x80\x02"
        + call(
            global_("torch._tensor", "_rebuild_from_type_v2"),
            global_("logging", "FileHandler"),
            global_("torch", "Tensor"),
            b"(" + text(str(marker)) + b"t",
            b"}",
        )
        + b"."
    )


# -- malformed files -------------------------------------------------------------------------------


def crc_mismatch() -> bytes:
    raw = torch_zip()
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    wrong = struct.pack("<I", info.CRC ^ 0xFFFF)
    patched = bytearray(raw)
    patched[info.header_offset + 14 : info.header_offset + 18] = wrong
    central = raw.rindex(info.filename.encode()) - 46  # the central entry's name
    assert raw[central : central + 4] == b"PK\x01\x02"
    patched[central + 16 : central + 20] = wrong
    return bytes(patched)


def inflates_past_size() -> bytes:
    """data.pkl deflated from a pickle plus 1 MiB, declared as the pickle's size only."""
    body = plain(2)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = packer.compress(body + bytes(1 << 20)) + packer.flush()
    raw = zip_archive([("archive/data.pkl", body)], deflated=("data.pkl",))
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = archive.infolist()[0]
    local = bytearray(raw[: info.header_offset + 30 + len(info.filename)])
    local[18:22] = struct.pack("<I", len(stream))
    start = len(local)
    central = bytearray(raw[start + info.compress_size :])
    central[20:24] = struct.pack("<I", len(stream))
    eocd = central.rindex(b"PK\x05\x06")
    central[eocd + 16 : eocd + 20] = struct.pack("<I", start + len(stream))
    return bytes(local) + stream + bytes(central)


def bad_tar_checksum() -> bytes:
    raw = bytearray(tar_archive(legacy_tar_members()))
    raw[148:154] = b"%06o" % ((int(raw[148:154], 8) + 1) % 0o777777)
    return bytes(raw)


def safetensors(header: str, data: bytes, length: int | None = None) -> bytes:
    encoded = header.encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def gguf_too_many_tensors() -> bytes:
    """GGUF v3: magic, version, tensor count, metadata count; the count promises a million
    tensor infos in a file that ends after one key."""
    key = b"general.architecture"
    value = b"llama"
    return (
        b"GGUF"
        + struct.pack("<IQQ", 3, 1_000_000, 1)
        + struct.pack("<Q", len(key))
        + key
        + struct.pack("<IQ", 8, len(value))
        + value
    )


def cut_mid_opcode() -> bytes:
    raw = pickle.dumps({"weight": [0.5] * 8}, protocol=4)
    position = next(p for op, _, p in pickletools.genops(raw) if op.name == "BINFLOAT")
    assert position is not None
    return raw[: position + 4]  # inside the 8-byte float


def nested_zips(depth: int) -> bytes:
    inner = plain(2)
    name = "archive/data.pkl"
    for level in range(depth):
        inner = zip_archive([(name, inner)])
        name = f"level{level}.zip"
    return inner


def legacy_cut_after_magic() -> bytes:
    parts, _ = _pickles(_torch_save(legacy=True), 1)
    return parts[0]
