"""The anomaly-detection metric suite: per-category image and pixel metrics, their mean, and a
torchmetrics ``Metric`` that accumulates a test set across batches and DDP ranks.

Metric names (all "higher is better", values in [0, 1]):

- ``image_AUROC``, ``image_AP``, ``image_F1max``: from one anomaly score per image.
- ``pixel_AUROC``, ``pixel_AP``, ``pixel_F1max``: over every pixel of the category's maps.
- ``pixel_AUPRO``: area under the per-region-overlap curve up to a false positive rate of 0.3, divided
  by 0.3 (MVTec AD protocol, 8-connected regions).

Exact by default (scikit-learn's values, ties included). ``binned=True`` thresholds on a fixed grid
of ``num_bins`` steps between each category's lowest and highest score instead of sorting: linear time,
approximate. A metric that needs both classes is NaN, with a :class:`MetricUndefinedWarning`, when a
category has only one; no value is ever flipped (an AUROC below 0.5 stays below 0.5).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from onenip_pl.errors import ConfigError, DataError
from onenip_pl.metrics.aupro import area_under_pro, region_weights
from onenip_pl.metrics.ranking import (
    ThresholdSweep,
    auroc,
    average_precision,
    f1_max,
    sweep_binned,
    sweep_exact,
)

__all__ = [
    "ALL_METRICS",
    "DEFAULT_NUM_BINS",
    "IMAGE_METRICS",
    "PIXEL_METRICS",
    "AnomalyMetrics",
    "CategoryData",
    "MetricUndefinedWarning",
    "check_metric_names",
    "compute_category_metrics",
    "summarize",
]

IMAGE_METRICS: tuple[str, ...] = ("image_AUROC", "image_AP", "image_F1max")
PIXEL_METRICS: tuple[str, ...] = ("pixel_AUROC", "pixel_AP", "pixel_F1max", "pixel_AUPRO")
ALL_METRICS: tuple[str, ...] = IMAGE_METRICS + PIXEL_METRICS
DEFAULT_NUM_BINS = 10_000

_RANKING_METRICS = {"AUROC": auroc, "AP": average_precision, "F1max": f1_max}
_CATEGORY_BYTES = 64
_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)


class MetricUndefinedWarning(UserWarning):
    """A metric could not be computed (one class only) and is reported as NaN."""


@dataclass(frozen=True)
class CategoryData:
    """Everything the suite needs for one category; maps and masks are [N, H, W] (None if unused)."""

    image_scores: Tensor
    image_labels: Tensor
    anomaly_maps: Tensor | None = None
    masks: Tensor | None = None


def compute_category_metrics(
    image_scores: Tensor,
    image_labels: Tensor,
    anomaly_maps: Tensor | None = None,
    masks: Tensor | None = None,
    *,
    metrics: Sequence[str] = ALL_METRICS,
    binned: bool = False,
    num_bins: int = DEFAULT_NUM_BINS,
    category: str | None = None,
) -> dict[str, float]:
    """Metrics of one category, computed with torch on the inputs' device.

    Args:
        image_scores: [N] anomaly score per image.
        image_labels: [N] 0 (normal) / 1 (anomalous).
        anomaly_maps: [N, H, W] or [N, 1, H, W]; needed only for pixel metrics.
        masks: same shape as ``anomaly_maps``, bool or 0/1.
        metrics: names from :data:`ALL_METRICS`; the result keeps this order.
        binned: approximate, sort-free thresholds (see the module docstring).
        num_bins: grid size of the binned mode.
        category: used in warnings and errors only.

    Returns:
        ``{metric name: value}``; NaN (with a warning) where a metric is undefined.
    """
    names = check_metric_names(metrics)
    _check_num_bins(num_bins)
    where = f"category {category!r}" if category else "this category"
    image_names = [name for name in names if name in IMAGE_METRICS]
    pixel_names = [name for name in names if name in PIXEL_METRICS]
    values: dict[str, float] = {}
    if image_names:
        scores, labels = _image_inputs(image_scores, image_labels, where)
        values |= _level_metrics("image", image_names, scores, labels, None, binned, num_bins, where)
    if pixel_names:
        maps, pixel_masks = _pixel_inputs(anomaly_maps, masks, where)
        if image_names and maps.shape[0] != scores.shape[0]:
            raise DataError(f"{where}: {scores.shape[0]} image scores but {maps.shape[0]} anomaly maps")
        weights = region_weights(pixel_masks) if "pixel_AUPRO" in pixel_names else None
        values |= _level_metrics("pixel", pixel_names, maps, pixel_masks, weights, binned, num_bins, where)
    return {name: values[name] for name in names}


def summarize(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """``{"per_category": {...}, "mean": {metric: mean over categories}}``.

    The mean skips NaN values and warns naming the categories left out; it is NaN when no category
    has a value. Metric names keep their first-seen order.
    """
    names = list(dict.fromkeys(name for values in per_category.values() for name in values))
    mean: dict[str, float] = {}
    for name in names:
        values = {category: float(result.get(name, math.nan)) for category, result in per_category.items()}
        defined = [value for value in values.values() if not math.isnan(value)]
        left_out = [category for category, value in values.items() if math.isnan(value)]
        if left_out:
            warnings.warn(
                f"mean {name} is over {len(defined)} of {len(values)} categories; "
                f"undefined (NaN) for: {', '.join(left_out)}",
                MetricUndefinedWarning,
                stacklevel=2,
            )
        mean[name] = sum(defined) / len(defined) if defined else math.nan
    return {
        "per_category": {
            category: {name: float(value) for name, value in result.items()}
            for category, result in per_category.items()
        },
        "mean": mean,
    }


class AnomalyMetrics(Metric):
    """Accumulates scores, maps and masks of a mixed-category test set; ``compute()`` returns
    :func:`summarize` of the per-category metrics.

    States are "cat" lists, so torchmetrics gathers them across DDP ranks (a DistributedSampler that pads
    its last batch repeats images; evaluate with a sampler that does not). Memory: maps are kept in
    float32 (float16 would merge distinct scores into ties, so it is not exact) and masks bit-packed,
    4.125 bytes per pixel: 0.73 GB for MVTec AD at 320 px (1,725 maps of 320x320) and 2.0 GB for the
    30-category MVTec AD + VisA + BTAD union (4,628 maps), per process once gathered (about twice that
    while torchmetrics gathers and concatenates). ``compute()`` then
    works one category at a time and needs about 35 bytes per pixel of that category on top (0.6 GB for
    160 maps at 320 px). Pass ``compute_on_cpu=True`` to keep the states in host memory rather than on
    the accelerator. Feed batches with ``update()``; calling the object itself (``forward``) would also
    compute metrics of the lone batch, which are meaningless here and warn for one-class batches.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        metrics: Sequence[str] = ALL_METRICS,
        binned: bool = False,
        num_bins: int = DEFAULT_NUM_BINS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.metric_names = check_metric_names(metrics)
        _check_num_bins(num_bins)
        self.binned = binned
        self.num_bins = num_bins
        self.uses_maps = any(name in PIXEL_METRICS for name in self.metric_names)
        for state in ("image_scores", "image_labels", "category_codes", "anomaly_maps", "packed_masks"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_scores: Tensor,
        image_labels: Tensor,
        anomaly_maps: Tensor | None,
        masks: Tensor | None,
        categories: Sequence[str],
    ) -> None:
        """Add a batch: N scores, labels, maps, masks (as in :func:`compute_category_metrics`) and N names."""
        scores, labels = _image_inputs(image_scores, image_labels, "update()")
        if isinstance(categories, str) or len(categories) != scores.numel():
            raise DataError(
                f"update() got {scores.numel()} images but categories={categories!r}; "
                "pass one category name per image"
            )
        self.image_scores.append(scores.detach().to(torch.float64))
        self.image_labels.append(labels.to(torch.uint8))
        self.category_codes.append(_encode_categories(categories, scores.device))
        if self.uses_maps:
            maps, pixel_masks = _pixel_inputs(anomaly_maps, masks, "update()")
            if maps.shape[0] != scores.numel():
                raise DataError(
                    f"update() got {scores.numel()} image scores but {maps.shape[0]} anomaly maps"
                )
            previous_size = tuple(self.anomaly_maps[-1].shape[1:]) if self.anomaly_maps else None
            if previous_size is not None and previous_size != tuple(maps.shape[1:]):
                raise DataError(
                    f"update() got {tuple(maps.shape[1:])} maps after {previous_size} ones; "
                    "resize every map and mask to the evaluation size first"
                )
            self.anomaly_maps.append(maps.detach().to(torch.float32))
            self.packed_masks.append(_pack_masks(pixel_masks))

    def compute(self) -> dict[str, dict[str, Any]]:
        """Per-category metrics (categories in name order) and their mean."""
        per_category = {
            category: compute_category_metrics(
                data.image_scores,
                data.image_labels,
                data.anomaly_maps,
                data.masks,
                metrics=self.metric_names,
                binned=self.binned,
                num_bins=self.num_bins,
                category=category,
            )
            for category, data in self._grouped_by_category()
        }
        return summarize(per_category)

    def category_data(self) -> dict[str, CategoryData]:
        """The accumulated (and, under DDP, gathered) data split by category, e.g. for plotting curves."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            return dict(self._grouped_by_category())

    def _grouped_by_category(self) -> list[tuple[str, CategoryData]]:
        """Selects each category's rows chunk by chunk, so at most one category is copied at a time."""
        code_chunks = _chunks(self.category_codes)
        names_per_chunk = [_decode_categories(codes) for codes in code_chunks]
        groups = []
        for category in sorted({name for names in names_per_chunk for name in names}):
            rows = [
                _indices_of(category, names, codes.device)
                for names, codes in zip(names_per_chunk, code_chunks, strict=True)
            ]
            maps = masks = None
            if self.uses_maps:
                maps = _take_rows(_chunks(self.anomaly_maps), rows)
                masks = _unpack_masks(_take_rows(_chunks(self.packed_masks), rows), *maps.shape[1:])
            scores = _take_rows(_chunks(self.image_scores), rows)
            labels = _take_rows(_chunks(self.image_labels), rows)
            groups.append((category, CategoryData(scores, labels, maps, masks)))
        return groups


