"""Files of many tensors read as the reference reads them, and their errors name the cap.

The headers are written byte by byte (``struct`` + ``json``), as ``save_file`` would lay
them out, since the reference writer is slow at these counts; the reference reader is the
oracle."""

from __future__ import annotations

import ast
import io
import json
import struct
from pathlib import Path

import pytest

import modelport
from modelport import limits
from modelport.cli import cmd_inspect
from modelport.cli._output import json_default
from modelport.errors import CorruptFileError, LimitExceededError, ModelportError
from modelport.formats import _npy_header
from modelport.formats import safetensors as safetensors_format
from modelport.formats._zip import ZipDirectory
from modelport.loading.inspect_report import InspectReport, TensorSummary

MANY = 100_000


@pytest.fixture(params=["whole", "streamed"])
def either_reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small header is parsed whole: "streamed" reads it entry by entry, as a large one is,
    so that both readings are held to what ``json.loads`` gives."""
    if request.param == "streamed":
        monkeypatch.setattr(safetensors_format, "STREAMED_FROM", 0)


def _write(path: Path, header: str, data: bytes) -> Path:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _many(path: Path, count: int) -> Path:
    entries = ",".join(
        f'"w.{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(count)
    )
    return _write(path, "{" + entries + "}", struct.pack("<f", 1.5) * count)


def test_a_hundred_thousand_tensors_as_safe_open_lists_them(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    path = _many(tmp_path / "many.safetensors", MANY)
    with safetensors.safe_open(str(path), framework="np") as reference:
        keys = set(reference.keys())
        some = reference.get_tensor("w.77777")
    report = modelport.inspect(path)
    assert {t.name for t in report.tensors} == keys
    assert [t.name for t in report.tensors[:3]] == ["w.0", "w.1", "w.2"]
    assert report.parameters == MANY
    assert report.bytes_by_dtype == {"float32": 4 * MANY}
    assert report.aliases == ()
    with modelport.open(path) as model:
        assert model.get_tensor("w.77777").tolist() == some.tolist()


@pytest.mark.usefixtures("either_reading")
def test_spaced_and_reordered_entries_read_as_json_reads_them(tmp_path: Path) -> None:
    """Entries laid out otherwise than writers lay them out (spaces, fields in another
    order, escapes in a name, bytes listed out of order) give what ``json.loads`` gives."""
    safetensors = pytest.importorskip("safetensors")
    header = (
        '{ "b" : { "shape" : [ 2 ] , "dtype" : "F32" , "data_offsets" : [ 8 , 16 ] } ,\n'
        '"__metadata__": {"format": "pt"},'
        '"a\\u00e9":{"dtype":"F32","shape":[2],"data_offsets":[0,8]} ,'
        '"c":{"dtype":"I8","shape":[],"data_offsets":[16,17]} }'
    )
    path = _write(tmp_path / "odd.safetensors", header, bytes(17))
    with safetensors.safe_open(str(path), framework="np") as reference:
        expected = {name: reference.get_tensor(name).shape for name in reference.keys()}  # noqa: SIM118
        metadata = reference.metadata()
    with modelport.open(path) as model:
        assert {n: tuple(t.shape) for n, t in model.tensors.items()} == expected
        assert list(model.tensors) == ["aé", "b", "c"]  # in the order of their bytes
        assert dict(model.metadata) == metadata


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},}', "not valid JSON"),
        ('{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}', "not valid JSON"),
        ('{"a":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}} x', "not valid JSON"),
        ('{"a":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}}', "unknown dtype"),
        ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', "data_offsets"),
        (
            '{"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            "strings",
        ),
    ],
)
@pytest.mark.usefixtures("either_reading")
def test_broken_headers_give_the_errors_of_a_whole_read(
    tmp_path: Path, header: str, message: str
) -> None:
    path = _write(tmp_path / "bad.safetensors", header, bytes(4))
    with pytest.raises(CorruptFileError, match=message):
        modelport.inspect(path)


@pytest.mark.usefixtures("either_reading")
def test_a_repeated_name_keeps_json_s_last_entry(tmp_path: Path) -> None:
    header = (
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    )
    path = _write(tmp_path / "twice.safetensors", header, bytes(8))
    report = modelport.inspect(path)
    assert [(t.name, t.shape) for t in report.tensors] == [("a", (2,))]


def test_a_header_past_the_cap_names_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", limits.MAX_SAFETENSORS_HEADER + 8) + b"{}")
    with pytest.raises(LimitExceededError, match=f"limit of {limits.MAX_SAFETENSORS_HEADER:,}"):
        safetensors_format.read_header(path)


def test_a_zip_past_the_member_cap_names_the_cap(tmp_path: Path) -> None:
    """An end record that declares one member more than the cap: refused before the
    directory is read."""
    count = limits.MAX_ZIP_ENTRIES + 1
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0, 0, 0)
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, 0, 0)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, 0, 1)
    path = tmp_path / "many.npz"
    path.write_bytes(record + locator + end)
    with pytest.raises(LimitExceededError, match=f"limit of {limits.MAX_ZIP_ENTRIES:,}"):
        ZipDirectory.read(path)


def _report(tensors: tuple[TensorSummary, ...]) -> InspectReport:
    return InspectReport(
        path="x",
        format="safetensors",
        size_bytes=1,
        parameters=1,
        tensors=tensors,
        metadata={"ü": "✓"},
        extras={},
        aliases=(),
        warnings=(),
        details={"header_bytes": 8},
        modules=None,
        weights_source="",
        weights_note="",
        code_files=(),
        safety={"verdict": "safe", "findings": []},
        bytes_by_dtype={"float32": 4},
        bytes_fetched=12,
    )


def test_json_written_a_tensor_at_a_time_is_what_json_dumps_prints() -> None:
    plain = tuple(
        TensorSummary(f'layer.{i}."ü"', "float32", (i, 3) if i % 3 else (), 12 * i, "q" * (i % 2))
        for i in range(5000)
    )
    tensors = (*plain, TensorSummary("odd", "int8", (True, 2), 2))  # not plain ints
    report = _report(tensors)
    written = io.StringIO()
    cmd_inspect.write_json(written, report.to_json(with_tensors=False), report.tensors)
    assert written.getvalue() == json.dumps(report.to_json(), indent=2, default=json_default) + "\n"
    assert json.loads(written.getvalue())["tensor_count"] == len(tensors)


def test_the_tensor_table_for_people_stops_at_its_row_cap(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap is lowered: rich lays out ten thousand rows in seconds, and the code path is
    the same at any cap."""
    from rich.console import Console

    assert cmd_inspect.MAX_TABLE_ROWS >= 1000  # the real cap leaves a long table to read
    monkeypatch.setattr(cmd_inspect, "MAX_TABLE_ROWS", 40)
    extra = 7
    count = cmd_inspect.MAX_TABLE_ROWS + extra
    tensors = tuple(TensorSummary(f"t{i}", "float32", (1,), 4) for i in range(count))
    cmd_inspect.show_tensors(Console(width=120), _report(tensors))
    shown = capsys.readouterr().out
    assert f"{extra:,} more tensors" in shown
    assert f"t{cmd_inspect.MAX_TABLE_ROWS - 1} " in shown
    assert f"t{cmd_inspect.MAX_TABLE_ROWS} " not in shown


