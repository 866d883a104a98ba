"""GGUF as a conversion target and source: --gguf-type (q8_0 against gguf-py's own
quantizer), --dequantize (against gguf-py's own dequantizer), provenance with --sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import modelport
from modelport.errors import ConversionError


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "blk.0.attn_q.weight": torch.randn(64, 96),
        "blk.0.norm.weight": torch.randn(96),
        "odd.weight": torch.randn(8, 20),
    }


def test_q8_0_matches_gguf_py(tmp_path: Path) -> None:
    import gguf
    from gguf.quants import quantize

    src = tmp_path / "s.pt"
    torch.save(_state(), src)
    out = tmp_path / "q.gguf"
    report = modelport.convert(src, out, modelport.ConvertOptions(gguf_type="q8_0"))
    assert report.verified
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == {"blk.0.attn_q.weight": "Q8_0", "blk.0.norm.weight": "F32", "odd.weight": "F32"}
    quantized = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    expected = quantize(_state()["blk.0.attn_q.weight"].numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert bytes(np.asarray(quantized.data)) == expected.tobytes()


def test_dequantize_matches_gguf_py(tmp_path: Path) -> None:
    import gguf
    from gguf.quants import dequantize, quantize

    values = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    src = tmp_path / "q4.gguf"
    writer = gguf.GGUFWriter(src, "llama")
    blocks = quantize(values, gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("w", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="Q4_0"):
        modelport.convert(src, tmp_path / "x.safetensors")  # safetensors cannot hold blocks
    out = tmp_path / "w.safetensors"
    modelport.convert(src, out, modelport.ConvertOptions(dequantize=True))
    from safetensors.numpy import load_file

    got = load_file(out)["w"]
    assert got.shape == (32, 64)
    assert np.array_equal(got, dequantize(blocks, gguf.GGMLQuantizationType.Q4_0))
    copy = tmp_path / "copy.gguf"
    modelport.convert(src, copy)  # blocks pass through unchanged into GGUF
    assert modelport.hash(copy).digest == modelport.hash(src).digest


def test_sha256_provenance(tmp_path: Path) -> None:
    src = tmp_path / "s.pt"
    torch.save(_state(), src)
    out = tmp_path / "o.safetensors"
    modelport.convert(src, out, modelport.ConvertOptions(sha256=True))
    metadata = modelport.inspect(out).metadata
    assert metadata["modelport.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert metadata["modelport.source"] == "s.pt"
    assert modelport.scan(out).verdict == "safe"
