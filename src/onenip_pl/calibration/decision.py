"""The one decision rule: a value at or above its threshold is anomalous.

Every path that turns a score or a map into a verdict calls these (test F1, predict, the detector, the
overlays and grids, the exported metadata, the server), so a score lying exactly on a threshold is
decided the same way everywhere. ``>=`` matches the threshold rules: the F1 rule's cut is the lowest
value it flags, and a quantile threshold flags the values at the quantile itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch

RULE_TEXT = "anomalous when value >= threshold"


def has_threshold(threshold: float | None) -> bool:
    """False for a missing or non-finite threshold (an uncalibrated checkpoint, the test-set fusion)."""
    return threshold is not None and math.isfinite(threshold)


def decide(score: float, threshold: float | None) -> bool | None:
    """The verdict for one image score; None when there is no threshold to decide by."""
    return bool(score >= threshold) if has_threshold(threshold) else None


def anomalous_region(values: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray | torch.Tensor:
    """Elementwise verdicts for scores or map pixels (a boolean array or tensor of the same shape)."""
    return values >= threshold
