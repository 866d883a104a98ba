"""What a damaged model file may do when modelport opens or scans it, judged by oracles that
are not modelport: the file's size and bytes as plain file I/O gives them, numpy's and
ml_dtypes' element types, Python's ``pickletools``, ``zipfile`` and ``zlib``.

The rule every mutation test applies (``assert_typed_error_or_whole``):

* opening the file and reading each of its tensors either raises a typed error (a
  ``modelport.errors.ModelportError`` of a kind that says the file cannot be read), or
* the file opens *whole*: every tensor stored flat lies inside its file (its storage and its
  extent in that storage, checked against the file's size before anything is read), reading
  it gives an array of exactly the declared shape and dtype, and that array holds the very
  bytes that plain file I/O finds at the declared place;
* when the file carries pickles and Python's own ``pickletools`` can no longer walk one of
  them to its STOP, ``modelport.scan`` never calls the file ``safe``: neither the scan's
  verdict nor the file's own report (nor ``inspect``'s safety section, when asked).
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import struct
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import event
from hypothesis import strategies as st

import modelport
from modelport.errors import (
    FormatError,
    LimitExceededError,
    ModelFileNotFoundError,
    ModelportError,
    UnsupportedDtypeError,
)
from modelport.tensors import TensorRef

TYPED_ERROR = "typed-error"
WHOLE = "whole"
# What a file that cannot be read may raise: its bytes are wrong, a declared size is past a
# limit, an element type has no array type, or a file it names is missing (a shard, external
# data). Never a usage or conversion error, and never the bare base class.
READ_ERRORS = (FormatError, LimitExceededError, UnsupportedDtypeError, ModelFileNotFoundError)

PickleOracle = Callable[[Path], "bool | None"]


@dataclass(frozen=True)
class Outcome:
    """What happened. ``opened``: ``TYPED_ERROR`` or ``WHOLE``; ``error``: the typed error;
    ``tensors``: how many tensors were read whole; ``pickles_parse``: the stdlib oracle's
    answer (None where none was given or it cannot tell); ``verdict``: the scan's verdict
    (None where no pickle oracle was given)."""

    opened: str
    error: ModelportError | None = None
    tensors: int = 0
    pickles_parse: bool | None = None
    verdict: str | None = None


def assert_typed_error_or_whole(
    path: Path,
    *,
    pickles: PickleOracle | None = None,
    inspect: bool = False,
    intact: bytes | None = None,
) -> Outcome:
    """Open ``path`` (a file or a directory), read every tensor, and assert the rule above;
    returns which outcome happened. ``pickles`` is one of this module's oracles, saying
    whether the file's pickles still parse; when given, the scan invariant is asserted as
    well. ``inspect`` also checks ``modelport.inspect`` (a typed error or a sound report).
    ``intact``: the undamaged file's bytes; a mutation that left them as they were must
    open whole."""
    root = path.resolve()
    error: ModelportError | None = None
    count = 0
    try:
        with modelport.open(path) as model:
            refs = dict(model.tensors)
            for name, ref in refs.items():  # the declared layout, before anything is read
                _assert_inside_its_file(name, ref, root)
            for name, ref in refs.items():
                _assert_reads_as_declared(name, ref)
                count += 1
    except ModelportError as exc:  # recorded, then asserted on below
        error = exc
    if error is not None:
        assert isinstance(error, READ_ERRORS), f"{type(error).__name__}: {error}"
        assert str(error).strip() != "", f"{type(error).__name__} without a message"
    if intact is not None and path.read_bytes() == intact:
        assert error is None, f"the undamaged file raised {error!r}"
    opened = TYPED_ERROR if error is not None else WHOLE
    event(f"open: {opened}" + (f" ({type(error).__name__})" if error is not None else ""))

    parses = None if pickles is None else pickles(path)
    verdict = None
    if pickles is not None:
        report = modelport.scan(path)
        verdict = report.verdict
        event(f"pickles parse: {parses}; scan: {verdict}")
        if parses is False:
            assert verdict != "safe", f"scanned safe, a pickle does not parse: {_shown(path)}"
            safe = [f.path for f in report.files if f.verdict == "safe"]
            if path.is_file():
                assert safe == [], f"{path.name}: file report safe: {report.to_json()}"
    if inspect:
        _assert_inspect_outcome(path, parses)
    return Outcome(opened, error, count, parses, verdict)


def _shown(path: Path) -> str:
    """A damaged file as a failure message shows it: enough to rebuild it from the seed."""
    if path.is_dir():
        return f"{path} ({', '.join(sorted(p.name for p in path.iterdir()))})"
    data = path.read_bytes()
    return f"{path.name}, {len(data)} bytes: {data[:120]!r}{'...' if len(data) > 120 else ''}"


def damage(data: st.DataObject, raw: bytes, *, flips: int = 4, keep: int = 0) -> bytes:
    """``raw`` with 1..``flips`` bytes set to random values (never the first ``keep``), then,
    one time in two, cut to a random length of at least one byte: uncut damage reaches the
    files that still open, where the whole-file checks apply."""
    changed = bytearray(raw)
    for _ in range(data.draw(st.integers(1, flips), label="flips")):
        changed[data.draw(st.integers(keep, len(changed) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans(), label="cut"):
        changed = changed[: data.draw(st.integers(1, len(changed)), label="length")]
    return bytes(changed)


# -- element types, independent of modelport's own table ---------------------------------------
_NUMPY_NAMES = {
    *("float64", "float32", "float16", "complex128", "complex64", "bool"),
    *("int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8"),
}
_ML_DTYPES_NAMES = {
    *("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"),
    *("float8_e4m3fnuz", "float8_e5m2fnuz"),
}
# Types numpy cannot hold (read with ``raw_bytes``): bytes per element.
_RAW_ITEMSIZE = {
    "complex32": 4,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
    "float4_e2m1fn_x2": 1,
}


def numpy_dtype(name: str) -> np.dtype[Any] | None:
    """numpy's dtype for an element type name; None for types numpy cannot hold."""
    if name in _NUMPY_NAMES:
        return np.dtype(name)
    if name in _ML_DTYPES_NAMES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return None


