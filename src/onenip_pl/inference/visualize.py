"""Pictures of a prediction: heat-map overlay with the thresholded region outlined, 16-bit map PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from onenip_pl.calibration.decision import anomalous_region, has_threshold
from onenip_pl.errors import ConfigError
from onenip_pl.metrics.visual import overlay as heat_overlay

CONTOUR_RGB = (255, 255, 255)


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    pixel_threshold: float | None = None,
    label: str | None = None,
) -> np.ndarray:
    """The image blended with its heat-map, the region above `pixel_threshold` outlined, `label` on top.

    Colours span this map's own min..max (at least up to the threshold), so a normal image is not painted
    red; the outline and the label carry the decision.
    """
    if image.shape[:2] != anomaly_map.shape:
        raise ValueError(f"image {image.shape[:2]} and map {anomaly_map.shape} differ in size")
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    threshold = pixel_threshold if has_threshold(pixel_threshold) else None
    if threshold is not None:
        high = max(high, threshold)
    # numpy keeps the input's memory order, so a view of a batch tensor (N×3×H×W permuted) blends into an
    # array OpenCV's drawing functions refuse: draw on a C-ordered copy
    blended = np.ascontiguousarray(heat_overlay(image, anomaly_map, low, high))
    if threshold is not None:
        region = anomalous_region(anomaly_map, threshold).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(min(image.shape[:2]) / 200))
        cv2.drawContours(blended, contours, -1, CONTOUR_RGB, thickness)
    if label:
        _draw_label(blended, label)
    return blended


def _draw_label(image: np.ndarray, text: str) -> None:
    """Write `text` top-left on a dark box, scaled to the image."""
    scale = max(0.3, min(image.shape[:2]) / 500)
    thickness = max(1, round(scale * 1.5))
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.rectangle(image, (0, 0), (width + 4, height + baseline + 4), (0, 0, 0), thickness=-1)
    cv2.putText(
        image, text, (2, height + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA
    )


def save_rgb(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def map_png16(anomaly_map: np.ndarray, full_scale: float) -> np.ndarray:
    """The map as 16-bit gray: value = map / full_scale · 65535, clipped (full_scale is recorded)."""
    if not math.isfinite(full_scale) or full_scale <= 0:
        raise ConfigError(f"the 16-bit map scale {full_scale} must be a positive number; set png16_max.")
    scaled = np.clip(np.round(anomaly_map.astype(np.float64) / full_scale * 65535.0), 0, 65535)
    return scaled.astype(np.uint16)


def save_map_png16(anomaly_map: np.ndarray, path: Path, full_scale: float) -> None:
    """A 16-bit gray PNG of the map (see map_png16)."""
    gray16 = map_png16(anomaly_map, full_scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray16).save(path)
