"""The evaluator: everything a test reports per category, from fused maps and scores.

The metric suite (AUROC, AP, F1max, AUPRO), F1 at the decision thresholds fixed before the test (beside
F1max, which picks its threshold on the test itself), and how often label-free prompt retrieval found the
image's own category. Works under DDP: the states are gathered over ranks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from onenip_pl.calibration.decision import anomalous_region
from onenip_pl.distributed import gather_objects
from onenip_pl.metrics.suite import AnomalyMetrics, CategoryData, summarize

log = logging.getLogger(__name__)

VALIDATION_METRICS = ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AP")
ThresholdLookup = Callable[[str], tuple[float, float]]
_COLUMN_GROUPS = {"image": 0, "pixel": 1}


def f1_at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> float:
    """F1 of the one decision rule at a threshold fixed before the test (unlike F1max); NaN when there is
    neither an anomaly nor a false alarm to count."""
    predicted = anomalous_region(scores, threshold)
    actual = labels.bool()
    true_positives = int((predicted & actual).sum())
    errors = int((predicted ^ actual).sum())
    denominator = 2 * true_positives + errors
    return 2 * true_positives / denominator if denominator else float("nan")


def grouped_columns(values: dict[str, float]) -> dict[str, float]:
    """Image metrics, then pixel metrics, then the rest, each group in its own order (stable sort)."""
    return dict(sorted(values.items(), key=lambda item: _COLUMN_GROUPS.get(item[0].split("_", 1)[0], 2)))


class Evaluator(nn.Module):
    """Accumulates a test's fused maps and scores; :meth:`compute` gives the per-category results."""

    def __init__(self, binned: bool = False, metrics: Sequence[str] | None = None) -> None:
        super().__init__()
        self.metrics = AnomalyMetrics(binned=binned) if metrics is None else AnomalyMetrics(metrics, binned)
        self.retrieval_pairs: list[tuple[str, str]] = []
        self._data: dict[str, CategoryData] | None = None

    def reset(self) -> None:
        self.metrics.reset()
        self.retrieval_pairs = []
        self._data = None

    def update(
        self,
        anomaly_maps: Tensor,
        image_scores: Tensor,
        labels: Tensor,
        masks: Tensor,
        categories: Sequence[str],
    ) -> None:
        """Add a batch: fused maps and image scores (in the order ``OneNIP.fuse`` returns them), labels,
        masks and category names."""
        self.metrics.update(image_scores.float(), labels, anomaly_maps.float(), masks, list(categories))
        self._data = None

    def add_retrievals(self, categories: Sequence[str], retrieved: Sequence[str]) -> None:
        """The true and the retrieved category of each image of a batch."""
        self.retrieval_pairs.extend(zip(categories, retrieved, strict=True))

    def category_data(self) -> dict[str, CategoryData]:
        """The gathered maps, scores and masks by category, gathered once per test (a collective under
        DDP the first time: call it on every rank)."""
        if self._data is None:
            self._data = self.metrics.category_data()
        return self._data

    def compute(
        self, thresholds: ThresholdLookup | None = None, unseen: Sequence[str] = ()
    ) -> dict[str, Any]:
        """``{"per_category": ..., "mean": ...}``; with ``thresholds`` (category -> (image, pixel)) also
        ``image_F1`` and ``pixel_F1``, the F1 of the decisions at the thresholds fixed before the test; with
        ``unseen`` categories (not trained on) also the means of the seen and of the unseen ones."""
        per_category = {c: dict(v) for c, v in self.metrics.compute()["per_category"].items()}
        if thresholds is not None:
            for category, category_data in self.category_data().items():
                _add_threshold_f1(per_category[category], category_data, *thresholds(category))
        self._add_retrieval_accuracy(per_category)
        results = summarize({c: grouped_columns(v) for c, v in per_category.items()})
        unseen = [c for c in results["per_category"] if c in set(unseen)]
        if unseen:
            groups = {"seen": [c for c in results["per_category"] if c not in unseen], "unseen": unseen}
            results["groups"] = {
                name: summarize({c: results["per_category"][c] for c in members})["mean"]
                for name, members in groups.items()
                if members
            }
            results["unseen_categories"] = unseen
        return results

    def _add_retrieval_accuracy(self, per_category: dict[str, dict[str, float]]) -> None:
        pairs = [pair for chunk in gather_objects(self.retrieval_pairs) for pair in chunk]
        if not pairs:
            return
        total = Counter(true for true, _ in pairs)
        correct = Counter(true for true, retrieved in pairs if true == retrieved)
        for category, values in per_category.items():
            values["retrieval_accuracy"] = correct[category] / total[category] if total[category] else np.nan
        log.info(
            "Prompt retrieval picked the true category for %d of %d test images (%.2f %%)",
            sum(correct.values()),
            len(pairs),
            100 * sum(correct.values()) / len(pairs),
        )


def _add_threshold_f1(
    values: dict[str, float], data: CategoryData, image_threshold: float, pixel_threshold: float
) -> None:
    if any(name.startswith("image_") for name in values):
        values["image_F1"] = f1_at_threshold(data.image_scores, data.image_labels, image_threshold)
    if data.anomaly_maps is not None:
        values["pixel_F1"] = f1_at_threshold(data.anomaly_maps, data.masks, pixel_threshold)


def flat_results(results: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{prefix/metric: mean}`` and ``{prefix/category/metric: value}``, as loggers take them."""
    flat = {f"{prefix}/{name}": value for name, value in results["mean"].items()}
    for group, values in results.get("groups", {}).items():
        flat.update({f"{prefix}/{group}/{name}": value for name, value in values.items()})
    for category, values in results["per_category"].items():
        flat.update({f"{prefix}/{category}/{name}": value for name, value in values.items()})
    return flat


def validation_evaluator(binned: bool = False) -> Evaluator:
    """The validation split's evaluator: threshold-free metrics that need no real defect."""
    return Evaluator(binned, VALIDATION_METRICS)
