"""``modelport.binding``: inputs by position while they fill ``forward`` in order, then by
keyword; every exporter and runtime called that one way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from modelport.errors import UsageError
from modelport.torch_models.binding import bind
from modelport.torch_models.exporting import export
from tests.models import Router, TinyResNet


class Gappy(nn.Module):
    """An int default between two tensors, as GPT-2 has ``past_key_values`` between
    ``input_ids`` and ``attention_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(
        self, x: torch.Tensor, k: int = 2, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = self.linear(x)
        if mask is not None:
            y = y * mask.unsqueeze(-1)
        return y * k


class PositionalOnly(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None, /) -> torch.Tensor:
        return a if b is None else a + b


def gappy_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"mask": (torch.rand(2, 3) > 0.5).float(), "x": torch.randn(2, 3, 4)}


def test_the_rule() -> None:
    x, mask, scale = torch.randn(2, 5, 8), torch.ones(2, 5), torch.tensor(2.0)
    call, inputs = bind(Router(), {"scale": scale, "x": x, "mask": mask})
    assert (call.names, call.positional) == (("x", "mask", "scale"), 3)  # as before: in order
    assert inputs[2] is scale
    call, inputs = bind(Gappy(), gappy_inputs())
    assert (call.names, call.positional) == (("x", "mask"), 1)  # k left out: then keywords
    assert call.split(inputs) == ((inputs[0],), {"mask": inputs[1]})
    call, _ = bind(TinyResNet(), {"images": torch.randn(1, 3, 8, 8)})  # not an argument
    assert (call.names, call.positional) == (("images",), 1)
    call, _ = bind(Router(), [x, mask])
    assert (call.names, call.positional) == (("input0", "input1"), 2)
    with pytest.raises(UsageError, match=r"do not fit forward.*multiple values for .*'x'"):
        bind(Router(), {"x": x, "scale": scale, "extra": x})  # unknown names go first
    with pytest.raises(UsageError, match="missing a required argument: 'mask'"):
        bind(Router(), {"scale": scale, "x": x})
    with pytest.raises(UsageError, match=r"b comes after a .* by position only"):
        bind(PositionalOnly(), {"b": x})


def test_dynamic_shapes_are_keyed_by_argument_name() -> None:
    call, _ = bind(Gappy(), gappy_inputs())
    assert call.arrange(["xs", "ms"]) == {"x": "xs", "mask": "ms"}
    call, _ = bind(Router(), {"x": torch.ones(1), "mask": torch.ones(1)})
    assert call.arrange(["xs", "ms"]) == ("xs", "ms")  # all by position: a tuple, as before


@pytest.mark.parametrize(
    ("to", "exporter"),
    [("onnx", "dynamo"), ("onnx", "legacy"), ("pt2", "dynamo"), ("torchscript", "dynamo")],
)
def test_every_exporter_takes_the_keyword(tmp_path: Path, to: str, exporter: str) -> None:
    path = tmp_path / f"gappy.{to}"
    dynamic = {"x": {0: "batch"}, "mask": {0: "batch"}}
    report = export(Gappy().eval(), path, gappy_inputs(), to=to, exporter=exporter, dynamic=dynamic)
    assert report.verified is True, [c for c in report.outputs if not c.ok]
    assert {"batch=3", "batch=5"} <= {c.sample for c in report.outputs}
    assert [(i.name, i.keyword) for i in report.inputs] == [("x", False), ("mask", True)]
    if to == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # the legacy exporter alone would add k=2 as an input and misname those after it
        assert [i.name for i in session.get_inputs()] == ["x", "mask"]


def test_compiled_models_keep_their_convention(tmp_path: Path) -> None:
    path = tmp_path / "gappy.pt2"
    export(Gappy().eval(), path, gappy_inputs(), to="pt2")
    program = torch.export.load(str(path)).module()
    call, _ = bind(program, gappy_inputs())
    assert (call.names, call.keywords) == (("x", "mask"), ("mask",))
    again = export(program, tmp_path / "again.onnx", gappy_inputs())  # a .pt2 as the model
    assert again.verified is True
    x, mask, scale = torch.randn(2, 5, 8), torch.ones(2, 5), torch.tensor(2.0)
    scripted = torch.jit.script(Router())
    assert bind(scripted, {"mask": mask, "x": x})[0].positional == 2
    with pytest.raises(UsageError, match=r"scale comes after mask in forward\(x, mask"):
        bind(scripted, {"x": x, "scale": scale})  # TorchScript's converters take no keywords
