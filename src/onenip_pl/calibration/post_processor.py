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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from onenip_pl.calibration.rules import check_rule, threshold
from onenip_pl.data.splits import HELD_OUT
from onenip_pl.distributed import gather_objects, global_extremes
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
        self,
        fusion: str = "calibrated",
        threshold_rule: str = "quantile",
        threshold_quantile: float = 0.9,
        pixel_threshold_quantile: float = 0.999,
    ) -> None:
        super().__init__()
        check_choice("model.fusion", fusion, FUSION_MODES)
        check_rule(
            threshold_rule,
            {
                "model.threshold_quantile": threshold_quantile,
                "model.pixel_threshold_quantile": pixel_threshold_quantile,
            },
        )
        self.fusion = fusion
        self.threshold_rule = threshold_rule
        self.threshold_quantile = threshold_quantile
        self.pixel_threshold_quantile = pixel_threshold_quantile
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
            "quantile": {"image": self.threshold_quantile, "pixel": self.pixel_threshold_quantile},
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

    @property
    def needs_anomalies(self) -> bool:
        """Whether the threshold rule needs synthetic anomalies beside the normal images."""
        return self.threshold_rule == "f1"

    def thresholds(self, category: str | None) -> tuple[float, float]:
        """(image, pixel) threshold that decides an image of ``category`` (NaN when uncalibrated)."""
        entry = self.per_category.get(category, self.pooled) if category is not None else self.pooled
        return float(entry["image"]), float(entry["pixel"])

    # ---- calibration ----------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(
        self,
        net: nn.Module,
        maps: MapBatches,
        prompt_setting: str | None = None,
        sources: Mapping[str, str] | None = None,
        fit_scale: bool = True,
        categories_only: bool = False,
    ) -> float:
        """Fix the thresholds of every category in ``maps`` and the pooled ones (normal images, and
        synthetic anomalies for the F1 rule), reduced over DDP ranks; with ``fit_scale`` first
        ``net.fusion_scale`` on the normal images. ``sources`` says where a category's images came from
        (default ``held_out``; ``training`` when it could spare none). ``categories_only`` leaves the
        pooled thresholds as they are (enrolling one product). Returns the scale used."""
        device = net.fusion_scale.device
        scale = midrange_scale(maps.rec_maps(normal_only=True), device) if fit_scale else net.fusion_scale
        values = _gather_by_category(_fused_values(net, maps, scale))
        if not values:
            raise DataError("calibration got no image; give normal images of every category")
        rule, q, pixel_q = self.threshold_rule, self.threshold_quantile, self.pixel_threshold_quantile
        for category, entry in sorted(values.items()):
            self.per_category[category] = {
                "image": threshold(rule, entry["scores"], entry["labels"], q),
                "pixel": threshold(rule, entry["pixels"], entry["pixel_labels"], pixel_q),
                "normal_images": int((entry["labels"] == 0).sum()),
                "anomalies": int(entry["labels"].sum()),
                "source": (sources or {}).get(category, HELD_OUT),
            }
        if not categories_only:
            everything = {key: torch.cat([entry[key] for entry in values.values()]) for key in _VALUES}
            self.pooled = {
                "image": threshold(rule, everything["scores"], everything["labels"], q),
                "pixel": threshold(rule, everything["pixels"], everything["pixel_labels"], pixel_q),
            }
            self.prompt_setting = prompt_setting
        net.fusion_scale.fill_(scale)
        self.calibrated = True
        log.info(
            "Calibrated %s on %d images (%s): fusion scale %.6g; %s",
            "categories" if categories_only else "the model",
            sum(len(entry["labels"]) for entry in values.values()),
            self.describe_rule(),
            float(scale),
            "; ".join(f"{name} {self.describe_thresholds(name)}" for name in sorted(values)),
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

    def threshold_table(self) -> dict[str, Any]:
        """``{"pooled": {"image", "pixel"}, "per_category": {category: {"image", "pixel", "source"}}}``
        in plain JSON values (None where uncalibrated): what predict and export write down."""

        def finite(value: float) -> float | None:
            return float(value) if math.isfinite(value) else None

        return {
            "pooled": {level: finite(self.pooled[level]) for level in ("image", "pixel")},
            "per_category": {
                category: {
                    "image": finite(entry["image"]),
                    "pixel": finite(entry["pixel"]),
                    "source": entry.get("source", HELD_OUT),
                }
                for category, entry in sorted(self.per_category.items())
            },
        }

    def describe_thresholds(self, category: str | None) -> str:
        image, pixel = self.thresholds(category)
        return f"image {image:.4g}, pixel {pixel:.4g}"

    def describe_rule(self) -> str:
        if self.threshold_rule == "quantile":
            image, pixel = self.threshold_quantile, self.pixel_threshold_quantile
            return f"quantile {image:g} of normal scores, {pixel:g} of normal pixels"
        return "F1-optimal on normal images and their synthetic anomalies"


_VALUES = ("scores", "labels", "pixels", "pixel_labels")


def _fused_values(net: nn.Module, maps: MapBatches, scale: Tensor) -> dict[str, dict[str, list[Tensor]]]:
    """Per category: image scores and labels, and the fused maps' pixels (every PIXEL_STRIDE-th row and
    column) with their mask values, on the CPU."""
    values: dict[str, dict[str, list[Tensor]]] = {}
    for batch in maps:
        anomaly_map, image_score = net.fuse(batch.rec_map, batch.refiner_map, scale)
        pixels = anomaly_map[..., ::PIXEL_STRIDE, ::PIXEL_STRIDE].flatten(1).cpu()
        pixel_labels = batch.mask[..., ::PIXEL_STRIDE, ::PIXEL_STRIDE].flatten(1).cpu()
        for i, category in enumerate(batch.category):
            entry = values.setdefault(category, {key: [] for key in _VALUES})
            entry["scores"].append(image_score[i : i + 1].cpu())
            entry["labels"].append(batch.label[i : i + 1].cpu())
            entry["pixels"].append(pixels[i])
            entry["pixel_labels"].append(pixel_labels[i])
    return values


def _gather_by_category(local: dict[str, dict[str, list[Tensor]]]) -> dict[str, dict[str, Tensor]]:
    """Every rank's values of each category, concatenated."""
    merged: dict[str, dict[str, list[Tensor]]] = {}
    for rank_values in gather_objects(local):
        for category, entry in rank_values.items():
            target = merged.setdefault(category, {key: [] for key in _VALUES})
            for key in _VALUES:
                target[key] += entry[key]
    return {c: {key: torch.cat(entry[key]) for key in _VALUES} for c, entry in merged.items()}


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
