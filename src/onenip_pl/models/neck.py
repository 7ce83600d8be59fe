"""Multi-scale neck (spec §4): every backbone map resized to the stride-16 token grid, then concatenated."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Neck(nn.Module):
    """Bilinear resize, align_corners=True (the authors' UpsamplingBilinear2d), then channel concatenation."""

    def __init__(self, feature_size: int) -> None:
        super().__init__()
        self.feature_size = feature_size

    def forward(self, maps: list[Tensor]) -> Tensor:
        size = (self.feature_size, self.feature_size)
        resized = [
            m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=True)
            for m in maps
        ]
        return torch.cat(resized, dim=1)
