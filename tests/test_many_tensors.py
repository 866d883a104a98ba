"""Files of many tensors read as the reference reads them, and their errors name the cap.

The headers are written byte by byte (``struct`` + ``json``), as ``save_file`` would lay
them out, since the reference writer is slow at these counts; the reference reader is the
oracle."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest

import modelport
from modelport import limits
from modelport.cli import cmd_inspect
from modelport.cli._output import json_default
from modelport.errors import CorruptFileError, LimitExceededError
from modelport.formats import safetensors as safetensors_format
from modelport.formats._zip import ZipDirectory
from modelport.loading.inspect_report import InspectReport, TensorSummary

MANY = 100_000


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
def test_broken_headers_give_the_errors_of_a_whole_read(
    tmp_path: Path, header: str, message: str
) -> None:
    path = _write(tmp_path / "bad.safetensors", header, bytes(4))
    with pytest.raises(CorruptFileError, match=message):
        modelport.inspect(path)


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
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rich.console import Console

    extra = 7
    count = cmd_inspect.MAX_TABLE_ROWS + extra
    tensors = tuple(TensorSummary(f"t{i}", "float32", (1,), 4) for i in range(count))
    cmd_inspect.show_tensors(Console(width=120), _report(tensors))
    shown = capsys.readouterr().out
    assert f"{extra:,} more tensors" in shown
    assert f"t{cmd_inspect.MAX_TABLE_ROWS - 1} " in shown
    assert f"t{cmd_inspect.MAX_TABLE_ROWS} " not in shown
