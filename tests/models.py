"""Small real architectures for tests and the demo: random init, tiny configs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class TinyResNet(nn.Module):
    """A ResNet-style CNN (torchvision does not install beside the torch 2.13 CPU wheel)."""

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = nn.Sequential(BasicBlock(width), BasicBlock(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer1(self.stem(x))), 1))


class TiedLM(nn.Module):
    """An embedding tied to the output projection, as GPT-2 does."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


def trained_checkpoint(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """A training checkpoint as people write them: epoch, weights, Adam state, loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(example).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    return {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": float(loss.detach()),
    }


def dtype_zoo() -> dict[str, torch.Tensor]:
    """One tensor per interesting case: dtypes, 0-d, empty, non-contiguous views."""
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    return {
        "f32": torch.randn(3, 5),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "f16": torch.randn(4, 3).half(),
        "bf16": torch.randn(4, 3).bfloat16(),
        "fp8": torch.randn(8).to(torch.float8_e4m3fn),
        "fp8_e5m2": torch.randn(8).to(torch.float8_e5m2),
        "i64": torch.arange(10, dtype=torch.int64),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i8": torch.tensor([-3, 0, 7], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": base.t(),
        "sliced": base[1:4, ::2],
        "view_of_base": base[2],
        "base": base,
    }


class Router(nn.Module):
    """Control flow fixed by the config, not the data (a flag, a loop over layers), three
    inputs, and a tuple output holding a dict: what export must flatten and name."""

    def __init__(self, dim: int = 8, layers: int = 2, gated: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.gated = gated
        self.gate = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = x
        for block in self.blocks:
            hidden = torch.relu(block(hidden)) + hidden
        if self.gated:
            hidden = hidden * torch.sigmoid(self.gate(x))
        hidden = hidden * mask.unsqueeze(-1)
        logits = self.head(hidden).mean(1)
        if scale is not None:
            logits = logits * scale
        return logits, {"hidden": hidden, "pooled": hidden.sum(1)}
