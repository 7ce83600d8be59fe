"""The server's answers: one detection as JSON, and what `GET /info` says about the model."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from onenip_pl import __version__
from onenip_pl.calibration.decision import RULE_TEXT
from onenip_pl.inference import Detection, OneNIPDetector
from onenip_pl.inference.visualize import map_png16, overlay


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answered: the checkpoint's SHA-256 and the package version, in every answer."""

    checkpoint_sha256: str
    version: str = __version__

    def as_json(self) -> dict[str, str]:
        return {"checkpoint_sha256": self.checkpoint_sha256, "version": self.version}


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: an uncalibrated threshold is written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def detection_json(
    detection: Detection,
    rgb: np.ndarray,
    thresholds: tuple[float, float],
    identity: ModelIdentity,
    map_full_scale: float | None = None,
    with_overlay: bool = False,
) -> dict[str, Any]:
    """The answer to one `POST /predict`; the map (16-bit PNG, value = map / full scale · 65535) and the
    overlay (as `predict` draws it) are added, base64-encoded, when asked for."""
    image_threshold, pixel_threshold = thresholds
    answer: dict[str, Any] = {
        "category": detection.category,
        "similarity": detection.similarity,
        "image_score": detection.score,
        "decision": detection.verdict,
        "anomalous": detection.decision,
        "thresholds": {"image": finite_or_none(image_threshold), "pixel": finite_or_none(pixel_threshold)},
        "decision_rule": RULE_TEXT,
        "height": int(rgb.shape[0]),
        "width": int(rgb.shape[1]),
        "model": identity.as_json(),
    }
    if map_full_scale is not None:
        answer["anomaly_map_png16"] = png_base64(map_png16(detection.anomaly_map, map_full_scale))
        answer["map_full_scale"] = map_full_scale
    if with_overlay:
        label = f"{detection.category or 'prompt'} {detection.score:.4g} {detection.verdict}"
        answer["overlay_png"] = png_base64(overlay(rgb, detection.anomaly_map, pixel_threshold, label))
    return answer


def model_json(
    detector: OneNIPDetector,
    identity: ModelIdentity,
    max_image_pixels: int,
    map_full_scale: float | None,
    runtime: str,
) -> dict[str, Any]:
    """What `GET /info` tells a client about the model it is talking to."""
    return {
        **identity.as_json(),
        "categories": detector.categories,
        "image_size": detector.image_size,
        "thresholds": detector.post_processor.threshold_table(),
        "decision_rule": RULE_TEXT,
        "calibrated": detector.calibrated,
        "runtime": runtime,
        "max_image_pixels": max_image_pixels,
        "map_full_scale": map_full_scale,
    }
