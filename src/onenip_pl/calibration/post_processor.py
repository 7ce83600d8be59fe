"""The fusion post-processor: the refiner-map scale and the decision thresholds, fixed on normal images
before any test and kept in the checkpoint, or the authors' test-set fusion.

OneNIP fuses ``0.5·rec + 0.5·scale·ref``. The authors take ``scale = (max + min) / 2`` of the
reconstruction maps over the whole test set, so their numbers use test statistics and a deployed model
could not compute them (``fusion="official"``, kept to reproduce the paper). ``fusion="calibrated"`` (the
default) takes the same midrange over held-out normal images once, stores it in the network's
``fusion_scale`` buffer, and fixes the image and pixel thresholds by a rule (onenip_pl.calibration.rules)
on the same images: before the test, never from it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from onenip_pl.calibration.rules import check_rule, threshold
from onenip_pl.distributed import gather_cat, gather_objects, global_extremes
from onenip_pl.errors import DataError, check_choice
from onenip_pl.metrics.evaluator import Evaluator

log = logging.getLogger(__name__)

FUSION_MODES = ("calibrated", "official")
# pixels of calibration maps taken every PIXEL_STRIDE rows and columns: thresholds from a bounded sample
PIXEL_STRIDE = 4
STATE_VERSION = 1


def midrange_scale(rec_maps: Sequence[Tensor], device: torch.device) -> Tensor:
    """(max + min) / 2 over every reconstruction map on every rank: the authors' refiner-map scale."""
    low, high = global_extremes(rec_maps, device)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise DataError("the fusion scale needs at least one normal image's maps; none was given")
    return (low + high) / 2


@dataclass(frozen=True)
class ScoredBatch:
    """A batch's reconstruction and refiner maps (N×1×S×S) with what is known of each image."""

    rec_map: Tensor
    refiner_map: Tensor
    label: Tensor
    mask: Tensor
    category: list[str]


@dataclass
class MapBatches:
    """The scored batches of a calibration, validation or authors'-protocol test."""

    batches: list[ScoredBatch] = field(default_factory=list)

    def add(self, rec_map: Tensor, refiner_map: Tensor, batch: dict[str, Any]) -> None:
        label = torch.as_tensor(batch["label"]).to(rec_map.device)
        mask = torch.as_tensor(batch["mask"]).to(rec_map.device)
        self.batches.append(
            ScoredBatch(rec_map, refiner_map, label, mask, [str(c) for c in batch["category"]])
        )

    def __iter__(self):
        return iter(self.batches)

    def rec_maps(self, normal_only: bool = False) -> list[Tensor]:
        return [b.rec_map[b.label == 0] if normal_only else b.rec_map for b in self.batches]


@torch.no_grad()
def collect_maps(score: Callable[[dict[str, Any]], tuple[Tensor, Tensor]], batches: Iterable) -> MapBatches:
    """``score`` (batch -> rec_map, refiner_map) run over ``batches``."""
    maps = MapBatches()
    for batch in batches:
        maps.add(*score(batch), batch)
    return maps


