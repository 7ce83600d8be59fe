"""The inference computation shared by the Python detector and the exported graphs.

One module computes what deployment needs from query images and a category's K prompt features: every query
is reconstructed from each of the K prompts, the K fused maps are averaged and the image score is taken from
the averaged map. The detector and the ONNX export run this same module, so their outputs can only differ
by the runtime's arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onenip_pl.models import OneNIP


class PromptedScorer(nn.Module):
    """(images N×3×S×S in [0, 1], prompt features K×C×h×w) -> (anomaly map N×1×S×S, image score N)."""

    def __init__(self, net: OneNIP) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor, prompt_features: Tensor) -> tuple[Tensor, Tensor]:
        return self.score_features(self.net.extract_features(images), prompt_features)

    def score_features(self, query_features: Tensor, prompt_features: Tensor) -> tuple[Tensor, Tensor]:
        """The same from neck features already extracted (prompt retrieval needs them first)."""
        num_images, num_prompts = query_features.shape[0], prompt_features.shape[0]
        # pair j = n·K + k: the reconstructor gives prompt j mod K to query j
        paired = query_features.repeat_interleave(num_prompts, dim=0)
        reconstruction = self.net.reconstruct(paired, prompt_features)
        logit = self.net.refine(reconstruction, paired)
        maps = self.net.anomaly_maps(paired, reconstruction, logit)
        size = maps["rec_map"].shape[-2:]
        rec_map = maps["rec_map"].reshape(num_images, num_prompts, 1, *size).mean(dim=1)
        refiner_map = maps["refiner_map"].reshape(num_images, num_prompts, 1, *size).mean(dim=1)
        # fusion is linear, so fusing the averaged maps equals averaging the fused ones
        return self.net.fuse(rec_map, refiner_map)


class Uint8Scorer(nn.Module):
    """The deployed graph: uint8 RGB images N×S×S×3 (NHWC, as decoders return them) -> map and score."""

    def __init__(self, net: OneNIP) -> None:
        super().__init__()
        self.scorer = PromptedScorer(net)

    def forward(self, image: Tensor, prompt_features: Tensor) -> tuple[Tensor, Tensor]:
        images = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.scorer(images, prompt_features)
