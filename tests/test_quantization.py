"""Quantized checkpoints listed as what they are, with logical parameter counts, and MLX
dequantized on request.

Oracles: MLX files come from ``mlx.nn.quantize`` and ``mx.save_safetensors`` and their values
from ``mx.dequantize``; bitsandbytes' from its own ``Linear4bit`` / ``Linear8bitLt`` (heavy:
its import takes seconds), and from the names, dtypes and JSON quant state it writes. GPTQ and
AWQ run on CUDA only, so their tensors are packed here by the algorithms AutoGPTQ's and
AutoAWQ's ``pack`` use (input rows into int32 words; AWQ's output columns in the order
0, 2, 4, 6, 1, 3, 5, 7) and saved with ``safetensors.numpy``; FP8 block scales as
DeepSeek-V3's checkpoints store them, saved with ``safetensors.torch``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

import modelport
from modelport.cli.main import main
from modelport.tree import dequantizing, quantization

HIDDEN, INTER, VOCAB = 64, 128, 96
PROJECTIONS = {  # name: (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
rng = np.random.default_rng(0)


def _folder(tmp_path: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_numpy(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return folder


def _plain(layers: int) -> tuple[dict[str, np.ndarray], int]:
    """The tensors a quantizer leaves in float16: embeddings, norms, lm_head."""
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float16),
        "model.norm.weight": np.ones(HIDDEN, np.float16),
        "lm_head.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float16),
    }
    for i in range(layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(HIDDEN, np.float16)
    return tensors, sum(a.size for a in tensors.values())


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's pack: ``32 / bits`` consecutive rows into each int32 row, lowest first."""
    per_word = 32 // bits
    words = np.zeros((values.shape[0] // per_word, values.shape[1]), np.uint32)
    for j in range(per_word):
        words |= values[j::per_word].astype(np.uint32) << np.uint32(bits * j)
    return words.view(np.int32)


def _pack_columns(values: np.ndarray, bits: int, order: tuple[int, ...]) -> np.ndarray:
    per_word = 32 // bits
    words = np.zeros((values.shape[0], values.shape[1] // per_word), np.uint32)
    for i in range(per_word):
        words |= values[:, order[i] :: per_word].astype(np.uint32) << np.uint32(bits * i)
    return words.view(np.int32)


def _gptq(prefix: str, out: int, inputs: int, bits: int, group: int) -> dict[str, np.ndarray]:
    weight = rng.integers(0, 2**bits, (out, inputs))
    groups = inputs // group
    zeros = rng.integers(0, 2**bits, (groups, out))
    return {
        prefix + "qweight": _pack_rows(weight.T, bits),
        prefix + "qzeros": _pack_rows(zeros.T, bits).T.copy(),
        prefix + "scales": rng.random((groups, out)).astype(np.float16),
        prefix + "g_idx": (np.arange(inputs) // group).astype(np.int32),
    }


def _awq(prefix: str, out: int, inputs: int, group: int) -> dict[str, np.ndarray]:
    weight = rng.integers(0, 16, (inputs, out))
    zeros = rng.integers(0, 16, (inputs // group, out))
    return {
        prefix + "qweight": _pack_columns(weight, 4, AWQ_ORDER),
        prefix + "qzeros": _pack_columns(zeros, 4, AWQ_ORDER),
        prefix + "scales": rng.random((inputs // group, out)).astype(np.float16),
    }


def _gptq_model(tmp_path: Path, bits: int, group: int, config: bool = True) -> tuple[Path, int]:
    tensors, expected = _plain(2)
    for i in range(2):
        for name, (out, inputs) in PROJECTIONS.items():
            tensors.update(_gptq(f"model.layers.{i}.{name}.", out, inputs, bits, group))
            tensors[f"model.layers.{i}.{name}.bias"] = np.zeros(out, np.float16)
            expected += out * inputs + out
    quant = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False}
    return _folder(tmp_path, tensors, {"quantization_config": quant} if config else {}), expected


def test_gptq_listed_with_logical_parameters(tmp_path: Path) -> None:
    folder, expected = _gptq_model(tmp_path, 4, 32)
    report = modelport.inspect(folder)
    assert report.parameters == expected
    summary = report.quantization
    assert summary is not None
    assert (summary["scheme"], summary["bits"], summary["group_size"]) == ("gptq", 4, 32)
    assert summary["quantized_layers"] == 14 and summary["quant_method"] == "gptq"
    down = next(la for la in summary["layers"] if la["name"] == "model.layers.1.mlp.down_proj")
    assert down["shape"] == [HIDDEN, INTER]
    assert down["parts"] == [
        f"model.layers.1.mlp.down_proj.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")
    ]
    notes = {t.name: t.note for t in report.tensors}
    assert notes["model.layers.0.mlp.up_proj.qweight"] == "GPTQ 4-bit packed weight of [128, 64]"
    assert notes["model.layers.0.mlp.up_proj.bias"] == ""
    assert report.to_json()["quantization"]["kinds"] == [
        {"scheme": "gptq", "bits": 4, "group_size": 32, "layers": 14}
    ]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_bits_and_groups_from_shapes_alone(tmp_path: Path, bits: int) -> None:
    folder, expected = _gptq_model(tmp_path, bits, 16, config=False)
    report = modelport.inspect(folder / "model.safetensors")
    assert report.parameters == expected
    assert report.quantization is not None
    assert report.quantization["kinds"] == [
        {"scheme": "gptq", "bits": bits, "group_size": 16, "layers": 14}
    ]


def test_awq_with_and_without_config(tmp_path: Path) -> None:
    tensors, expected = _plain(1)
    for name, (out, inputs) in PROJECTIONS.items():
        tensors.update(_awq(f"model.layers.0.{name}.", out, inputs, 32))
        expected += out * inputs
    config = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}
    folder = _folder(tmp_path, tensors, {"quantization_config": config})
    found = modelport.inspect(folder)
    assert found.parameters == expected
    assert found.quantization is not None
    assert found.quantization["kinds"] == [
        {"scheme": "awq", "bits": 4, "group_size": 32, "layers": 7}
    ]
    shapes = {la["name"].rsplit(".", 1)[1]: la["shape"] for la in found.quantization["layers"]}
    assert shapes["gate_proj"] == [INTER, HIDDEN] and shapes["down_proj"] == [HIDDEN, INTER]
    (folder / "config.json").unlink()
    bare = modelport.inspect(folder / "model.safetensors")
    assert bare.parameters == expected
    assert (
        bare.quantization is not None and bare.quantization["kinds"] == found.quantization["kinds"]
    )


def test_fp8_block_and_channel_scales(tmp_path: Path) -> None:
    out, inputs = 200, 300  # blocks of 128 that do not divide the matrix
    torch.manual_seed(0)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(out, inputs).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.up_proj.weight_scale_inv": torch.rand(2, 3),
        "model.layers.0.mlp.down_proj.weight": torch.randn(inputs, out).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.down_proj.weight_scale": torch.rand(inputs, 1),
        "model.layers.0.mlp.down_proj.input_scale": torch.rand(()),
        "model.norm.weight": torch.ones(out, dtype=torch.bfloat16),
    }
    path = tmp_path / "model.safetensors"
    save_torch(tensors, str(path))
    report = modelport.inspect(path)  # no config: the block is read off the scales' shape
    assert report.parameters == 2 * out * inputs + out
    assert report.quantization is not None
    kinds = {
        (k["group_size"] if k["group_size"] is None else tuple(k["group_size"]))
        for k in report.quantization["kinds"]
    }
    assert kinds == {(128, 128), None}
    config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    summary = modelport.inspect(path).quantization
    assert summary is not None and summary["quant_method"] == "fp8"
    line = quantization.describe(summary)
    assert "FP8 8-bit, block 128x128: 1 quantized linear layer" in line
    assert "FP8 8-bit, per channel: 1 quantized linear layer" in line


def _bnb_state(out: int, inputs: int, kind: str) -> np.ndarray:
    """bitsandbytes' ``pack_dict_to_tensor``: the quant state as JSON bytes in a uint8 tensor."""
    state = {"quant_type": kind, "blocksize": 64, "dtype": "float16", "shape": [out, inputs]}
    return np.frombuffer(json.dumps(state).encode(), np.uint8).copy()


def test_bitsandbytes_layouts(tmp_path: Path) -> None:
    tensors, expected = _plain(1)
    for name, (out, inputs) in PROJECTIONS.items():
        prefix = f"model.layers.0.{name}."
        if name.startswith("mlp"):  # LLM.int8: int8 rows with one scale each
            tensors[prefix + "weight"] = rng.integers(-127, 127, (out, inputs)).astype(np.int8)
            tensors[prefix + "SCB"] = rng.random(out).astype(np.float32)
            tensors[prefix + "weight_format"] = np.array(0, np.uint8)
        else:  # NF4, double-quantized: absmax in uint8 with their own absmax
            blocks = out * inputs // 64
            tensors[prefix + "weight"] = rng.integers(0, 255, (out * inputs // 2, 1)).astype(
                np.uint8
            )
            tensors[prefix + "weight.absmax"] = rng.integers(0, 255, blocks).astype(np.uint8)
            tensors[prefix + "weight.quant_map"] = rng.random(16).astype(np.float32)
            tensors[prefix + "weight.nested_absmax"] = rng.random(math.ceil(blocks / 256)).astype(
                np.float32
            )
            tensors[prefix + "weight.nested_quant_map"] = rng.random(256).astype(np.float32)
            tensors[prefix + "weight.quant_state.bitsandbytes__nf4"] = _bnb_state(
                out, inputs, "nf4"
            )
        expected += out * inputs
    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    report = modelport.inspect(_folder(tmp_path, tensors, {"quantization_config": config}))
    assert report.parameters == expected
    assert report.quantization is not None
    kinds = {
        (k["scheme"], k["bits"], k["group_size"], k["layers"]) for k in report.quantization["kinds"]
    }
    assert kinds == {("bitsandbytes-nf4", 4, 64, 4), ("bitsandbytes-int8", 8, None, 3)}
    q_proj = next(la for la in report.quantization["layers"] if la["name"].endswith("q_proj"))
    assert q_proj["shape"] == [HIDDEN, HIDDEN] and len(q_proj["parts"]) == 6


@pytest.mark.heavy
def test_bitsandbytes_own_state_dict(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    four = bnb.nn.Linear4bit(64, 32, bias=True, quant_type="fp4", compress_statistics=True).to(
        "cpu"
    )
    eight = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False).to("cpu")
    state = {f"a.{k}": v for k, v in four.state_dict().items()}
    state.update({f"b.{k}": v for k, v in eight.state_dict().items()})
    path = tmp_path / "model.safetensors"
    save_torch(state, str(path))
    report = modelport.inspect(path)
    assert report.parameters == 32 * 64 + 32 + 48 * 64 + 48
    assert report.quantization is not None
    layers = {la["name"]: (la["scheme"], la["shape"]) for la in report.quantization["layers"]}
    assert layers == {"a": ("bitsandbytes-fp4", [32, 64]), "b": ("bitsandbytes-int8", [48, 64])}


def test_plain_file_is_not_quantized(tmp_path: Path) -> None:
    tensors = {"qweight": np.zeros((4, 8), np.int32), "w.weight": np.zeros((3, 5), np.uint32)}
    path = tmp_path / "model.safetensors"
    save_numpy(tensors, str(path))
    report = modelport.inspect(path)
    assert report.quantization is None and report.parameters == 4 * 8 + 3 * 5
    assert report.to_json()["quantization"] is None


def test_rich_view_names_the_scheme(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = _gptq_model(tmp_path, 4, 32)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(folder)]) == 0
    assert "GPTQ 4-bit, group 32: 14 quantized linear layers" in capsys.readouterr().out


# -- MLX ----------------------------------------------------------------------------------------
def _mlx_model(tmp_path: Path, dtype: str = "float32") -> tuple[Path, dict[str, Any], int]:
    """A tiny model quantized by MLX: 4-bit group 32, its second linear 8-bit group 64 (an
    override under the layer's name, as mlx-lm writes mixed configs)."""
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    model = nn.Module()
    model.embed = nn.Embedding(VOCAB, HIDDEN)
    model.layers = [nn.Linear(HIDDEN, INTER), nn.Linear(INTER, HIDDEN, bias=False)]
    model.norm = nn.RMSNorm(HIDDEN)
    model.set_dtype(getattr(mx, dtype))
    expected = VOCAB * HIDDEN + HIDDEN * INTER + INTER + INTER * HIDDEN + HIDDEN
    model.layers[1] = nn.QuantizedLinear.from_linear(model.layers[1], group_size=64, bits=8)
    nn.quantize(model, group_size=32, bits=4)
    params = dict(tree_flatten(model.parameters()))
    folder = tmp_path / "mlx"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), params, metadata={"format": "mlx"})
    quant = {"group_size": 32, "bits": 4, "layers.1": {"group_size": 64, "bits": 8}}
    config = {"model_type": "llama", "quantization": quant, "quantization_config": quant}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, params, expected


def test_mlx_listed_with_overrides(tmp_path: Path) -> None:
    folder, _, expected = _mlx_model(tmp_path)
    report = modelport.inspect(folder)
    assert report.parameters == expected
    assert report.quantization is not None
    assert report.quantization["kinds"] == [
        {"scheme": "mlx", "bits": 4, "group_size": 32, "layers": 2},
        {"scheme": "mlx", "bits": 8, "group_size": 64, "layers": 1},
    ]
    shapes = {la["name"]: la["shape"] for la in report.quantization["layers"]}
    assert shapes == {
        "embed": [VOCAB, HIDDEN],
        "layers.0": [INTER, HIDDEN],
        "layers.1": [HIDDEN, INTER],
    }
    assert "MLX 4-bit, group 32: 2 quantized layers" in quantization.describe(report.quantization)


def test_mlx_without_config_takes_its_default_group(tmp_path: Path) -> None:
    mx = pytest.importorskip("mlx.core")
    weight = mx.random.normal((32, 256))
    packed, scales, biases = mx.quantize(weight, group_size=64, bits=4)
    path = tmp_path / "w.safetensors"
    mx.save_safetensors(str(path), {"l.weight": packed, "l.scales": scales, "l.biases": biases})
    with modelport.open(path) as model:
        found = quantization.recognise(model.tensors)
    assert [(la.bits, la.group_size, la.shape) for la in found.layers] == [(4, 64, (32, 256))]
    assert found.parameter_count(model.tensors) == 32 * 256


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_mlx_matches_mlx(bits: int, group: int) -> None:
    mx = pytest.importorskip("mlx.core")
    weight = mx.random.normal((3, 2, 256), key=mx.random.key(bits * group))
    packed, scales, biases = mx.quantize(weight, group_size=group, bits=bits)
    reference = np.array(mx.dequantize(packed, scales, biases, group_size=group, bits=bits))
    ours = dequantizing.dequantize_mlx(
        np.array(packed), np.array(scales), np.array(biases), bits, group
    )
    assert ours.shape == reference.shape == (3, 2, 256)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_dequantizes_mlx(tmp_path: Path, dtype: str) -> None:
    mx = pytest.importorskip("mlx.core")
    folder, params, _ = _mlx_model(tmp_path, dtype)
    out = tmp_path / "plain.safetensors"
    options = modelport.ConvertOptions(to="safetensors", dequantize=True)
    report = modelport.convert(folder / "model.safetensors", out, options)
    assert report.verified and any("dequantized 3 MLX layers" in n for n in report.notes)
    written = load_file(str(out))
    assert sorted(written) == [
        "embed.weight",
        "layers.0.bias",
        "layers.0.weight",
        "layers.1.weight",
        "norm.weight",
    ]
    for name, bits, group in (("embed", 4, 32), ("layers.0", 4, 32), ("layers.1", 8, 64)):
        scales, biases = (params[f"{name}.{p}"].astype(mx.float32) for p in ("scales", "biases"))
        expected = mx.dequantize(
            params[f"{name}.weight"], scales, biases, group_size=group, bits=bits
        )
        assert written[f"{name}.weight"].dtype == np.float32
        np.testing.assert_allclose(
            written[f"{name}.weight"], np.array(expected), rtol=1e-6, atol=1e-6
        )


def test_convert_without_dequantize_copies_packed(tmp_path: Path) -> None:
    folder, _ = _gptq_model(tmp_path, 4, 32)
    out = tmp_path / "copy.safetensors"
    options = modelport.ConvertOptions(to="safetensors", dequantize=True)
    report = modelport.convert(folder, out, options)
    assert any("copied 14 GPTQ layers packed" in n for n in report.notes)
    assert load_file(str(out))["model.layers.0.mlp.up_proj.qweight"].dtype == np.int32


def test_compressed_tensors_pack_quantized(tmp_path: Path) -> None:
    tensors, expected = _plain(1)
    for name, (out, inputs) in PROJECTIONS.items():
        prefix = f"model.layers.0.{name}."
        values = rng.integers(0, 16, (out, inputs))
        tensors[prefix + "weight_packed"] = _pack_rows(values.T, 4).T.copy()
        tensors[prefix + "weight_scale"] = rng.random((out, inputs // 32)).astype(np.float16)
        tensors[prefix + "weight_zero_point"] = np.zeros((out // 8, inputs // 32), np.int32)
        tensors[prefix + "weight_shape"] = np.array([out, inputs], np.int64)
        expected += out * inputs
    weights = {"num_bits": 4, "group_size": 32, "strategy": "group", "type": "int"}
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
    }
    report = modelport.inspect(_folder(tmp_path, tensors, {"quantization_config": config}))
    assert report.parameters == expected
    assert report.quantization is not None
    assert report.quantization["kinds"] == [
        {"scheme": "compressed-tensors", "bits": 4, "group_size": 32, "layers": 7}
    ]
    assert len(report.quantization["layers"][0]["parts"]) == 4
