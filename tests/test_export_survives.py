"""Exports that survive real models: a detection head that caches values in ``forward``
(ultralytics' ``Detect``), a diffusers component folder and an ultralytics checkpoint dict
as ``--model``.

Oracles: the runtimes themselves (onnxruntime, ``torch.export.load``) against a copy of the
model taken before anything ran it, ``torch.load`` for the checkpoint's module and diffusers'
own ``from_pretrained`` for the UNet.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modelport.errors import CodeExecutionWarning, MissingDependencyError, ModelSpecError
from modelport.torch_models.building import build_model, resolve_model
from modelport.torch_models.exporting import export
from modelport.torch_models.tracing_copy import tracing_copy
from tests.conftest import Cli


def make_anchors(
    feats: list[torch.Tensor], strides: torch.Tensor, offset: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points and their strides for each feature map, as ultralytics makes them."""
    points, stride_rows = [], []
    for feat, stride in zip(feats, strides, strict=True):
        h, w = feat.shape[2:]
        sx = torch.arange(end=w, dtype=feat.dtype) + offset
        sy = torch.arange(end=h, dtype=feat.dtype) + offset
        grid_y, grid_x = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), -1).view(-1, 2))
        stride_rows.append(torch.full((h * w, 1), stride, dtype=feat.dtype))
    return torch.cat(points), torch.cat(stride_rows)


class Detect(nn.Module):
    """ultralytics' detection head in small: anchors made in ``forward`` and cached on the
    module with the input shape they fit, remade when the shape changes."""

    shape: torch.Size | None = None
    anchors = torch.empty(0)
    strides = torch.empty(0)

    def __init__(self, classes: int = 2, channels: tuple[int, ...] = (4, 8)) -> None:
        super().__init__()
        self.classes, self.outputs = classes, classes + 4
        self.stride = torch.tensor([8.0, 16.0])
        self.heads = nn.ModuleList(nn.Conv2d(c, self.outputs, 1) for c in channels)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        feats = [head(f) for head, f in zip(self.heads, feats, strict=True)]
        shape = feats[0].shape
        joined = torch.cat([f.view(shape[0], self.outputs, -1) for f in feats], 2)
        if self.shape != shape:
            anchors, strides = make_anchors(feats, self.stride)
            self.anchors, self.strides = anchors.transpose(0, 1), strides.transpose(0, 1)
            self.shape = shape
        box, cls = joined.split((4, self.classes), 1)
        centre = box[:, :2] + self.anchors.unsqueeze(0)
        return torch.cat((centre * self.strides, box[:, 2:] * self.strides, cls.sigmoid()), 1)


class TinyYolo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.stage2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = Detect()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.stage1(x)
        return self.head([first, self.stage2(first)])


def tiny_yolo() -> TinyYolo:
    torch.manual_seed(0)
    return TinyYolo().eval()


# -- the eager reference on a module no tracer touched -----------------------------------------


def test_tracing_copy_shares_weights_and_nothing_else() -> None:
    model = tiny_yolo()
    notes: list[str] = []
    copied = tracing_copy(model, notes)
    assert copied is not model and copied.head is not model.head and notes == []
    for (name, mine), (_, theirs) in zip(
        model.named_parameters(), copied.named_parameters(), strict=True
    ):
        assert mine is theirs, name  # the weights are never duplicated
    copied.head.shape = torch.Size([1, 2, 3])
    assert model.head.shape is None  # what a tracer assigns lands on the copy only


class Unpicklable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.handle = open(__file__, "rb")  # noqa: SIM115  (deepcopy refuses an open file)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_tracing_copy_of_a_model_deepcopy_refuses_says_so() -> None:
    model = Unpicklable()
    try:
        notes: list[str] = []
        assert tracing_copy(model, notes) is model
        assert len(notes) == 1 and "could not be copied" in notes[0]
    finally:
        model.handle.close()


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("to", "dynamic"),
    [
        ("onnx", {"x": {0: "batch", 2: "height", 3: "width"}}),
        ("pt2", {"x": {0: "batch"}}),
    ],
)
def test_a_head_that_caches_in_forward_exports_and_verifies(
    tmp_path: Path, to: str, dynamic: dict[str, dict[int, str]]
) -> None:
    """The default exporter and pt2 used to fail with GuardOnDataDependentSymNode: the eager
    reference ran on the module the export had left holding fake anchors."""
    model = tiny_yolo()
    untouched = copy.deepcopy(model)
    path = tmp_path / f"yolo.{to}"
    report = export(model, path, {"x": torch.randn(2, 3, 32, 32)}, to=to, dynamic=dynamic)
    assert report.verified is True, [c for c in report.outputs if not c.ok]
    assert len({c.sample for c in report.outputs}) >= 5  # other sizes along dynamic axes too
    other = torch.randn(3, 3, 64, 64) if to == "onnx" else torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = untouched(other)
        assert torch.equal(model(other), expected)  # the caller's module still works
    if to == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"x": other.numpy()})[0])
    else:
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(other)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- a checkpoint dict that holds a pickled module (ultralytics) --------------------------------