def stored_size(name: str, numel: int) -> tuple[int, int]:
    """(bytes per element, bytes of ``numel`` elements), by numpy, ml_dtypes or gguf-py's
    block sizes for GGML's quantized types."""
    found = numpy_dtype(name)
    if found is not None:
        return found.itemsize, numel * found.itemsize
    if name in _RAW_ITEMSIZE:
        return _RAW_ITEMSIZE[name], numel * _RAW_ITEMSIZE[name]
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    return 1, -(-numel // block) * size


# -- the whole-file checks -------------------------------------------------------------------
def _assert_inside_its_file(name: str, ref: TensorRef, root: Path) -> None:
    storage = ref.storage
    if storage is None or storage.reader is not None or storage.path is None:
        return  # a meta tensor, or bytes produced in memory (inflated, in a pickle)
    file = storage.path.resolve()
    assert file == root or root in file.parents, f"{name}: its bytes are in {file}"
    size = file.stat().st_size
    end = storage.offset + storage.nbytes
    assert storage.offset >= 0 and storage.nbytes >= 0, f"{name}: {storage}"
    assert storage.nbytes == 0 or end <= size, f"{name}: storage ends at {end} of {size} bytes"
    if ref.numel == 0:
        return  # no elements: nothing to place
    itemsize, nbytes = stored_size(ref.dtype, ref.numel)
    if ref.strides is None:
        first = ref.element_offset * itemsize
        last = first + nbytes
    else:
        assert len(ref.strides) == len(ref.shape), f"{name}: {ref.strides} for {ref.shape}"
        steps = [(n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=True)]
        first = (ref.element_offset + sum(s for s in steps if s < 0)) * itemsize
        last = (ref.element_offset + sum(s for s in steps if s > 0) + 1) * itemsize
    assert first >= 0, f"{name}: starts {-first} bytes before its storage"
    assert last <= storage.nbytes, f"{name}: reaches byte {last} of {storage.nbytes}"


def _assert_reads_as_declared(name: str, ref: TensorRef) -> None:
    if ref.storage is None:
        return  # saved without data (torch's meta tensors)
    expected = numpy_dtype(ref.dtype)
    if expected is None:
        flat = ref.raw_bytes()
        nbytes = stored_size(ref.dtype, ref.numel)[1]
        assert flat.dtype == np.uint8 and flat.shape == (nbytes,), f"{name}: {flat.shape}"
    else:
        array = ref.numpy()
        assert array.shape == ref.shape, f"{name}: read {array.shape}, declared {ref.shape}"
        assert array.dtype == expected, f"{name}: read {array.dtype}, declared {ref.dtype}"
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    if ref.storage.reader is None and ref.storage.path is not None and ref.numel > 0:
        assert flat.tobytes() == _bytes_at(ref), f"{name}: not the bytes at its place"


def _bytes_at(ref: TensorRef) -> bytes:
    """The tensor's elements in C order as plain file I/O finds them at the declared place."""
    storage = ref.storage
    assert storage is not None and storage.path is not None
    itemsize, nbytes = stored_size(ref.dtype, ref.numel)
    with open(storage.path, "rb") as handle:
        handle.seek(storage.offset)
        blob = handle.read(storage.nbytes)
    dtype = numpy_dtype(ref.dtype)
    if ref.strides is None or dtype is None:
        start = ref.element_offset * itemsize
        return blob[start : start + nbytes]
    elements = np.frombuffer(blob[: len(blob) - len(blob) % itemsize], dtype=dtype)
    strided = np.lib.stride_tricks.as_strided(
        elements[ref.element_offset :],
        shape=ref.shape,
        strides=tuple(s * itemsize for s in ref.strides),
        writeable=False,
    )
    return np.ascontiguousarray(strided).tobytes()


def _assert_inspect_outcome(path: Path, parses: bool | None) -> None:
    try:
        report = modelport.inspect(path)
    except ModelportError as exc:  # a typed error is an outcome; its kind is asserted
        assert isinstance(exc, READ_ERRORS), f"inspect: {type(exc).__name__}: {exc}"
        return
    document = json.loads(json.dumps(report.to_json()))
    assert document["size_bytes"] == path.stat().st_size
    assert document["tensor_count"] == len(document["tensors"])
    for summary in document["tensors"]:
        nbytes = stored_size(summary["dtype"], math.prod(summary["shape"]))[1]
        assert summary["nbytes"] == nbytes, summary
    if parses is False:
        assert document["safety"]["verdict"] != "safe", document["safety"]


# -- pickle oracles: Python's own pickletools, zipfile, zlib and numpy.lib.format ---------------
@dataclass(frozen=True)
class Walk:
    """Python's walk of one pickle. ``end``: just past its STOP, None when it has none or a
    GLOBAL, INST or PERSID names something by text CPython's unpickler refuses
    (``undecodable_name``: not UTF-8 for GLOBAL, not ASCII for the others); ``end_any_name``:
    the same, whatever the names' bytes; ``protocol``: the last PROTO's."""

    end: int | None
    end_any_name: int | None
    protocol: int = 0
    undecodable_name: bool = False


# Opcodes whose arguments are lines of text: how many, and how CPython's unpickler decodes them.
_NAMED_BY_LINES = {b"c": (2, "utf-8"), b"i": (2, "ascii"), b"P": (1, "ascii")}


def pickle_walk(data: bytes, start: int = 0) -> Walk:
    """``pickletools.genops`` from ``start`` to the STOP: an unknown opcode, a cut or malformed
    argument or a missing STOP end the walk without one. genops decodes the names of GLOBAL,
    INST and PERSID as escaped ASCII; the unpickler reads them raw, GLOBAL's as UTF-8, so
    those are read as the unpickler reads them and the walk goes on after them."""
    position, protocol, undecodable = start, 0, False
    while True:
        stream = io.BytesIO(data)
        stream.seek(position)
        try:
            with warnings.catch_warnings():  # an invalid escape: CPython warns and goes on
                warnings.simplefilter("ignore", DeprecationWarning)
                for opcode, arg, at in pickletools.genops(stream):
                    if opcode.name == "PROTO":
                        protocol = arg
                    if opcode.name == "STOP" and at is not None:
                        end = int(at) + 1
                        return Walk(None if undecodable else end, end, protocol, undecodable)
                    position = stream.tell()  # where the next opcode starts
            return Walk(None, None, protocol, undecodable)
        except ValueError:  # genops' way of saying "not a pickle"
            opcode_byte = data[position : position + 1]
            if opcode_byte not in _NAMED_BY_LINES:
                return Walk(None, None, protocol, undecodable)
        count, codec = _NAMED_BY_LINES[opcode_byte]
        lines = data[position + 1 :].split(b"\n", count)
        if len(lines) <= count:
            return Walk(None, None, protocol, undecodable)
        try:
            [line.decode(codec) for line in lines[:count]]
        except UnicodeDecodeError:
            undecodable = True
        position += 1 + sum(len(line) + 1 for line in lines[:count])


def pickle_end(data: bytes, start: int = 0) -> int | None:
    """The offset just past the STOP of the pickle at ``start`` by Python's walk; None when
    the walk cannot get there."""
    return pickle_walk(data, start).end


_OPCODES = frozenset(op.code.encode("latin-1") for op in pickletools.opcodes)


def pickle_parses(data: bytes, start: int = 0) -> bool | None:
    """Whether Python's walk gets from ``start`` to a STOP; None when there is no pickle there
    at all (no byte, or one that is no opcode: every unpickler stops at once, "invalid load
    key", so nothing is left to judge)."""
    if data[start : start + 1] not in _OPCODES:
        return None
    return pickle_end(data, start) is not None


def plain_pickle_parses(path: Path) -> bool | None:
    """A pickle file, or a zlib stream of one (``zlib.compress``'s header byte 0x78)."""
    data = path.read_bytes()
    if data[:1] == b"\x78":
        try:
            data = zlib.decompress(data)
        except zlib.error:
            return False
    return pickle_parses(data)


TORCH_MAGIC = 0x1950A86A20F9469CFC6C


def legacy_torch_pickles_parse(path: Path) -> bool | None:
    """torch's pre-1.6 stream as ``torch.load`` reads it: a magic-number pickle and, only when
    it holds the magic, four more (protocol, sys_info, the objects, the storage keys)."""
    data = path.read_bytes()
    end = pickle_end(data)
    if end is None:
        return pickle_parses(data)  # False, or None when not even its first byte is a pickle's
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data[:end])]
    if ops != [("PROTO", 2), ("LONG1", TORCH_MAGIC), ("STOP", None)]:
        return True  # torch.load stops at a wrong magic number: it read one pickle, whole
    for _ in range(4):
        following = pickle_end(data, end)
        if following is None:
            return False
        end = following
    return True


