"""The deployed graph: what the ONNX / torch.export file computes.

It runs OneNIP's one scoring path (``OneNIP.score``: every query reconstructed from each of a category's K
prompt features, the K maps averaged, the image score taken from the averaged map), so the exported file
and the Python detector can only differ by the runtime's arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onenip_pl.models import OneNIP


class Uint8Scorer(nn.Module):
    """uint8 RGB images N×S×S×3 (NHWC, as decoders return them) and prompt features K×C×h×w -> anomaly
    map N×1×S×S and image score N."""

    def __init__(self, net: OneNIP) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor, prompt_features: Tensor) -> tuple[Tensor, Tensor]:
        images = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.net.score(self.net.extract_features(images), prompt_features)


class Uint8Encoder(nn.Module):
    """uint8 RGB images N×S×S×3 -> neck features N×C×h×w (what a prompt is stored as)."""

    def __init__(self, net: OneNIP) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        return self.net.extract_features(image.permute(0, 3, 1, 2).to(torch.float32) / 255.0)
