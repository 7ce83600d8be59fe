"""Rules that turn held-out scores into a decision threshold, fixed before any test image is seen.

- ``quantile``: the q-quantile of normal image scores, and another (higher) q of normal pixels: a
  false-alarm budget of 1 - q on normal parts. Needs normal images only. A map has some 10^4-10^5
  pixels, so the pixel quantile must be far higher than the image one to flag a handful of them.
- ``f1``: the threshold that maximises F1 on normal images plus synthetic anomalies made from them (the
  same synthesis as training). Needs no real defect, and adapts to how far a category's anomalies score
  above its normals, which a fixed quantile does not.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from onenip_pl.errors import ConfigError, check_choice

THRESHOLD_RULES = ("quantile", "f1")
# the model settings that decide how thresholds are fixed (also attributes of the post-processor)
RULE_SETTINGS = ("threshold_rule", "threshold_quantile", "pixel_threshold_quantile")


def check_rule(rule: str, quantiles: dict[str, float]) -> None:
    """``quantiles`` by setting name, e.g. ``{"model.threshold_quantile": 0.9}``."""
    check_choice("model.threshold_rule", rule, THRESHOLD_RULES)
    for setting, quantile in quantiles.items():
        if not 0.0 < quantile < 1.0:
            raise ConfigError(f"{setting}={quantile} must lie strictly between 0 and 1")


def quantile_threshold(normal_values: Tensor, q: float) -> float:
    """Linear-interpolated quantile (without torch.quantile's 16M-element limit); NaN for no value."""
    if normal_values.numel() == 0:
        return math.nan
    return float(np.quantile(normal_values.double().numpy(), q))


def f1_threshold(values: Tensor, labels: Tensor) -> float:
    """The threshold t maximising F1 of the decision ``value >= t``, midway between the lowest value it
    flags and the highest it does not (so that a slightly different score decides the same way).
    Without an anomalous value there is no F1 to maximise: NaN."""
    values, labels = values.double().flatten(), labels.bool().flatten()
    positives = int(labels.sum())
    if positives == 0 or values.numel() == 0:
        return math.nan
    order = torch.argsort(values, descending=True)
    sorted_values, sorted_labels = values[order], labels[order]
    true_positives = torch.cumsum(sorted_labels.double(), 0)
    flagged = torch.arange(1, len(values) + 1, dtype=torch.float64)
    # only the last of a run of equal values is a possible cut: ties are decided together
    cuts = torch.ones(len(values), dtype=torch.bool)
    cuts[:-1] = sorted_values[:-1] != sorted_values[1:]
    f1 = torch.where(cuts, 2 * true_positives / (flagged + positives), torch.zeros(()).double())
    best = int(torch.argmax(f1))
    below = sorted_values[best + 1] if best + 1 < len(values) else sorted_values[best] - 1.0
    return float((sorted_values[best] + below) / 2)


def threshold(rule: str, values: Tensor, labels: Tensor, quantile: float) -> float:
    """Apply ``rule`` to a category's values (scores or pixels) with labels (0 normal, 1 synthetic)."""
    if rule == "quantile":
        return quantile_threshold(values[~labels.bool()], quantile)
    return f1_threshold(values, labels)