_ZIP_ERRORS = (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError)


def zip_pickles(raw: bytes) -> list[bytes | None] | None:
    """Every pickle in a zip whose directory ``zipfile`` reads: ``*.pkl`` and ``*debug_pkl``
    members, the data of ``.npy`` members holding object arrays, and those of zips stored in
    members; None for a pickle whose bytes cannot be had (see ``member_bytes``). The whole
    answer is None when ``zipfile`` cannot read the archive's directory."""
    try:
        infos = zipfile.ZipFile(io.BytesIO(raw)).infolist()
    except _ZIP_ERRORS:
        return None
    found: list[bytes | None] = []
    for info in infos:
        body = member_bytes(raw, info)
        if info.filename.endswith((".pkl", "debug_pkl")):
            found.append(body)
        elif body is not None and body.startswith(b"PK\x03\x04"):
            found.extend(zip_pickles(body) or [])
        elif body is not None and body.startswith(b"\x93NUMPY"):
            found.extend(_npy_object_pickle(body))
    return found


def member_bytes(raw: bytes, info: zipfile.ZipInfo) -> bytes | None:
    """A member's bytes as ``zipfile`` reads them (the local header its directory points at,
    then ``file_size`` bytes, inflated by zlib if deflated), except that the CRC is not
    checked: a damaged CRC says nothing of whether the pickle parses. None where ``zipfile``
    could not read them either: no local header, data cut short, a broken deflate stream."""
    header = raw[info.header_offset : info.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        return None
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_length + extra_length
    body = raw[start : start + info.compress_size]
    if len(body) < info.compress_size:
        return None
    if info.compress_type == zipfile.ZIP_DEFLATED:
        inflater = zlib.decompressobj(-15)
        try:
            body = inflater.decompress(body, info.file_size)
        except zlib.error:
            return None
    elif info.compress_type != zipfile.ZIP_STORED:
        return None
    return body[: info.file_size] if len(body) >= info.file_size else None


def zip_pickles_parse(path: Path) -> bool | None:
    """Every pickle of a zip archive (torch, TorchScript, ``.pt2``, ``.npz``) parses; None
    when ``zipfile`` cannot read the archive, so that nothing is known of its pickles."""
    return _all_parse(zip_pickles(path.read_bytes()))


def _all_parse(pickles: list[bytes | None] | None) -> bool | None:
    """False when one of the pickles does not parse (or its bytes cannot be had); None when
    nothing is known (no list) or one is no pickle at all; else True."""
    if pickles is None:
        return None
    return _combine([False if body is None else pickle_parses(body) for body in pickles])


def _combine(answers: list[bool | None]) -> bool | None:
    if False in answers:
        return False
    return None if None in answers else True


def _npy_object_pickle(data: bytes) -> list[bytes | None]:
    """The pickle numpy writes after an ``.npy`` header whose dtype is object, as a one-item
    list; [] for any other array and for headers numpy's own parser refuses."""
    from numpy.lib import format as npy

    handle = io.BytesIO(data)
    try:
        version = npy.read_magic(handle)
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}[version]
        _, _, dtype = read(handle)
    except (ValueError, KeyError, SyntaxError, EOFError, TypeError, tokenize.TokenError):
        return []  # numpy refuses the header: it holds no pickle numpy would read
    return [handle.read()] if dtype.hasobject else []


