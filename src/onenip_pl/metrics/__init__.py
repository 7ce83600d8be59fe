"""Anomaly-detection metrics (exact AUROC, AP, F1max and AUPRO per category) and report writers."""

from onenip_pl.metrics.aupro import DEFAULT_FPR_LIMIT, area_under_pro, region_weights
from onenip_pl.metrics.ranking import (
    ThresholdSweep,
    auroc,
    average_precision,
    f1_max,
    pr_points,
    roc_points,
    sweep_binned,
    sweep_exact,
)
from onenip_pl.metrics.suite import (
    ALL_METRICS,
    DEFAULT_NUM_BINS,
    IMAGE_METRICS,
    PIXEL_METRICS,
    AnomalyMetrics,
    CategoryData,
    MetricUndefinedWarning,
    check_metric_names,
    compute_category_metrics,
    summarize,
)

__all__ = [
    "ALL_METRICS",
    "DEFAULT_FPR_LIMIT",
    "DEFAULT_NUM_BINS",
    "IMAGE_METRICS",
    "PIXEL_METRICS",
    "AnomalyMetrics",
    "CategoryData",
    "MetricUndefinedWarning",
    "ThresholdSweep",
    "auroc",
    "area_under_pro",
    "average_precision",
    "check_metric_names",
    "compute_category_metrics",
    "f1_max",
    "pr_points",
    "region_weights",
    "roc_points",
    "summarize",
    "sweep_binned",
    "sweep_exact",
]
