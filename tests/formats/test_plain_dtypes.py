"""The dtype spellings read without numpy say what numpy says of them, and scanning the
usual npz and joblib files leaves numpy unimported (a quarter of a second per process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest

from modelport import dtypes
from modelport.formats import _npy_header
from modelport.pickles import joblib_arrays


@pytest.mark.parametrize("descr", sorted(_npy_header._PLAIN))
def test_an_npy_spelling_reads_as_numpy_reads_it(descr: str) -> None:
    plain = _npy_header._PLAIN[descr]
    numpy_dtype = np.dtype(descr)
    assert (plain.kind, plain.itemsize) == (numpy_dtype.kind, numpy_dtype.itemsize)
    assert (plain.byteorder == ">") == (numpy_dtype.byteorder == ">")
    if plain.kind != "O":
        little = numpy_dtype.newbyteorder("<") if numpy_dtype.byteorder == ">" else numpy_dtype
        assert plain.name == dtypes.from_numpy(little)


def test_every_spelling_numpy_save_writes_for_a_plain_dtype_is_in_the_table() -> None:
    codes = "?bBhHiIlLqQefdFD"
    written = {np.lib.format.dtype_to_descr(np.dtype(code)) for code in codes}
    written |= {np.lib.format.dtype_to_descr(np.dtype(code).newbyteorder(">")) for code in codes}
    written.add(np.lib.format.dtype_to_descr(np.dtype(object)))
    assert written - set(_npy_header._PLAIN) == set()


@pytest.mark.parametrize("spec", sorted(joblib_arrays._PLAIN_SPECS))
def test_a_pickled_dtype_spelling_reads_as_numpy_reads_it(spec: str) -> None:
    kind, itemsize = joblib_arrays._PLAIN_SPECS[spec]
    assert (kind, itemsize) == (np.dtype(spec).kind, np.dtype(spec).itemsize)


def test_numpy_pickles_every_plain_dtype_with_a_spelling_in_the_table() -> None:
    for code in "?bBhHiIlLqQefdFDO":
        reduced = np.dtype(code).__reduce__()
        assert reduced[1][0] in joblib_arrays._PLAIN_SPECS, code


def test_scanning_an_npz_and_a_joblib_file_imports_no_numpy(tmp_path: Path) -> None:
    np.savez(tmp_path / "weights.npz", w=np.ones((3, 4), np.float32), b=np.arange(4))
    joblib.dump({"w": np.ones((8, 8)), "ids": np.arange(5, dtype=np.uint8)}, tmp_path / "m.joblib")
    probe = (
        "import sys\n"
        "from modelport import scan\n"
        f"folder = {str(tmp_path)!r}\n"
        "reports = [scan(f'{folder}/{name}') for name in ('weights.npz', 'm.joblib')]\n"
        "print([str(r.verdict) for r in reports], 'numpy' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["['safe',", "'safe']", "False"]