def npy_pickle_parses(path: Path) -> bool | None:
    """An ``.npy`` file: the pickle of an object array parses; None for other arrays."""
    return _all_parse(_npy_object_pickle(path.read_bytes()) or None)


def dcp_pickles_parse(segments: list[tuple[int, int]]) -> PickleOracle:
    """A DCP directory: ``.metadata`` is a pickle, and each item of ``__0_0.distcp`` (at the
    byte ranges the *unmutated* metadata gives, passed in) is a torch zip."""

    def oracle(directory: Path) -> bool | None:
        data = (directory / "__0_0.distcp").read_bytes()
        answers = [_all_parse(zip_pickles(data[at : at + size])) for at, size in segments]
        return _combine([pickle_parses((directory / ".metadata").read_bytes()), *answers])

    return oracle


@dataclass(frozen=True)
class JoblibLayout:
    """Where a joblib file's pickle is interrupted, found in the unmutated file: the raw bytes
    of a numeric array (a padding-length byte, its padding, the elements) and the complete
    pickle joblib writes in-band for an object array."""

    seed: bytes
    raw: tuple[int, int]
    nested: tuple[int, int]


def joblib_layout(seed: bytes, raw_nbytes: int) -> JoblibLayout:
    """The layout of a joblib dump holding one numeric array (``raw_nbytes`` of elements)
    followed by one object array."""
    raw_start = _genops_stops_at(seed, 0)
    raw_end = raw_start + 1 + seed[raw_start] + raw_nbytes
    stream = io.BytesIO(seed)
    stream.seek(raw_end)
    nested_start = next(
        pos for op, _, pos in pickletools.genops(stream) if op.name == "PROTO" and pos > raw_end
    )
    nested_end = pickle_end(seed, nested_start)
    assert nested_end is not None
    return JoblibLayout(seed, (raw_start, raw_end), (nested_start, nested_end))


