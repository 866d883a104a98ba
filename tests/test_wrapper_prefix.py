"""``--strip-prefix auto`` means one thing everywhere: the wrapper prefixes every key carries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modelport
from modelport.tree.names import wrapper_prefix


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["module.a", "module.b"], "module."),
        (["_orig_mod.module.a", "_orig_mod.module.b"], "_orig_mod.module."),
        (["module.a", "b"], ""),
        (["module.", "module.a"], ""),  # a key that is only the prefix keeps it
        ([], ""),
        (["model.layers.0.w", "model.norm.w"], "model."),
    ],
)
def test_wrapper_prefix(names: list[str], expected: str) -> None:
    assert wrapper_prefix(names) == expected


def test_convert_and_diff_strip_the_same_nested_wrapper(tmp_path: Path) -> None:
    state = {"conv.weight": torch.randn(2, 3), "conv.bias": torch.randn(2)}
    wrapped = tmp_path / "compiled_ddp.pt"
    torch.save({f"_orig_mod.module.{k}": v for k, v in state.items()}, wrapped)
    out = tmp_path / "plain.safetensors"
    modelport.convert(wrapped, out, modelport.ConvertOptions(strip_prefix="auto"))
    written = load_file(out)  # the reference reader says what was written
    assert sorted(written) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(written[name], tensor)
    assert modelport.diff(wrapped, out, strip_prefix="auto").same
