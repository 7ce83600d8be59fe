"""Per-region overlap (PRO) weights and the area under the PRO curve up to a false positive rate limit.

PRO at a threshold is the mean, over every connected ground-truth region of the category, of the
fraction of that region's pixels scoring at or above the threshold (regions are 8-connected within one
image, as in the MVTec AD evaluation). Giving each positive pixel the weight ``1 / (|region| · #regions)``
turns PRO into a running sum over the sorted scores, which :func:`~onenip_pl.metrics.ranking.sweep_exact`
already accumulates, so AUPRO costs one extra cumulative sum instead of a pass per threshold.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from onenip_pl.errors import DataError
from onenip_pl.metrics.ranking import ThresholdSweep, roc_points

__all__ = ["DEFAULT_FPR_LIMIT", "area_under_pro", "region_weights"]

DEFAULT_FPR_LIMIT = 0.3
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def region_weights(masks: Tensor) -> Tensor:
    """Weight of every positive pixel, in the order of ``masks.reshape(-1)`` restricted to positives.

    ``masks`` is a boolean [N, H, W] tensor. Components are labelled on the CPU with scipy (a one-off,
    linear pass over the masks); the weights come back on the masks' device, float64, summing to 1.
    """
    masks_cpu = masks.detach().to(device="cpu", dtype=torch.bool).numpy()
    inverse_sizes: list[np.ndarray] = []
    num_regions = 0
    for mask in masks_cpu:
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(components.ravel())
        inverse_sizes.append(1.0 / sizes[components[mask]])
        num_regions += count
    if num_regions == 0:
        return torch.zeros(0, dtype=torch.float64, device=masks.device)
    return torch.from_numpy(np.concatenate(inverse_sizes) / num_regions).to(masks.device)


def area_under_pro(sweep: ThresholdSweep, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Area under the PRO-versus-FPR curve from 0 to ``fpr_limit``, divided by ``fpr_limit``.

    The curve is linearly interpolated at ``fpr_limit`` when no threshold lands on it exactly. NaN when
    the category has no positive pixel or no negative pixel.
    """
    if sweep.weighted_true_positives is None:
        raise DataError(
            "the sweep carries no region weights; build it with positive_weights=region_weights(masks)"
        )
    if not sweep.is_defined:
        return math.nan
    fpr, _ = roc_points(sweep)
    overlap = sweep.weighted_true_positives
    pro = torch.cat([overlap.new_zeros(1), overlap]).clamp(0.0, 1.0)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _area_up_to(x: Tensor, y: Tensor, x_limit: float) -> float:
    """Trapezoidal area under y(x) for x in [x_0, x_limit]; x must be non-decreasing."""
    inside = int(torch.searchsorted(x, torch.tensor([x_limit], dtype=x.dtype, device=x.device), right=True))
    x_in, y_in = x[:inside], y[:inside]
    area = float(torch.sum((x_in[1:] - x_in[:-1]) * (y_in[1:] + y_in[:-1]))) / 2
    if inside < x.numel():
        x0, x1, y0, y1 = float(x[inside - 1]), float(x[inside]), float(y[inside - 1]), float(y[inside])
        if x0 < x_limit:
            y_limit = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
            area += (x_limit - x0) * (y0 + y_limit) / 2
    return area
