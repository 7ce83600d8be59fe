"""Supervised refiner (spec §6): turns the reconstruction residual |F_hat - F| into an anomaly logit map."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from onenip_pl.models.reconstructor import init_xavier


class RefinerStage(nn.Module):
    """Conv3x3 (no bias) -> BatchNorm -> ReLU -> ConvTranspose 2x2 stride 2: doubles the resolution."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.upsample = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample(F.relu(self.norm(self.conv(x))))


class Refiner(nn.Module):
    """Two stages (stride 16 -> 4), a 1x1 predictor, bilinear resize (align_corners=True) to S."""

    def __init__(self, in_channels: int, channels: int = 128) -> None:
        super().__init__()
        self.stages = nn.ModuleList([RefinerStage(in_channels, channels), RefinerStage(channels, channels)])
        self.predictor = nn.Conv2d(channels, 1, kernel_size=1)
        init_xavier(self)

    def forward(self, residual: Tensor, image_size: int) -> Tensor:
        """Logits N x 1 x image_size x image_size from the residual N x C x h x w."""
        x = residual
        for stage in self.stages:
            x = stage(x)
        logits = self.predictor(x)
        return F.interpolate(logits, size=(image_size, image_size), mode="bilinear", align_corners=True)
