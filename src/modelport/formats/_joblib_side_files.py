"""The side files joblib < 0.10 kept next to a pickle, one per numpy array.

Layout (joblib/numpy_pickle_compat.py, which joblib still uses to load them):

- ``joblib.dump(value, "m.pkl")`` pickled each array as an ``NDArrayWrapper`` whose state is
  ``{filename, subclass, allow_mmap}``: ``filename`` (``m.pkl_01.npy``) is an ``.npy`` file
  in the pickle's folder, read as ``numpy.load`` reads it;
- with ``compress``, the pickle itself is a ``ZF`` file and each array a
  ``ZNDArrayWrapper`` whose state is ``{filename, init_args, state}``: ``init_args`` are
  ``numpy.core.multiarray._reconstruct``'s (the subclass, ``(0,)``, ``b"b"``), ``state`` is
  ``ndarray.__reduce__``'s ``(version, shape, dtype, is_fortran)``, and ``filename``
  (``m.pkl_01.npy.z``) holds the raw element bytes as a ``ZF`` file: ``ZF``, the decompressed
  length in hex padded to 19 characters (one more space from joblib <= 0.8.4 on Python 2),
  then one zlib stream; the bytes are in Fortran order when ``is_fortran`` says so.

A side-file name MUST be a plain name in the pickle's folder (no separator, no ``..``); any
other name, a missing file or an unreadable one leaves the array as a record, with a
warning. The compressed bytes are inflated only when the tensor is read, never past the
length the ``ZF`` header declares (nor the cap on compressed pickles).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from modelport.errors import CorruptFileError, ModelportError
from modelport.formats import npy
from modelport.formats._compressed import (
    ZF_LENGTH_CHARS,
    ZF_PREFIX,
    Compression,
    InflationCap,
    decompression_cap,
    inflate,
)
from modelport.formats.sniffing import identify
from modelport.pickles.numpy_types import NumpyArray, NumpyDType, tensor_from_raw
from modelport.pickles.records import ByteSpan
from modelport.tensors import NDArray, Storage, TensorRef, byte_array

ZF_HEADER_BYTES = len(ZF_PREFIX) + ZF_LENGTH_CHARS
SIDE_FILE_NAME = re.compile(r"^(.+)_\d{2,}\.npy(?:\.z)?$")  # "%s_%02i.npy" [+ ".z"]


def side_file_array(
    directory: Path | None, state: Any, warnings: list[str]
) -> TensorRef | NumpyArray | None:
    """The tensor an ``NDArrayWrapper`` or ``ZNDArrayWrapper`` state names (an object array
    as the ``.npy`` reader gives it), or None and a warning saying why when its side file
    cannot be read."""
    name = state.get("filename") if isinstance(state, dict) else None
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or ".." in name:
        warnings.append(f"joblib < 0.10 array with unsafe side-file name {name!r:.80}")
        return None
    side = directory / name if directory is not None else None
    if side is None or not side.is_file():
        warnings.append(f"joblib < 0.10 file: array stored in side file {name!r}, which is missing")
        return None
    try:
        if isinstance(state, dict) and "init_args" in state:
            return _zfile_array(side, state.get("state"))
        return _npy_array(side)
    except ModelportError as exc:
        warnings.append(f"joblib < 0.10 side file {name!r} unreadable: {exc}")
        return None


def _npy_array(side: Path) -> TensorRef | NumpyArray:
    reader, probe, _ = identify(side, (npy.READER,))
    tree = reader.contents(probe).tree
    if isinstance(tree, dict) and len(tree) == 1:  # the npy reader names its one array
        (tree,) = tree.values()
    if isinstance(tree, NumpyArray) and tree.tensor is None and tree.objects is not None:
        return tree  # joblib wrote object arrays with numpy.save too
    tree = tree.tensor if isinstance(tree, NumpyArray) else tree
    if not isinstance(tree, TensorRef):
        raise CorruptFileError("the side file holds no single array")
    return tree


def _zfile_array(side: Path, reduced: Any) -> TensorRef:
    """The array ``ndarray.__setstate__(reduced + (bytes of the z-file,))`` rebuilds."""
    if not isinstance(reduced, tuple) or len(reduced) != 4:
        raise CorruptFileError("the array state is not ndarray's (version, shape, dtype, order)")
    _, shape, dtype, fortran = reduced
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise CorruptFileError("the array shape is not a tuple of non-negative ints")
    resolved = dtype.resolve() if isinstance(dtype, NumpyDType) else None
    if resolved is None:
        raise CorruptFileError(f"its dtype {dtype!r:.60} is not a plain element type")
    declared = zfile_length(side)

    def read_bytes() -> NDArray:
        cap = InflationCap(decompression_cap())
        if declared < cap.size:  # the length its header declares is all it may inflate to
            cap = InflationCap(declared, "the length the ZF header declares: damaged")
        inflated = inflate(memoryview(side.read_bytes()), Compression.JOBLIB_ZF, cap, partial=False)
        if len(inflated) != declared:
            raise CorruptFileError(
                f"{side.name} inflates to {len(inflated)} bytes, its header says {declared}",
                path=side,
            )
        return byte_array(bytes(inflated))

    storage = Storage(side, 0, declared, key=side.name, reader=read_bytes)
    return tensor_from_raw(
        ByteSpan(0, declared), resolved, shape, fortran is True, lambda _: storage
    )


def side_file_owner(path: Path) -> Path | None:
    """The pickle beside ``path`` that joblib named it after (``m.pkl`` for
    ``m.pkl_01.npy.z``), when there is one."""
    match = SIDE_FILE_NAME.match(path.name)
    owner = path.with_name(match.group(1)) if match else None
    return owner if owner is not None and owner.is_file() else None


def zfile_length(path: Path) -> int:
    """The decompressed length a ``ZF`` file's header declares."""
    with open(path, "rb") as handle:
        header = handle.read(ZF_HEADER_BYTES)
    if not header.startswith(ZF_PREFIX):
        raise CorruptFileError("not a joblib ZF file", path=path)
    try:
        return int(header[len(ZF_PREFIX) :].decode("ascii").strip(), 16)
    except (UnicodeDecodeError, ValueError):
        raise CorruptFileError("joblib ZF header: length is not hexadecimal", path=path) from None