def _genops_stops_at(data: bytes, start: int) -> int:
    stream = io.BytesIO(data)
    stream.seek(start)
    position = start
    try:
        for op, _, pos in pickletools.genops(stream):
            assert op.name != "STOP", "the seed is a plain pickle"
            position = pos
    except ValueError:
        return position + 1
    raise AssertionError("the seed's pickle never stops")


def joblib_pickles_parse(layout: JoblibLayout) -> PickleOracle:
    """joblib's stream: the outer pickle around the raw array, then the in-band pickle of the
    object array, then the outer pickle's end. Only exact where the layout is known: None
    when a byte changed outside the array's elements and the in-band pickle (elsewhere a
    change can move where joblib reads, and genops alone cannot tell where)."""

    def oracle(path: Path) -> bool | None:
        data = path.read_bytes()
        (raw_start, raw_end), (nested_start, nested_end) = layout.raw, layout.nested
        changed = [i for i, (a, b) in enumerate(zip(data, layout.seed, strict=False)) if a != b]
        if any(not (raw_start < i < raw_end or nested_start <= i < nested_end) for i in changed):
            return None  # the padding-length byte or the outer pickle changed
        if len(data) < nested_start:
            return False  # cut before the outer pickle reached its end
        end = pickle_end(data, nested_start)
        if end is None:
            return False
        outer = data[:raw_start] + data[raw_end:nested_start] + data[end:]
        return pickle_end(outer) is not None

    return oracle
