"""``range`` in pickles: Python 2's ``xrange`` (as py2 pickles name it) and numpy object arrays
holding a range or the ``range`` type itself are plain data, and loading them with pickle or
numpy reaches nothing but numpy's reconstructors and ``builtins.range``."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

import modelport
from modelport.pickles.reading import read_pickle

# What Python 2.7 writes for ``pickle.dumps(xrange(1, 10, 2), 2)``: xrange's __reduce__ is
# (xrange, (start, stop, step)), named in the py2 module ``__builtin__``.
PY2_XRANGE = b"\x80\x02c__builtin__\nxrange\nq\x00K\x01K\nK\x02\x87q\x01Rq\x02."

# Loads a file under an audit hook that refuses every global but numpy's reconstructors and
# ``builtins.range``, and every exec, process, socket or open; prints what the file named.
_GUARDED_LOAD = r"""
import io, json, pickle, sys
import numpy as np

ALLOWED = {
    ("builtins", "range"),
    ("__builtin__", "xrange"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}
named = []
armed = False

def hook(event, args):
    if not armed:
        return
    if event == "pickle.find_class":
        named.append(list(args))
        if tuple(args) not in ALLOWED:
            raise RuntimeError(f"blocked {args}")
    elif event in ("open", "os.system", "subprocess.Popen", "socket.connect", "exec"):
        raise RuntimeError(f"blocked {event}")

sys.addaudithook(hook)
path = sys.argv[1]
raw = open(path, "rb").read()
armed = True
if path.endswith(".npy"):
    value = np.load(io.BytesIO(raw), allow_pickle=True).tolist()
else:
    value = pickle.loads(raw)
armed = False
print(json.dumps({"named": named, "value": repr(value)}))
"""


def _guarded_load(path: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _GUARDED_LOAD, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded: dict[str, object] = json.loads(done.stdout)
    return loaded


def test_py2_xrange_pickle_is_safe_and_reads_as_a_range(tmp_path: Path) -> None:
    pickletools.dis(PY2_XRANGE, out=io.StringIO())  # well-formed
    assert pickle.loads(PY2_XRANGE) == range(1, 10, 2)
    path = tmp_path / "xrange.pkl"
    path.write_bytes(PY2_XRANGE)

    report = modelport.scan(path)

    assert report.verdict == "safe", report.to_json()
    assert read_pickle(PY2_XRANGE).value == range(1, 10, 2)
    loaded = _guarded_load(path)
    assert loaded == {"named": [["__builtin__", "xrange"]], "value": "range(1, 10, 2)"}


def test_numpy_object_array_holding_range_is_safe(tmp_path: Path) -> None:
    array = np.empty(4, dtype=object)
    array[:] = [None, range, range(2, 7), "text"]
    path = tmp_path / "objects.npy"
    np.save(path, array, allow_pickle=True)

    report = modelport.scan(path)

    assert report.verdict == "safe", report.to_json()
    loaded = _guarded_load(path)
    assert {tuple(n) for n in loaded["named"]} <= {  # type: ignore[union-attr]
        ("builtins", "range"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
    }
    assert ["builtins", "range"] in loaded["named"]  # type: ignore[operator]
    assert loaded["value"] == repr(array.tolist())


def test_range_with_a_computed_argument_stays_a_record() -> None:
    """``range(x)`` runs ``x.__index__``: only ints are handed to the real constructor."""
    stop = struct.pack(">d", 1.0)
    value = read_pickle(b"\x80\x02c__builtin__\nxrange\nK\x00G" + stop + b"K\x01\x87R.").value
    assert not isinstance(value, range)
    assert value.args == (0, 1.0, 1)