def check_metric_names(metrics: Sequence[str]) -> tuple[str, ...]:
    """Validated, de-duplicated metric names in the given order."""
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [name for name in metrics if name not in ALL_METRICS]
    if unknown or not metrics:
        raise ConfigError(f"metrics={list(metrics)!r}: choose one or more of {', '.join(ALL_METRICS)}")
    return tuple(dict.fromkeys(metrics))


def _check_num_bins(num_bins: int) -> None:
    if not isinstance(num_bins, int) or num_bins < 2:
        raise ConfigError(f"num_bins={num_bins!r}: the binned mode needs an integer of at least 2")


def _level_metrics(
    level: str,
    names: list[str],
    scores: Tensor,
    labels: Tensor,
    weights: Tensor | None,
    binned: bool,
    num_bins: int,
    where: str,
) -> dict[str, float]:
    """One sweep for the level (image or pixel), reduced to each requested metric."""
    if binned:
        sweep = sweep_binned(scores, labels, num_bins, weights)
    else:
        sweep = sweep_exact(scores, labels, weights)
    if not sweep.is_defined:
        _warn_one_class(level, names, sweep, where)
        return {name: math.nan for name in names}
    return {name: _reduce(name, sweep) for name in names}


def _reduce(name: str, sweep: ThresholdSweep) -> float:
    kind = name.split("_", 1)[1]
    return area_under_pro(sweep) if kind == "AUPRO" else _RANKING_METRICS[kind](sweep)


