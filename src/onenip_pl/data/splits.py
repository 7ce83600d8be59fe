"""Splitting each category's normal training images before training: what is trained on, what is held out
to calibrate the decisions (or to validate), and which categories are not trained on at all.

Thresholds taken on images the model has fitted are too low for images it has not: its training images
reconstruct better than new parts do. So a seeded fraction of every category is set aside before training
and never trained on; the thresholds come from those images. A category too small to spare them is
calibrated on its training images instead, with a warning and a flag in the checkpoint.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from onenip_pl.data.records import ImageRecord
from onenip_pl.errors import ConfigError

log = logging.getLogger(__name__)

HELD_OUT = "held_out"
TRAINING = "training"
UNSEEN = "unseen"


@dataclass
class NormalSplits:
    """``pool``: the normal images served for training and as prompts (the held-out categories' among
    them, as prompts only); ``trained_categories``; ``validation`` and ``calibration`` images, and where
    each category's calibration images come from (held_out, training or unseen)."""

    pool: list[ImageRecord] = field(default_factory=list)
    trained_categories: list[str] = field(default_factory=list)
    validation: list[ImageRecord] = field(default_factory=list)
    calibration: list[ImageRecord] = field(default_factory=list)
    calibration_sources: dict[str, str] = field(default_factory=dict)


def _seeded_subset(indices: list[int], count: int, key: list[int]) -> set[int]:
    rng = np.random.default_rng(key)
    return {int(i) for i in rng.choice(indices, size=count, replace=False)}


def split_normals(
    train: Sequence[ImageRecord],
    seed: int,
    val_fraction: float = 0.0,
    calibration_fraction: float = 0.1,
    calibration_min_images: int = 3,
    holdout_categories: Sequence[str] = (),
) -> NormalSplits:
    """Split normal training images by category (see :class:`NormalSplits`).

    With ``val_fraction`` > 0 the validation split (held-out normals, with synthetic anomalies at
    validation time) is also the calibration split. Otherwise ``calibration_fraction`` of each category, at
    least ``calibration_min_images``, is held out; a category with fewer than twice that many images keeps
    them all for training and is calibrated on them. A held-out category is never trained on: all its
    images are prompts, and all of them calibrate it.
    """
    if not 0.0 <= calibration_fraction < 1.0:
        raise ConfigError(f"data.calibration_fraction={calibration_fraction} must be in [0, 1)")
    if calibration_min_images < 1:
        raise ConfigError(f"data.calibration_min_images={calibration_min_images} must be at least 1")
    by_category: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(train):
        by_category[record.category].append(index)
    unknown = sorted(set(holdout_categories) - set(by_category))
    if unknown:
        raise ConfigError(
            f"data.holdout_categories {unknown} have no training images; known: {sorted(by_category)}"
        )
    if holdout_categories and set(holdout_categories) >= set(by_category):
        raise ConfigError("data.holdout_categories holds every category: nothing would be trained on")
    splits = NormalSplits()
    small = []
    for category, indices in sorted(by_category.items()):
        records = [train[i] for i in indices]
        if category in holdout_categories:
            splits.pool += records
            splits.calibration += records
            splits.calibration_sources[category] = UNSEEN
            continue
        splits.trained_categories.append(category)
        if val_fraction > 0.0:
            count = min(len(indices) - 1, max(1, round(val_fraction * len(indices))))
            held = _seeded_subset(indices, count, [seed, len(indices)])
            splits.validation += [train[i] for i in indices if i in held]
            splits.calibration += [train[i] for i in indices if i in held]
            splits.calibration_sources[category] = HELD_OUT
        elif calibration_fraction > 0.0 and len(indices) >= 2 * calibration_min_images:
            count = max(calibration_min_images, round(calibration_fraction * len(indices)))
            held = _seeded_subset(indices, count, [seed, len(indices), 1])
            splits.calibration += [train[i] for i in indices if i in held]
            splits.calibration_sources[category] = HELD_OUT
        else:
            held = set()
            splits.calibration += records
            splits.calibration_sources[category] = TRAINING
            small.append(f"{category} ({len(indices)})")
        splits.pool += [train[i] for i in indices if i not in held]
    if small and calibration_fraction > 0.0:
        log.warning(
            "Too few normal training images to hold some out for calibration in: %s (fewer than 2 x "
            "data.calibration_min_images=%d); their thresholds come from training images, which score "
            "lower than new parts, so expect more false alarms there. The checkpoint marks them.",
            ", ".join(small),
            calibration_min_images,
        )
    return splits
