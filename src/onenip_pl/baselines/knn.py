"""A PatchCore-style nearest-neighbour baseline (Roth et al., CVPR 2022) on the same frozen backbone.

Why it is here: "is OneNIP better than a simple kNN on my parts?" is the first question a user asks,
and the answer only counts when both see the same images through the same backbone. The baseline keeps
every normal training patch's feature (strides 8 and 16, each 3x3 locally averaged, the stride-16 map
upsampled to stride 8 and concatenated), thins the bank to a coreset by greedy farthest-point selection
in a random projection, and scores a test patch by its distance to the nearest bank patch. One bank
serves every category, as one OneNIP model does. Maps are resized like OneNIP's and smoothed by a
Gaussian (sigma 4, as PatchCore), and the image score is OneNIP's: the maximum of a 16x16 mean filter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from onenip_pl.errors import ConfigError, DataError
from onenip_pl.models.backbone import Backbone
from onenip_pl.models.onenip import SCORE_POOL_SIZE

log = logging.getLogger(__name__)

STRIDES = (8, 16)
SMOOTHING_SIGMA = 4.0
DISTANCE_CHUNK = 1024


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of N×1×H×W maps, kernel 2·ceil(4σ)+1, reflected borders."""
    radius = math.ceil(4 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def greedy_coreset(
    features: Tensor, size: int, projection_dim: int = 128, batch: int = 64, seed: int = 0
) -> Tensor:
    """Indices of ``size`` rows chosen by farthest-point selection in a random projection.

    Each round adds the ``batch`` rows farthest from everything chosen so far, then updates the distances
    with one matrix product: the greedy k-center selection of PatchCore, ``batch`` points at a time, so
    that a bank of hundreds of thousands of patches is thinned in minutes on a CPU.
    """
    count = features.shape[0]
    if size >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(features.shape[1], projection_dim, generator=generator) / math.sqrt(
        projection_dim
    )
    projected = features @ projection.to(features)
    squared = projected.square().sum(dim=1)
    first = int(torch.randint(count, (1,), generator=generator))
    chosen = [torch.tensor([first])]
    nearest = _squared_distances(projected, squared, projected[[first]]).squeeze(1)
    nearest[first] = -1.0
    taken = 1
    while taken < size:
        step = min(batch, size - taken)
        picked = nearest.topk(step).indices
        chosen.append(picked)
        taken += step
        new = _squared_distances(projected, squared, projected[picked]).min(dim=1).values
        nearest = torch.minimum(nearest, new)
        nearest[picked] = -1.0
    return torch.cat(chosen)


def _squared_distances(rows: Tensor, row_norms: Tensor, centres: Tensor) -> Tensor:
    return (row_norms[:, None] - 2 * rows @ centres.T + centres.square().sum(dim=1)[None, :]).clamp_min_(0)


def nearest_distances(queries: Tensor, bank: Tensor, chunk: int = DISTANCE_CHUNK) -> Tensor:
    """Euclidean distance of each query row to its nearest bank row.

    min_b |q - b|^2 = |q|^2 + min_b (|b|^2 - 2 q.b): the query's norm does not take part in the search, so
    each chunk costs one matrix product written into a reused buffer (``addmm`` adds the bank norms in
    the same pass) and one row-wise minimum over contiguous memory, instead of building and rescanning a
    full distance matrix per chunk.
    """
    bank_norms = bank.square().sum(dim=1)
    buffer = torch.empty(min(chunk, len(queries)), len(bank), dtype=bank.dtype, device=bank.device)
    nearest = torch.empty(len(queries), dtype=bank.dtype, device=bank.device)
    for start in range(0, len(queries), chunk):
        rows = queries[start : start + chunk]
        products = buffer[: len(rows)]
        torch.addmm(bank_norms, rows, bank.T, beta=1.0, alpha=-2.0, out=products)
        nearest[start : start + len(rows)] = products.amin(dim=1) + rows.square().sum(dim=1)
    return nearest.clamp_min_(0).sqrt_()


class PatchKNN:
    """Fit on normal images, then score images: N×1×S×S anomaly maps and N image scores."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        image_size: int = 224,
        coreset_ratio: float = 0.1,
        pretrained: bool = True,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if not 0.0 < coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio={coreset_ratio} must lie in (0, 1]")
        self.device = torch.device(device)
        probe = Backbone(backbone, (0, 1, 2, 3, 4), pretrained=False)
        indices = [probe.strides.index(stride) for stride in STRIDES if stride in probe.strides]
        if len(indices) != len(STRIDES):
            raise ConfigError(f"backbone={backbone!r} has no feature maps at strides {STRIDES}")
        self.backbone = Backbone(backbone, indices, pretrained=pretrained, channels_last=True).to(self.device)
        config = self.backbone.pretrained_cfg
        self.mean = torch.tensor(config["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"], device=self.device).view(1, 3, 1, 1)
        self.image_size = image_size
        self.coreset_ratio = coreset_ratio
        self.seed = seed
        self.bank: Tensor | None = None

    @torch.no_grad()
    def patch_features(self, images: Tensor) -> Tensor:
        """N×C×h×w features at stride 8 of images N×3×S×S in [0, 1]."""
        maps = self.backbone((images.to(self.device) - self.mean) / self.std)
        size = maps[0].shape[-2:]
        averaged = [F.avg_pool2d(m, 3, stride=1, padding=1) for m in maps]
        resized = [
            m if m.shape[-2:] == size else F.interpolate(m, size, mode="bilinear", align_corners=True)
            for m in averaged
        ]
        return torch.cat(resized, dim=1).float()

    def fit(self, batches: Iterable[Tensor]) -> int:
        """Build the bank from batches of normal images (N×3×S×S in [0, 1]); returns its size."""
        patches = [self.patch_features(images).permute(0, 2, 3, 1).flatten(0, 2).cpu() for images in batches]
        if not patches:
            raise DataError("the kNN baseline got no normal image to build its memory bank from")
        everything = torch.cat(patches)
        size = max(1, round(self.coreset_ratio * len(everything)))
        keep = greedy_coreset(everything, size, seed=self.seed)
        self.bank = everything[keep].to(self.device)
        log.info(
            "kNN bank: %d of %d normal patches (coreset %.0f %%)",
            len(keep),
            len(everything),
            100 * self.coreset_ratio,
        )
        return len(keep)

    @torch.no_grad()
    def score(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Anomaly maps N×1×S×S (distance to the nearest normal patch, resized and smoothed) and image
        scores N (the maximum of the 16x16 mean-filtered map)."""
        if self.bank is None:
            raise ConfigError("call fit() with normal images before score()")
        features = self.patch_features(images)
        count, _, height, width = features.shape
        distances = nearest_distances(features.permute(0, 2, 3, 1).flatten(0, 2), self.bank)
        distances = distances.view(count, 1, height, width)
        size = (self.image_size, self.image_size)
        maps = gaussian_blur(
            F.interpolate(distances, size, mode="bilinear", align_corners=True), SMOOTHING_SIGMA
        )
        scores = F.avg_pool2d(maps, SCORE_POOL_SIZE, stride=1).flatten(1).amax(dim=1)
        return maps, scores