def test_checkpoint_dict_gives_its_ema_module_only_with_trust_code(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    train_args = {"imgsz": 32, "epochs": 1}
    ema = tiny_yolo()
    torch.save({"model": None, "ema": ema, "optimizer": {}, "train_args": train_args}, path)
    with pytest.raises(ModelSpecError, match=r"checkpoint dict whose 'ema' is .*--trust-code"):
        build_model(path)
    with pytest.warns(CodeExecutionWarning, match=r"module under 'ema' \(no module under 'model'"):
        built = build_model(path, trust_code=True)
    oracle = torch.load(path, weights_only=False)["ema"]
    assert type(built) is type(oracle) is TinyYolo
    expected = oracle.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in built.state_dict().items())


def test_checkpoint_dict_prefers_its_model_over_its_ema(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    torch.save({"model": tiny_yolo(), "ema": Detect(), "train_args": {}}, path)
    with pytest.warns(CodeExecutionWarning, match="module under 'model'"):
        built = build_model(path, trust_code=True)
    assert type(built) is TinyYolo


@pytest.mark.heavy
def test_checkpoint_dict_exports_from_the_command_line(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "best.pt"
    torch.save({"model": None, "ema": tiny_yolo(), "train_args": {"imgsz": 32}}, path)
    argv = ["export", "--model", path, "--input", "x:1,3,32,32", "--to", "pt2", "--json"]
    refused = cli(*argv, tmp_path / "refused.pt2")
    assert refused.code == 2 and "--trust-code" in refused.json["error"]["message"]
    with pytest.warns(CodeExecutionWarning, match="module under 'ema'"):
        result = cli(*argv, "--trust-code", tmp_path / "yolo.pt2")
    assert result.code == 0, result.err
    assert result.json["verified"] is True and result.json["model"].endswith("TinyYolo")


# -- a diffusers component folder ---------------------------------------------------------------


def diffusers_config(folder: Path, class_name: str) -> Path:
    """A component folder's config.json, as ``save_pretrained`` writes its first keys."""
    folder.mkdir()
    config = {"_class_name": class_name, "_diffusers_version": "0.42.1", "sample_size": 8}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_diffusers_folder_without_diffusers_is_a_missing_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = diffusers_config(tmp_path / "unet", "UNet2DModel")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    with pytest.raises(MissingDependencyError, match=r"needs the 'diffusers' package"):
        build_model(folder)


def test_diffusers_pipeline_folder_names_its_components(tmp_path: Path) -> None:
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSpecError, match=r"\(scheduler, unet\).*one component folder"):
        build_model(tmp_path)


def tiny_unet_folder(tmp_path: Path) -> Path:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    unet.save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


@pytest.mark.heavy
def test_diffusers_unet_folder_builds_and_exports(tmp_path: Path, cli: Cli) -> None:
    import onnxruntime
    from diffusers import UNet2DModel

    folder = tiny_unet_folder(tmp_path)
    oracle = UNet2DModel.from_pretrained(folder).eval()
    built = resolve_model(folder)
    assert type(built) is UNet2DModel
    expected_state = oracle.state_dict()
    assert all(torch.equal(t, expected_state[k]) for k, t in built.state_dict().items())

    out = tmp_path / "unet.onnx"
    argv = ["export", "--model", folder, "--input", "sample:1,3,8,8", "--input", "timestep::int64"]
    result = cli(*argv, "--json", out)
    assert result.code == 0, result.err
    assert result.json["verified"] is True
    sample, timestep = torch.randn(1, 3, 8, 8), torch.tensor(7)
    with torch.no_grad():
        expected = oracle(sample, timestep).sample
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy()}
    got = torch.from_numpy(session.run(None, feeds)[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    pt2 = cli(*argv, "--to", "pt2", tmp_path / "unet.pt2")
    assert pt2.code == 0, pt2.err


@pytest.mark.heavy
def test_diffusers_config_naming_no_model_class_is_refused(tmp_path: Path) -> None:
    folder = diffusers_config(tmp_path / "scheduler", "DDPMScheduler")
    with pytest.raises(ModelSpecError, match="'DDPMScheduler' is not one of diffusers' models"):
        build_model(folder)


@pytest.mark.heavy
def test_a_config_transformers_cannot_build_is_a_model_spec_error(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4}))  # no model_type
    with pytest.raises(ModelSpecError, match=r"config.json: transformers .* builds no model"):
        build_model(folder)
