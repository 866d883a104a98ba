"""Modules shaped like an ultralytics detection model (Conv = Conv2d + BatchNorm2d + SiLU, C2f
blocks of Bottlenecks, a Detect head with a branch per scale), tiny: what ``torch.save`` of a
YOLO checkpoint pickles whole, for what ``inspect`` prints of it."""

from __future__ import annotations

from torch import nn


class Conv(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 1)
        self.cv2 = Conv(c2 * 2, c2, 1)
        self.m = nn.ModuleList(Bottleneck(c2 // 2) for _ in range(n))


def _branch(c: int, out: int) -> nn.Sequential:
    return nn.Sequential(Conv(c, 4, 3), Conv(4, 4, 3), nn.Conv2d(4, out, 1))


class Detect(nn.Module):
    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.cv2 = nn.ModuleList(_branch(c, 4) for c in channels)
        self.cv3 = nn.ModuleList(_branch(c, 2) for c in channels)


class DetectionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        backbone = [Conv(3, 4, 3), Conv(4, 8, 3), C2f(8, 8, 1), Conv(8, 8, 3), C2f(8, 8, 2)]
        backbone += [Conv(8, 8, 3), C2f(8, 8, 2), Conv(8, 8, 3), C2f(8, 8, 1)]
        head = [nn.Upsample(scale_factor=2), C2f(16, 8, 1), nn.Upsample(scale_factor=2)]
        head += [C2f(16, 8, 1), Conv(8, 8, 3), C2f(16, 8, 1), Conv(8, 8, 3), C2f(16, 8, 1)]
        self.model = nn.Sequential(*backbone, *head, Detect((8, 8, 8)))
