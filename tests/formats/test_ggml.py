"""Legacy GGML files (ggml, ggmf, ggjt), written byte for byte as their converters wrote them.

No library writes these formats any more, so the writers below follow whisper.cpp's
``models/convert-pt-to-ggml.py``, llama.cpp's ``convert.py`` (``OutputFile``, ggjt v1 and
v3), its ggmf ``OutputFile`` and ggml's ``examples/gpt-2/convert-h5-to-ggml.py``, field by
field. The numpy arrays written are the oracle for names, shapes and values; gguf-py's
``quantize`` makes the Q8_0/Q4_0 blocks and its ``dequantize`` judges what they read back as.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import modelport
from modelport.errors import (
    CorruptFileError,
    TruncatedFileError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from tests.conftest import digest
from tests.mutation import assert_typed_error_or_whole, damage

Q = gguf.GGMLQuantizationType
RNG = np.random.default_rng(7)
TOKENS = [b"!", b"hello", b" world", b"\xe2\x96\x81x", b""]


def _values(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# -- whisper.cpp: models/convert-pt-to-ggml.py ---------------------------------------------------
WHISPER_HPARAMS = {
    "n_vocab": 51864, "n_audio_ctx": 6, "n_audio_state": 4, "n_audio_head": 2,
    "n_audio_layer": 1, "n_text_ctx": 5, "n_text_state": 4, "n_text_head": 2,
    "n_text_layer": 1, "n_mels": 3,
}  # fmt: skip
WHISPER_STATE = {
    "encoder.conv1.weight": _values(4, 3, 3),
    "encoder.conv1.bias": _values(4),
    "encoder.positional_embedding": _values(6, 4),
    "decoder.token_embedding.weight": _values(10, 4),
    "decoder.blocks.0.attn.query.weight": _values(4, 4),
    "decoder.ln.weight": _values(1, 4),  # squeezed to (4,) by the converter
}


def write_whisper(
    path: Path, use_f16: bool = True, quantized: tuple[str, np.ndarray, Q] | None = None
) -> dict[str, np.ndarray]:
    """As convert-pt-to-ggml.py writes it; returns each tensor as it was stored.
    ``quantized``: one more tensor, quantized, as whisper.cpp's quantize tool writes it (with
    ``ftype`` = 2 * 1000 + its ftype, GGML_QNT_VERSION 2)."""
    filters = _values(3, 8)
    stored = {}
    with open(path, "wb") as fout:
        fout.write(struct.pack("i", 0x67676D6C))
        for value in WHISPER_HPARAMS.values():
            fout.write(struct.pack("i", value))
        fout.write(struct.pack("i", 2008 if quantized else use_f16))
        fout.write(struct.pack("i", filters.shape[0]))
        fout.write(struct.pack("i", filters.shape[1]))
        for i in range(filters.shape[0]):
            for j in range(filters.shape[1]):
                fout.write(struct.pack("f", filters[i][j]))
        fout.write(struct.pack("i", len(TOKENS)))
        for key in TOKENS:
            fout.write(struct.pack("i", len(key)))
            fout.write(key)
        for name, tensor in WHISPER_STATE.items():
            data = tensor.squeeze()
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                data = data.reshape(data.shape[0], 1)
            n_dims = len(data.shape)
            ftype = 1
            keep_f32 = n_dims < 2 or name.endswith(("conv1.bias", "positional_embedding"))
            if not use_f16 or keep_f32:
                data, ftype = data.astype(np.float32), 0
            else:
                data = data.astype(np.float16)
            raw = name.encode("utf-8")
            fout.write(struct.pack("iii", n_dims, len(raw), ftype))
            for i in range(n_dims):
                fout.write(struct.pack("i", data.shape[n_dims - 1 - i]))
            fout.write(raw)
            data.tofile(fout)
            stored[name] = data
        if quantized is not None:
            name, values, kind = quantized
            blocks = quantize(values, kind)
            fout.write(struct.pack("iii", 2, len(name), int(kind)))
            fout.write(struct.pack("ii", values.shape[1], values.shape[0]))
            fout.write(name.encode())
            blocks.tofile(fout)
            stored[name] = blocks
    return stored


# -- llama.cpp: convert.py's OutputFile (ggjt) and the ggmf one before it ------------------------
N_VOCAB, N_EMBD = len(TOKENS), 64


def _llama_header(fout: BinaryIO, magic: bytes, version: int, file_type: int) -> None:
    fout.write(magic[::-1])
    values = [version, N_VOCAB, N_EMBD, 256, 2, 1, N_EMBD // 2, file_type]
    fout.write(struct.pack("i" * len(values), *values))
    for index, text in enumerate(TOKENS):
        fout.write(struct.pack("i", len(text)))
        fout.write(text)
        fout.write(struct.pack("f", -float(index)))


def _llama_tensor(fout: BinaryIO, name: str, shape: tuple[int, ...], code: int, pad: bool) -> None:
    sname = name.encode("utf-8")
    fout.write(struct.pack("iii", len(shape), len(sname), code))
    fout.write(struct.pack("i" * len(shape), *shape[::-1]))
    fout.write(sname)
    if pad:
        fout.seek((fout.tell() + 31) & -32)


LLAMA_PLAIN = {
    "tok_embeddings.weight": _values(N_VOCAB, N_EMBD).astype(np.float16),
    "norm.weight": _values(N_EMBD),
    "layers.0.attention.wq.weight": _values(N_EMBD, N_EMBD).astype(np.float16),
}
LLAMA_QUANTIZED = {
    "layers.0.feed_forward.w1.weight": (_values(8, N_EMBD), Q.Q8_0),
    "layers.0.feed_forward.w2.weight": (_values(4, N_EMBD), Q.Q4_0),
}


def write_ggjt_v3(path: Path) -> dict[str, np.ndarray]:
    """A ggjt v3 file with f32, f16, Q8_0 and Q4_0 tensors; returns each tensor's stored
    array (the blocks as uint8 for the quantized ones)."""
    stored: dict[str, np.ndarray] = {}
    with open(path, "wb") as fout:
        _llama_header(fout, b"ggjt", 3, 7)
        for name, array in LLAMA_PLAIN.items():
            _llama_tensor(fout, name, array.shape, 1 if array.dtype == np.float16 else 0, True)
            array.tofile(fout)
            stored[name] = array
        for name, (values, kind) in LLAMA_QUANTIZED.items():
            blocks = quantize(values, kind)
            _llama_tensor(fout, name, values.shape, int(kind), True)
            blocks.tofile(fout)
            stored[name] = blocks
    return stored


def write_old_llama(path: Path, magic: bytes, version: int) -> dict[str, np.ndarray]:
    """ggmf v1 (no padding) or ggjt v1 (padded), with an f32 tensor and Q4_0 in the first
    layout: a float32 scale and 16 bytes of nibbles per 32 values."""
    norm = _values(N_EMBD)
    old_q4 = RNG.integers(0, 256, size=(4, N_EMBD // 32 * 20), dtype=np.uint8)
    pad = magic == b"ggjt"
    with open(path, "wb") as fout:
        _llama_header(fout, magic, version, 2)
        _llama_tensor(fout, "norm.weight", norm.shape, 0, pad)
        norm.tofile(fout)
        _llama_tensor(fout, "output.weight", (4, N_EMBD), 2, pad)
        old_q4.tofile(fout)
    return {"norm.weight": norm, "output.weight": old_q4}


# -- ggml examples: gpt-2/convert-h5-to-ggml.py ---------------------------------------------------
def write_gpt2(path: Path) -> dict[str, np.ndarray]:
    stored = {"wte.weight": _values(len(TOKENS), 8).astype(np.float16), "ln_f.bias": _values(8)}
    with open(path, "wb") as fout:
        fout.write(struct.pack("i", 0x67676D6C))
        for value in (len(TOKENS), 16, 8, 2, 1, 1):
            fout.write(struct.pack("i", value))
        fout.write(struct.pack("i", len(TOKENS)))
        for text in TOKENS:
            fout.write(struct.pack("i", len(text)))
            fout.write(text)
        for name, data in stored.items():
            raw = name.encode("utf-8")
            fout.write(struct.pack("iii", data.ndim, len(raw), int(data.dtype == np.float16)))
            for i in range(data.ndim):
                fout.write(struct.pack("i", data.shape[data.ndim - 1 - i]))
            fout.write(raw)
            data.tofile(fout)
    return stored


# -- tests -----------------------------------------------------------------------------------
def test_whisper_names_shapes_values(tmp_path: Path) -> None:
    path = tmp_path / "ggml-tiny.bin"
    stored = write_whisper(path)
    with modelport.open(path) as model:
        assert model.format == "ggml"
        assert model.warnings == []
        assert list(model.tensors) == list(WHISPER_STATE)
        for name, expected in stored.items():
            ref = model.tensors[name]
            assert ref.shape == expected.shape, name
            assert ref.dtype == str(expected.dtype), name
            assert digest(ref.numpy()) == digest(expected), name
        assert model.tensors["encoder.conv1.bias"].shape == (4, 1)
        assert model.tensors["decoder.ln.weight"].shape == (4,)
        assert model.details["layout"] == "whisper"
        assert model.details["mel_filters"]["shape"] == [3, 8]
        assert model.metadata["n_audio_state"] == 4
        assert model.metadata["ftype"] == 1
        assert model.metadata["vocab_size"] == len(TOKENS)


def test_ggjt_v3_plain_and_quantized_tensors(tmp_path: Path) -> None:
    path = tmp_path / "ggml-model-q4_0.bin"
    stored = write_ggjt_v3(path)
    with modelport.open(path) as model:
        assert (model.details["container"], model.details["version"]) == ("ggjt", 3)
        assert model.details["layout"] == "llama"
        assert model.metadata["n_embd"] == N_EMBD
        assert model.metadata["vocab_size"] == N_VOCAB
        for name, expected in LLAMA_PLAIN.items():
            assert digest(model.tensors[name].numpy()) == digest(expected), name
        for name, (values, kind) in LLAMA_QUANTIZED.items():
            ref = model.tensors[name]
            assert ref.storage is not None and ref.storage.offset % 32 == 0
            assert (ref.dtype, ref.shape) == (kind.name, values.shape)
            assert digest(ref.raw_bytes()) == digest(stored[name])
            with pytest.raises(UnsupportedDtypeError):
                ref.numpy()


def test_dequantized_blocks_match_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    stored = write_ggjt_v3(path)
    out = tmp_path / "model.safetensors"
    modelport.convert(path, out, modelport.ConvertOptions(dequantize=True))
    written = load_file(out)
    assert set(written) == set(stored)
    for name, expected in LLAMA_PLAIN.items():
        assert np.array_equal(written[name], expected), name
    for name, (values, kind) in LLAMA_QUANTIZED.items():
        reference = dequantize(stored[name], kind)
        assert written[name].shape == values.shape
        assert np.array_equal(written[name], reference), name


def test_whisper_quantization_version_2_blocks(tmp_path: Path) -> None:
    path = tmp_path / "ggml-tiny-q5_0.bin"
    values = _values(4, 64)
    stored = write_whisper(path, quantized=("decoder.proj.weight", values, Q.Q5_0))
    with modelport.open(path) as model:
        assert model.metadata["ftype"] == 2008
        assert model.details["quantization"].startswith("ggjt v3")
        ref = model.tensors["decoder.proj.weight"]
        assert (ref.dtype, ref.shape) == ("Q5_0", (4, 64))
    out = tmp_path / "tiny.safetensors"
    modelport.convert(path, out, modelport.ConvertOptions(dequantize=True))
    expected = dequantize(stored["decoder.proj.weight"], Q.Q5_0)
    assert np.array_equal(load_file(out)["decoder.proj.weight"], expected)


def test_ggjt_v3_blocks_copy_into_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    stored = write_ggjt_v3(path)
    out = tmp_path / "model.gguf"
    modelport.convert(path, out)
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    for name, (values, kind) in LLAMA_QUANTIZED.items():
        assert tensors[name].tensor_type == kind
        assert bytes(np.asarray(tensors[name].data)) == stored[name].tobytes(), name
        assert tuple(int(n) for n in tensors[name].shape) == values.shape[::-1]


def test_f32_whisper_converts_to_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "ggml-tiny-f32.bin"
    stored = write_whisper(path, use_f16=False)
    out = tmp_path / "tiny.safetensors"
    modelport.convert(path, out)
    written = load_file(out)
    assert list(written) == list(stored)
    for name, expected in stored.items():
        assert written[name].dtype == np.float32
        assert np.array_equal(written[name], expected), name


@pytest.mark.parametrize(("magic", "version"), [(b"ggmf", 1), (b"ggjt", 1)])
def test_old_block_layouts_are_listed_not_read(tmp_path: Path, magic: bytes, version: int) -> None:
    path = tmp_path / "old.bin"
    stored = write_old_llama(path, magic, version)
    with modelport.open(path) as model:
        assert model.details["container"] == magic.decode()
        assert np.array_equal(model.tensors["norm.weight"].numpy(), stored["norm.weight"])
        old = model.tensors["output.weight"]
        assert (old.dtype, old.shape) == ("uint8", stored["output.weight"].shape)
        assert "Q4_0" in old.note
        assert any("Q4_0" in w for w in model.warnings)
        with pytest.raises(UnsupportedDtypeError, match="Q4_0 blocks"):
            old.numpy()
    with pytest.raises(UnsupportedDtypeError, match="Q4_0 blocks"):
        modelport.convert(
            path, tmp_path / "x.safetensors", modelport.ConvertOptions(dequantize=True)
        )
    assert not (tmp_path / "x.safetensors").exists()


def test_gpt2_example_layout(tmp_path: Path) -> None:
    path = tmp_path / "gpt-2.bin"
    stored = write_gpt2(path)
    with modelport.open(path) as model:
        assert model.details["layout"] == "gpt-2"
        assert model.metadata["n_ctx"] == 16
        for name, expected in stored.items():
            assert digest(model.tensors[name].numpy()) == digest(expected), name


def test_unversioned_llama_is_not_taken_for_gpt2(tmp_path: Path) -> None:
    """convert-pth-to-ggml.py (March 2023): the ggml magic, 7 hparams, tokens without scores."""
    path = tmp_path / "ggml-model-f32.bin"
    norm = _values(N_EMBD)
    with open(path, "wb") as fout:
        fout.write(struct.pack("i", 0x67676D6C))
        fout.write(struct.pack("7i", N_VOCAB, N_EMBD, 256, 2, 1, N_EMBD // 2, 0))
        for text in TOKENS:
            fout.write(struct.pack("i", len(text)))
            fout.write(text)
        _llama_tensor(fout, "norm.weight", norm.shape, 0, pad=False)
        norm.tofile(fout)
    with modelport.open(path) as model:
        assert model.details["layout"] == "llama"
        assert "version" not in model.details
        assert model.metadata["n_mult"] == 256
        assert np.array_equal(model.tensors["norm.weight"].numpy(), norm)


def test_lora_adapter(tmp_path: Path) -> None:
    """llama.cpp's convert-lora-to-ggml.py: ggla v1, r and lora_alpha, padded tensors."""
    path = tmp_path / "ggml-adapter-model.bin"
    arrays = {
        "layers.0.attention.wq.loraA": _values(8, N_EMBD),
        "layers.0.attention.wq.loraB": _values(N_EMBD, 8),
    }
    with open(path, "wb") as fout:
        fout.write(b"ggla"[::-1])
        fout.write(struct.pack("i", 1))
        fout.write(struct.pack("ii", 8, 16))
        for name, array in arrays.items():
            _llama_tensor(fout, name, array.shape, 0, pad=True)
            array.tofile(fout)
    with modelport.open(path) as model:
        assert model.details["layout"] == "llama-lora"
        assert model.metadata == {"r": 8, "lora_alpha": 16}
        for name, expected in arrays.items():
            assert np.array_equal(model.tensors[name].numpy(), expected), name