_NUMPY_WRITES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "longdouble", "complex64", "complex128", ">f4", ">i8",
    ">c16", "object", "V8", "U5", "S3", "datetime64[ns]", "timedelta64[s]",
]  # fmt: skip
_SHAPES = [(), (0,), (1,), (3,), (2, 3), (3, 1, 2), (0, 4), (1, 1, 1, 1), (70000,)]


def _saved_header(array: object, version: tuple[int, int]) -> tuple[bytes, tuple[object, ...]]:
    """What ``numpy.lib.format.write_array`` writes at ``version`` for ``array``, and what
    numpy's own header reader makes of it: (shape, fortran_order, dtype)."""
    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=True)
    raw = buffer.getvalue()
    buffer.seek(0)
    assert np.lib.format.read_magic(buffer) == version
    read_header = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }[version]
    return raw, read_header(buffer, max_header_size=1 << 20)


def _outcome(raw: bytes) -> object:
    """What ``parse_header`` and ``object_data_offset`` make of ``raw``: values or the error."""
    found: list[object] = []
    for parse in (_npy_header.parse_header, _npy_header.object_data_offset):
        try:
            found.append(parse(raw, path=Path("x.npy")))
        except ModelportError as exc:
            found.append((type(exc), str(exc)))
    return found


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_every_header_numpy_writes_parses_fast_as_numpy_reads_it(
    version: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    width = 2 if version == (1, 0) else 4
    cases = []
    for name in _NUMPY_WRITES:
        for shape in _SHAPES:
            for order in "CF":
                array = np.zeros(shape, dtype=name, order=order)  # type: ignore[call-overload]
                raw, (want_shape, want_fortran, want_dtype) = _saved_header(array, version)
                (length,) = struct.unpack_from("<H" if width == 2 else "<I", raw, 8)
                text = raw[8 + width : 8 + width + length].decode("latin-1")
                fast = _npy_header.fast_fields(text.strip())
                assert fast is not None, text
                assert fast == ast.literal_eval(text)  # the full evaluation, value for value
                assert (fast["shape"], fast["fortran_order"]) == (want_shape, want_fortran)
                assert np.lib.format.descr_to_dtype(fast["descr"]) == want_dtype
                cases.append(raw)
    record = np.zeros(2, dtype=[("a", "<f4"), ("b", "<i8")])
    cases.append(_saved_header(record, version)[0])
    quick = [_outcome(raw) for raw in cases]
    monkeypatch.setattr(_npy_header, "fast_fields", lambda text: None)
    monkeypatch.setattr(_npy_header, "_KNOWN", {})  # parsed headers are kept: parse afresh
    assert [_outcome(raw) for raw in cases] == quick
    assert len(cases) == len(_NUMPY_WRITES) * len(_SHAPES) * 2 + 1


@pytest.mark.parametrize(
    "text",
    [
        "{'descr': [('a', '<f4'), ('b', '<i8')], 'fortran_order': False, 'shape': (2,), }",
        '{"descr": "<f4", "fortran_order": False, "shape": (3,)}',
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (007,), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }",
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (3,), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }",
        "{'shape': (3,), 'descr': '<f4', 'fortran_order': False, }",
    ],
)
def test_other_spellings_take_the_full_evaluation(text: str) -> None:
    assert _npy_header.fast_fields(text) is None