def _warn_one_class(level: str, names: list[str], sweep: ThresholdSweep, where: str) -> None:
    total = sweep.num_positives + sweep.num_negatives
    present = "anomalous" if sweep.num_positives else "normal"
    warnings.warn(
        f"{where}: {', '.join(names)} undefined because all {total} {level}s are {present} "
        "(both classes are needed); reported as NaN",
        MetricUndefinedWarning,
        stacklevel=4,
    )


def _image_inputs(scores: Tensor, labels: Tensor, where: str) -> tuple[Tensor, Tensor]:
    scores, labels = _off_mps(torch.as_tensor(scores)), torch.as_tensor(labels)
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise DataError(
            f"{where}: image_scores {tuple(scores.shape)} and image_labels {tuple(labels.shape)} "
            "must both be [N]"
        )
    _check_finite(scores, "image_scores", where)
    return scores, _as_binary(labels, "image_labels", where).to(scores.device)


def _pixel_inputs(maps: Tensor | None, masks: Tensor | None, where: str) -> tuple[Tensor, Tensor]:
    if maps is None or masks is None:
        raise DataError(f"{where}: pixel metrics need anomaly_maps and masks (got None)")
    maps, masks = _off_mps(torch.as_tensor(maps)), torch.as_tensor(masks)
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise DataError(
            f"{where}: anomaly_maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be "
            "[N, H, W] or [N, 1, H, W] of the same size (resize masks with nearest neighbour)"
        )
    _check_finite(maps, "anomaly_maps", where)
    return maps, _as_binary(masks, "masks", where).to(maps.device)