def test_inspect_reports_hparams_and_scan_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "ggml-base.en.bin"
    write_whisper(path)
    report = modelport.inspect(path).to_json()
    assert report["format"] == "ggml"
    assert report["metadata"]["n_text_layer"] == 1
    assert report["metadata"]["vocab_size"] == len(TOKENS)
    assert report["tensors"][0]["shape"] == [4, 3, 3]
    assert report["warnings"] == []  # .bin names ggml files as well as torch ones
    assert modelport.scan(path).verdict == "safe"


def test_truncated_file_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    write_ggjt_v3(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(TruncatedFileError, match="llama") as caught:
        modelport.open(path)
    assert caught.value.actual == len(data) - 10
    assert caught.value.expected == len(data)
    assert modelport.scan(path).verdict != "safe"


def test_garbage_after_magic_names_the_layouts_tried(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"lmgg" + random.Random(0).randbytes(400))
    with pytest.raises(CorruptFileError) as caught:
        modelport.open(path)
    for layout in ("whisper", "llama", "gpt-j", "gpt-2", "gpt-neox"):
        assert layout in str(caught.value)
    assert modelport.scan(path).verdict != "safe"


def test_trailing_bytes_and_unknown_versions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "trailing.bin"
    write_whisper(path)
    with open(path, "ab") as handle:
        handle.write(b"\x00" * 7)
    with pytest.raises((CorruptFileError, TruncatedFileError)):
        modelport.open(path)
    future = tmp_path / "v4.bin"
    future.write_bytes(b"tjgg" + struct.pack("<i", 4) + bytes(64))
    with pytest.raises(UnsupportedVersionError, match="version 4"):
        modelport.open(future)


_VALID: list[bytes] = []


def _valid_bytes(tmp_path: Path) -> bytes:
    if not _VALID:
        write_ggjt_v3(tmp_path / "valid.bin")
        _VALID.append((tmp_path / "valid.bin").read_bytes())
    return _VALID[0]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_only_raise_typed_errors(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(damage(data, _valid_bytes(tmp_path), keep=4))
    assert_typed_error_or_whole(path, intact=_valid_bytes(tmp_path))