class PostProcessor(nn.Module):
    """Fusion mode, threshold rule and the calibration itself (in the state dict as extra state).

    Thresholds: ``pooled`` over every calibration image, and per category where calibrated so; a
    category without its own entry (or an image of unknown category) is decided by the pooled one.
    """

    def __init__(
        self, fusion: str = "calibrated", threshold_rule: str = "quantile", threshold_quantile: float = 0.99
    ) -> None:
        super().__init__()
        check_choice("model.fusion", fusion, FUSION_MODES)
        check_rule(threshold_rule, threshold_quantile)
        self.fusion = fusion
        self.threshold_rule = threshold_rule
        self.threshold_quantile = threshold_quantile
        self.calibrated = False
        self.pooled = {"image": math.nan, "pixel": math.nan}
        self.per_category: dict[str, dict[str, Any]] = {}
        self.prompt_setting: str | None = None

    # ---- checkpoint -----------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "calibrated": self.calibrated,
            "rule": self.threshold_rule,
            "quantile": self.threshold_quantile,
            "pooled": dict(self.pooled),
            "per_category": {name: dict(entry) for name, entry in self.per_category.items()},
            "prompt_setting": self.prompt_setting,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calibrated = bool(state["calibrated"])
        self.pooled = dict(state["pooled"])
        self.per_category = {name: dict(entry) for name, entry in state["per_category"].items()}
        self.prompt_setting = state.get("prompt_setting")

    # ---- decisions ------------------------------------------------------------------------------

    @property
    def uses_test_set(self) -> bool:
        return self.fusion == "official"

    def thresholds(self, category: str | None) -> tuple[float, float]:
        """(image, pixel) threshold that decides an image of ``category`` (NaN when uncalibrated)."""
        entry = self.per_category.get(category, self.pooled) if category is not None else self.pooled
        return float(entry["image"]), float(entry["pixel"])

    # ---- calibration ----------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(self, net: nn.Module, maps: MapBatches, prompt_setting: str | None = None) -> float:
        """Fix ``net.fusion_scale`` on the normal images of ``maps`` and the thresholds on all of them
        (normal, and synthetic anomalies for the F1 rule); reduced over DDP ranks. Returns the scale."""
        scale = midrange_scale(maps.rec_maps(normal_only=True), net.fusion_scale.device)
        scores, labels, pixels, pixel_labels, categories = [], [], [], [], []
        for batch in maps:
            anomaly_map, image_score = net.fuse(batch.rec_map, batch.refiner_map, scale)
            scores.append(image_score)
            labels.append(batch.label)
            pixels.append(anomaly_map[..., ::PIXEL_STRIDE, ::PIXEL_STRIDE].flatten())
            pixel_labels.append(batch.mask[..., ::PIXEL_STRIDE, ::PIXEL_STRIDE].flatten())
            categories.extend(batch.category)
        everyone = {
            "scores": gather_cat(scores),
            "labels": gather_cat(labels),
            "pixels": gather_cat(pixels),
            "pixel_labels": gather_cat(pixel_labels),
        }
        rule, q = self.threshold_rule, self.threshold_quantile
        self.pooled = {
            "image": threshold(rule, everyone["scores"], everyone["labels"], q),
            "pixel": threshold(rule, everyone["pixels"], everyone["pixel_labels"], q),
        }
        net.fusion_scale.fill_(scale)
        self.calibrated = True
        self.prompt_setting = prompt_setting
        images = sum(len(chunk) for chunk in gather_objects(categories))
        log.info(
            "Calibrated on %d images: fusion scale %.6g, image threshold %.6g, pixel threshold %.6g (%s)",
            images,
            float(scale),
            self.pooled["image"],
            self.pooled["pixel"],
            self.describe_rule(),
        )
        return float(scale)

    def check_prompt_setting(self, test_setting: str) -> None:
        """Warn when the test chooses prompts otherwise than the calibration did."""
        if self.calibrated and self.prompt_setting not in (None, test_setting):
            log.warning(
                "The fusion scale and thresholds were calibrated with prompts '%s' but the test uses '%s'; "
                "image_F1 and pixel_F1 may suffer. Calibrate with the test's data.test_prompt settings.",
                self.prompt_setting,
                test_setting,
            )

    def describe_rule(self) -> str:
        if self.threshold_rule == "quantile":
            return f"quantile {self.threshold_quantile:g} of normal scores"
        return "F1-optimal on normal images and their synthetic anomalies"


class TestSetFusion:
    """Fusion by the evaluated set's own scale: the authors' test protocol (every image's maps), and the
    validation split (its normal images only). Each batch's maps are kept until the scale is known."""

    def __init__(self, normal_only: bool = False) -> None:
        self.maps = MapBatches()
        self.normal_only = normal_only

    def add(self, rec_map: Tensor, refiner_map: Tensor, batch: dict[str, Any]) -> None:
        self.maps.add(rec_map, refiner_map, batch)

    def evaluate(self, net: nn.Module, evaluator: Evaluator) -> Tensor:
        """(max + min) / 2 of the kept reconstruction maps over all ranks; every batch fused with it into
        ``evaluator``. Returns the scale."""
        scale = midrange_scale(self.maps.rec_maps(self.normal_only), net.fusion_scale.device)
        for batch in self.maps:
            evaluator.update(
                *net.fuse(batch.rec_map, batch.refiner_map, scale), batch.label, batch.mask, batch.category
            )
        self.maps = MapBatches()
        return scale