def _off_mps(tensor: Tensor) -> Tensor:
    """MPS has no float64, which the curve arithmetic needs; such tensors are evaluated on the CPU."""
    return tensor.cpu() if tensor.device.type == "mps" else tensor


def _check_finite(values: Tensor, name: str, where: str) -> None:
    """A finite sum proves every value finite (NaN and inf propagate); only otherwise look closer."""
    if not values.is_floating_point() or bool(torch.isfinite(values.sum())):
        return
    if not bool(torch.isfinite(values).all()):
        raise DataError(f"{where}: {name} contain NaN or infinite values; check the model outputs")


def _as_binary(values: Tensor, name: str, where: str) -> Tensor:
    if values.dtype == torch.bool:
        return values
    if not bool(((values == 0) | (values == 1)).all()):
        raise DataError(f"{where}: {name} must be 0/1 or bool (masks read as 0/255 must be divided by 255)")
    return values.to(torch.bool)


def _encode_categories(categories: Sequence[str], device: torch.device) -> Tensor:
    """Category names as zero-padded UTF-8 rows, so they travel through all_gather like any tensor."""
    encoded = [str(name).encode("utf-8") for name in categories]
    sizes_ok = [0 < len(raw) <= _CATEGORY_BYTES for raw in encoded]
    invalid = [name for name, ok in zip(categories, sizes_ok, strict=True) if not ok]
    if invalid:
        raise DataError(f"category names must be 1 to {_CATEGORY_BYTES} bytes of UTF-8, got {invalid[:3]!r}")
    rows = [list(raw.ljust(_CATEGORY_BYTES, b"\0")) for raw in encoded]
    return torch.tensor(rows, dtype=torch.uint8, device=device).reshape(-1, _CATEGORY_BYTES)


def _decode_categories(codes: Tensor) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in codes.cpu().numpy()]


def _pack_masks(masks: Tensor) -> Tensor:
    """[N, H, W] bool -> [N, ceil(H·W/8)] uint8, eight pixels per byte."""
    flat = masks.reshape(masks.shape[0], -1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.shape[1]) % 8))
    bit_values = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=masks.device)
    return (flat.view(flat.shape[0], -1, 8) * bit_values).sum(dim=2, dtype=torch.uint8)


def _unpack_masks(packed: Tensor, height: int, width: int) -> Tensor:
    bit_values = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=packed.device)
    flat = (packed.unsqueeze(2) & bit_values).ne(0).reshape(packed.shape[0], -1)
    return flat[:, : height * width].reshape(-1, height, width)


def _chunks(state: list[Tensor] | Tensor) -> list[Tensor]:
    """A "cat" state is a list of batches before synchronisation and one tensor after it."""
    return list(state) if isinstance(state, list) else [state]


def _indices_of(category: str, names: list[str], device: torch.device) -> Tensor:
    indices = [i for i, name in enumerate(names) if name == category]
    return torch.tensor(indices, dtype=torch.long, device=device)


def _take_rows(chunks: list[Tensor], rows: list[Tensor]) -> Tensor:
    return torch.cat([chunk[index] for chunk, index in zip(chunks, rows, strict=True) if index.numel()])
