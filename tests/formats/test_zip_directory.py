"""The zip directory reader against Python's ``zipfile``: every record's name, method,
sizes, CRC-32 and header offset as ``zipfile`` lists them, and data where its local header
says, read from a file (mapped) and from bytes alike."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from modelport.errors import TruncatedFileError
from modelport.formats._zip import ZipDirectory


def test_the_directory_lists_what_zipfile_lists(tmp_path: Path) -> None:
    path = tmp_path / "mixed.zip"
    contents = {
        "plain.txt": b"hello" * 100,
        "dir/stored.bin": bytes(range(256)),
        "unicodé/naïve.pkl": b"\x80\x04K\x01.",
    }
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in contents.items():
            method = zipfile.ZIP_STORED if name.endswith(".bin") else zipfile.ZIP_DEFLATED
            archive.writestr(name, data, compress_type=method)
        archive.comment = b"a comment"
    with zipfile.ZipFile(path) as archive:
        expected = [
            (i.filename, i.compress_type, i.compress_size, i.file_size, i.CRC, i.header_offset)
            for i in archive.infolist()
        ]
    directory = ZipDirectory.read(path)
    listed = [
        (e.name, e.method, e.compressed_size, e.size, e.crc32, e.header_offset)
        for e in directory.entries
    ]
    assert listed == expected
    assert [e.local_name for e in directory.entries] == list(contents)
    assert directory.unsafe_names == ()
    for entry in directory.entries:
        assert directory.read_member(entry) == contents[entry.name]
    stored = directory.find("dir/stored.bin")
    assert stored is not None
    raw = path.read_bytes()
    assert raw[stored.data_offset : stored.data_offset + stored.size] == bytes(range(256))
    assert ZipDirectory.from_bytes(raw, path).entries == directory.entries


def test_an_empty_file_is_no_zip(tmp_path: Path) -> None:
    path = tmp_path / "empty.zip"
    path.write_bytes(b"")
    with pytest.raises(TruncatedFileError):
        ZipDirectory.read(path)
