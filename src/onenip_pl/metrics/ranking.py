"""Threshold sweeps and the ranking metrics computed from them (AUROC, AP, F1max).

A :class:`ThresholdSweep` holds, for thresholds from the highest to the lowest, how many positives
and negatives score at or above the threshold. Every metric of the suite is a reduction of one sweep,
so a category is sorted once and AUROC, AP, F1max and AUPRO all reuse that work.

The exact sweep needs only the thresholds at which the set of predicted positives changes around a
positive sample, so it sorts the negatives once (integer radix sort of the float bits, which is much
faster than a float sort and keeps ties intact), sorts the few positives and locates every positive
score among the negatives with a binary search. The result is the same curve scikit-learn builds from
all distinct scores, with the purely-negative stretches collapsed into single straight segments, so
areas and maxima are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from onenip_pl.errors import ConfigError, DataError

__all__ = [
    "ThresholdSweep",
    "auroc",
    "average_precision",
    "f1_max",
    "pr_points",
    "roc_points",
    "sweep_binned",
    "sweep_exact",
]


@dataclass(frozen=True)
class ThresholdSweep:
    """Counts at or above each threshold, thresholds in decreasing order (the last keeps every sample).

    ``weighted_true_positives`` is the running sum of per-positive weights (for AUPRO: the mean overlap
    with the ground-truth regions); it is ``None`` when no weights were given.
    """

    true_positives: Tensor
    false_positives: Tensor
    num_positives: int
    num_negatives: int
    weighted_true_positives: Tensor | None = None

    @property
    def is_defined(self) -> bool:
        """A ranking metric needs at least one positive and one negative sample."""
        return self.num_positives > 0 and self.num_negatives > 0


def sweep_exact(scores: Tensor, labels: Tensor, positive_weights: Tensor | None = None) -> ThresholdSweep:
    """Exact sweep over every distinct score; equal scores share one threshold (ties are kept).

    ``positive_weights`` (optional) has one value per positive sample, in the order of
    ``scores[labels]``.
    """
    scores, labels = _flatten_pair(scores, labels)
    keys = _descending_keys(scores)
    negative_keys = torch.sort(keys[~labels]).values
    positive_keys, positive_order = torch.sort(keys[labels])
    num_positives, num_negatives = positive_keys.numel(), negative_keys.numel()

    group_ends = _ends_of_equal_runs(positive_keys)
    group_keys = positive_keys[group_ends]
    positives_through_group = group_ends + 1
    positives_before_group = torch.cat([positives_through_group.new_zeros(1), positives_through_group])[:-1]
    negatives_at_or_above = torch.searchsorted(negative_keys, group_keys, right=True)
    negatives_above = torch.searchsorted(negative_keys, group_keys, right=False)

    # Two points per group of equal positive scores: just above the group, then at it.
    true_positives = _interleave_and_close(positives_before_group, positives_through_group, num_positives)
    false_positives = _interleave_and_close(negatives_above, negatives_at_or_above, num_negatives)
    weighted = None
    if positive_weights is not None:
        _check_weights(positive_weights, num_positives)
        weights = positive_weights.reshape(-1).to(device=scores.device, dtype=torch.float64)
        sorted_weights = weights[positive_order]
        cumulative = torch.cat([sorted_weights.new_zeros(1), torch.cumsum(sorted_weights, 0)])
        weighted = _interleave_and_close(
            cumulative[positives_before_group], cumulative[positives_through_group], cumulative[-1]
        )
    return ThresholdSweep(true_positives, false_positives, num_positives, num_negatives, weighted)


def sweep_binned(
    scores: Tensor, labels: Tensor, num_bins: int, positive_weights: Tensor | None = None
) -> ThresholdSweep:
    """Approximate sweep on ``num_bins`` evenly spaced thresholds between the lowest and highest score.

    Scores falling in the same bin become ties, so the metrics are those of the quantised scores: close
    to the exact ones for a fine grid, never identical in general. Cost is linear (a histogram, no sort).
    """
    if num_bins < 2:
        raise ConfigError(f"num_bins must be at least 2 for a binned sweep, got {num_bins}")
    scores, labels = _flatten_pair(scores, labels)
    bins_by_class = quantise(_as_sortable_float(scores), num_bins).add_(labels, alpha=num_bins)
    counts = torch.bincount(bins_by_class, minlength=2 * num_bins).view(2, num_bins)
    negatives_per_bin, positives_per_bin = counts[0].flip(0), counts[1].flip(0)
    occupied = (negatives_per_bin + positives_per_bin) > 0
    true_positives = torch.cumsum(positives_per_bin, 0)[occupied]
    false_positives = torch.cumsum(negatives_per_bin, 0)[occupied]
    num_positives = int(positives_per_bin.sum())
    weighted = None
    if positive_weights is not None:
        _check_weights(positive_weights, num_positives)
        weights = positive_weights.reshape(-1).to(device=scores.device, dtype=torch.float64)
        positive_bins = bins_by_class[labels] - num_bins
        weight_per_bin = torch.bincount(positive_bins, weights=weights, minlength=num_bins).flip(0)
        weighted = torch.cumsum(weight_per_bin, 0)[occupied]
    num_negatives = labels.numel() - num_positives
    return ThresholdSweep(true_positives, false_positives, num_positives, num_negatives, weighted)


def quantise(scores: Tensor, num_bins: int) -> Tensor:
    """Bin index (int64) of each score on ``num_bins`` even steps from its minimum to its maximum."""
    low, high = scores.min(), scores.max()
    if not bool(torch.isfinite(high - low)):  # the range overflows float32: work in float64
        scores, low, high = scores.double(), low.double(), high.double()
    span = float(high - low)
    if span == 0.0:
        return torch.zeros(scores.shape, dtype=torch.int64, device=scores.device)
    scaled = (scores - low).mul_((num_bins - 1) / span)
    return scaled.to(torch.int64).clamp_(0, num_bins - 1)


def auroc(sweep: ThresholdSweep) -> float:
    """Area under the ROC curve (trapezoids, as scikit-learn); NaN when one class is absent.

    The sum runs over integer counts, so the only rounding is the final division.
    """
    if not sweep.is_defined:
        return math.nan
    tp = _with_origin(sweep.true_positives)
    fp = _with_origin(sweep.false_positives)
    doubled_area = torch.sum((fp[1:] - fp[:-1]) * (tp[1:] + tp[:-1]))
    return int(doubled_area) / (2 * sweep.num_positives * sweep.num_negatives)


def average_precision(sweep: ThresholdSweep) -> float:
    """Step-wise average precision, sum of recall increments times precision (as scikit-learn)."""
    if not sweep.is_defined:
        return math.nan
    tp = sweep.true_positives.to(torch.float64)
    recall_gain = torch.diff(tp, prepend=tp.new_zeros(1))
    gains = recall_gain > 0
    precision = tp[gains] / (tp[gains] + sweep.false_positives[gains].to(torch.float64))
    return float(torch.sum(recall_gain[gains] * precision)) / sweep.num_positives


def f1_max(sweep: ThresholdSweep) -> float:
    """Best F1 score over all thresholds (F1 = 2·TP / (2·TP + FP + FN))."""
    if not sweep.is_defined:
        return math.nan
    tp = sweep.true_positives.to(torch.float64)
    f1 = 2 * tp / (tp + sweep.false_positives.to(torch.float64) + sweep.num_positives)
    return float(f1.max())


def roc_points(sweep: ThresholdSweep) -> tuple[Tensor, Tensor]:
    """(false positive rate, true positive rate) from (0, 0) to (1, 1), float64."""
    fpr = _with_origin(sweep.false_positives).to(torch.float64) / max(sweep.num_negatives, 1)
    tpr = _with_origin(sweep.true_positives).to(torch.float64) / max(sweep.num_positives, 1)
    return fpr, tpr


def pr_points(sweep: ThresholdSweep) -> tuple[Tensor, Tensor]:
    """(recall, precision) at each threshold, highest threshold first, float64."""
    tp = sweep.true_positives.to(torch.float64)
    predicted = tp + sweep.false_positives.to(torch.float64)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.ones_like(tp))
    return tp / max(sweep.num_positives, 1), precision


def _flatten_pair(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    if scores.numel() != labels.numel():
        raise DataError(f"{scores.numel()} scores but {labels.numel()} labels; they must pair one to one")
    return scores, labels.to(device=scores.device, dtype=torch.bool)


def _descending_keys(scores: Tensor) -> Tensor:
    """Integers whose ascending order is the scores' descending order, equal for equal scores.

    Integer sorts are radix sorts in torch (several times faster than float sorts) and the mapping is
    exact: IEEE-754 bits read as signed integers are monotonic for non-negative floats and reversed for
    negative ones, which the XOR undoes. ``-0.0`` is folded into ``+0.0`` first because they compare equal.
    """
    scores = _as_sortable_float(scores)
    if scores.dtype == torch.float64:
        int_dtype, magnitude_bits = torch.int64, torch.iinfo(torch.int64).max
    else:
        int_dtype, magnitude_bits = torch.int32, torch.iinfo(torch.int32).max
    scores = torch.where(scores == 0, torch.zeros_like(scores), scores).contiguous()
    bits = scores.view(int_dtype)
    ascending = torch.where(bits < 0, bits ^ magnitude_bits, bits)
    return torch.bitwise_not(ascending)


def _as_sortable_float(scores: Tensor) -> Tensor:
    """float32 or float64 holding exactly the same values.

    float16/bfloat16 widen to float32 without rounding; integers go to float64 (exact below 2**53).
    """
    if scores.dtype in (torch.float32, torch.float64):
        return scores
    return scores.to(torch.float32 if scores.is_floating_point() else torch.float64)


def _ends_of_equal_runs(sorted_values: Tensor) -> Tensor:
    """Index of the last element of each run of equal values in a sorted 1-D tensor."""
    if sorted_values.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=sorted_values.device)
    is_end = torch.ones_like(sorted_values, dtype=torch.bool)
    is_end[:-1] = sorted_values[1:] != sorted_values[:-1]
    return torch.nonzero(is_end).squeeze(1)


def _interleave_and_close(before: Tensor, at: Tensor, final: float | int | Tensor) -> Tensor:
    """[before_0, at_0, before_1, at_1, ..., final]; the closing point predicts every sample positive."""
    pairs = torch.stack([before, at], dim=1).reshape(-1)
    closing = torch.as_tensor(final, dtype=pairs.dtype, device=pairs.device).reshape(1)
    return torch.cat([pairs, closing])


def _with_origin(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), counts])


def _check_weights(weights: Tensor, num_positives: int) -> None:
    if weights.reshape(-1).numel() != num_positives:
        raise DataError(f"expected one weight per positive sample ({num_positives}), got {weights.numel()}")
