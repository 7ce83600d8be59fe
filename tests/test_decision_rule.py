"""The one decision rule, with a score lying exactly on its threshold, through every path that decides:
the rule itself, the test's F1, the review rows, the pixel outline of the overlays and grids, and the
detector (and so predict and the server, which report the detector's decision; test_export holds the
export's metadata to the same rule text)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from onenip_pl.calibration.decision import RULE_TEXT, anomalous_region, decide
from onenip_pl.inference import OneNIPDetector
from onenip_pl.inference.visualize import CONTOUR_RGB, overlay
from onenip_pl.metrics.evaluator import f1_at_threshold
from onenip_pl.metrics.visual import VisualSample, sample_panels
from onenip_pl.review.rows import decided_row

pytest_plugins = ["fixtures_checkpoint"]

THRESHOLD = 0.375
JUST_ABOVE = float(np.nextafter(np.float32(THRESHOLD), np.float32(1.0)))


def test_a_value_on_its_threshold_is_anomalous() -> None:
    assert decide(THRESHOLD, THRESHOLD) is True
    assert decide(THRESHOLD, JUST_ABOVE) is False
    assert decide(THRESHOLD, math.nan) is None and decide(THRESHOLD, None) is None
    values = torch.tensor([THRESHOLD, JUST_ABOVE, 0.0])
    assert anomalous_region(values, JUST_ABOVE).tolist() == [False, True, False]
    assert ">=" in RULE_TEXT


def test_f1_and_review_rows_count_a_score_on_the_threshold_as_flagged() -> None:
    scores, labels = torch.tensor([THRESHOLD, 0.1]), torch.tensor([1, 0])
    assert f1_at_threshold(scores, labels, THRESHOLD) == 1.0
    assert f1_at_threshold(scores, labels, JUST_ABOVE) == 0.0, "the anomaly is missed"
    assert decided_row("a", "a.png", "screw", THRESHOLD, THRESHOLD, label=1).outcome == "TP"
    assert decided_row("a", "a.png", "screw", THRESHOLD, JUST_ABOVE, label=1).outcome == "FN"


def test_pixels_on_the_pixel_threshold_are_outlined_and_predicted() -> None:
    image = np.full((48, 48, 3), 128, dtype=np.uint8)
    anomaly_map = np.zeros((48, 48), dtype=np.float32)
    anomaly_map[16:32, 16:32] = THRESHOLD

    def outlined_pixels(threshold: float) -> int:
        painted = overlay(image, anomaly_map, pixel_threshold=threshold)
        return int((painted == np.array(CONTOUR_RGB, dtype=np.uint8)).all(axis=-1).sum())

    assert outlined_pixels(THRESHOLD) > 0 and outlined_pixels(JUST_ABOVE) == 0
    sample = VisualSample(
        image=torch.from_numpy(image).permute(2, 0, 1),
        mask=torch.zeros(48, 48),
        anomaly_map=torch.from_numpy(anomaly_map),
        label=1,
        score=THRESHOLD,
        path="square.png",
    )
    assert int(sample_panels(sample, THRESHOLD, 0.0, 1.0)["prediction"].sum()) == 16 * 16
    assert int(sample_panels(sample, JUST_ABOVE, 0.0, 1.0)["prediction"].sum()) == 0


def test_the_detector_decides_a_score_on_its_category_threshold_as_anomalous(tiny_checkpoint: Path) -> None:
    detector = OneNIPDetector.from_checkpoint(tiny_checkpoint)
    category = detector.categories[0]
    image = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    score = detector.predict(image, category=category)[0].score
    entry = detector.post_processor.per_category[category]
    entry["image"] = score
    assert detector.predict(image, category=category)[0].verdict == "anomalous"
    entry["image"] = float(np.nextafter(np.float32(score), np.float32(math.inf)))
    assert detector.predict(image, category=category)[0].verdict == "normal"

