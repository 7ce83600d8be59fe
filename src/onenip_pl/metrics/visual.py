"""The visual report: for a few test images per category, a grid row of
image | ground truth | anomaly-map overlay | thresholded prediction, saved as one PNG per category.

Numbers say how good a detector is; the pictures say where it fails (a missed thin scratch, a
background that lights up), which is what one needs to decide what to fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np
import torch
from torch import Tensor

from onenip_pl.calibration.decision import anomalous_region, has_threshold
from onenip_pl.errors import ConfigError

__all__ = ["PANEL_TITLES", "SampleKeeper", "VisualSample", "overlay", "sample_panels", "write_sample_grids"]

PANEL_TITLES = ("image", "ground truth", "anomaly map", "prediction")
_OVERLAY_ALPHA = 0.5
_MIN_PANEL = 160
_GAP = 4
_BAND = 22
_FONT_SCALE = 0.42


@dataclass(frozen=True)
class VisualSample:
    """One test image ready to draw: image [3, H, W] uint8, mask and anomaly map [H, W]."""

    image: Tensor
    mask: Tensor
    anomaly_map: Tensor
    label: int
    score: float
    path: str


class SampleKeeper:
    """Keeps the first few test samples of each category, so memory stays bounded whatever the test size.

    Of ``per_category`` places, ``per_category // 2`` go to normal images and the rest to anomalous ones,
    so a grid shows both how defects are found and what a normal image looks like to the model.
    """

    def __init__(self, per_category: int) -> None:
        if per_category < 0:
            raise ConfigError(f"report.images_per_category={per_category} must be 0 (off) or more")
        self.per_category = per_category
        self.samples: dict[str, list[dict[str, Any]]] = {}

    def wants(self, category: str, label: int) -> bool:
        """True while the category still has a free place for an image of this label."""
        normal_places = self.per_category // 2
        places = normal_places if label == 0 else self.per_category - normal_places
        kept = self.samples.get(category, [])
        return sum(1 for sample in kept if sample["label"] == label) < places

    def add(self, category: str, label: int, **fields: Any) -> None:
        self.samples.setdefault(category, []).append({"label": label, **fields})


def overlay(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """The map in the jet colour map over the image (both H×W), half transparent; uint8 H×W×3."""
    span = high - low if high > low else 1.0
    scaled = np.clip((anomaly_map - low) / span, 0.0, 1.0)
    heat = matplotlib.colormaps["jet"](scaled)[..., :3]
    blended = (1 - _OVERLAY_ALPHA) * image.astype(np.float64) / 255.0 + _OVERLAY_ALPHA * heat
    return np.round(blended * 255.0).astype(np.uint8)


def sample_panels(
    sample: VisualSample, threshold: float | None, low: float, high: float
) -> dict[str, np.ndarray | None]:
    """The four panels of a row as arrays; ``prediction`` is the decision rule's region (None without
    a threshold, e.g. under the authors' test-set fusion, which has no threshold fixed in advance)."""
    image = sample.image.permute(1, 2, 0).cpu().numpy()
    anomaly_map = sample.anomaly_map.float().cpu().numpy()
    return {
        "image": image,
        "ground truth": sample.mask.cpu().numpy().astype(bool),
        "anomaly map": overlay(image, anomaly_map, low, high),
        "prediction": anomalous_region(anomaly_map, threshold) if has_threshold(threshold) else None,
    }


def write_sample_grids(
    samples: Mapping[str, Sequence[VisualSample]],
    out_dir: str | Path,
    thresholds: float | Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """One PNG per category, ``<out_dir>/<category>.png``, a row per sample; returns the paths.

    ``thresholds`` is the pixel threshold of the prediction panel: one for all, or one per category.

    The overlay colours span the lowest to highest map value of the category's shown samples, so rows
    of one grid are comparable. Drawn with plain arrays (no plotting library layout), so a report of
    many categories costs milliseconds per grid.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for category, rows in samples.items():
        if not rows:
            continue
        threshold = thresholds.get(category) if isinstance(thresholds, Mapping) else thresholds
        maps = torch.stack([row.anomaly_map.float().cpu() for row in rows])
        low, high = float(maps.min()), float(maps.max())
        size = max(_MIN_PANEL, int(maps.shape[-1]))
        blocks = [_title_band(_heading(category, threshold), size), _column_band(size)]
        blocks += [_row(sample, threshold, low, high, size) for sample in rows]
        grid = np.concatenate(blocks, axis=0)
        paths[category] = out_dir / f"{_file_safe(category)}.png"
        if not cv2.imwrite(str(paths[category]), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {paths[category]}; check that the run directory is writable")
    return paths


def _row(sample: VisualSample, threshold: float | None, low: float, high: float, size: int) -> np.ndarray:
    """A caption band (file, label, score) above the four panels."""
    panels = sample_panels(sample, threshold, low, high)
    kind = "anomalous" if sample.label else "normal"
    caption = f"{kind}  {Path(sample.path).parent.name}/{Path(sample.path).name}  score {sample.score:.4g}"
    cells = [_as_panel(panels[title], size) for title in PANEL_TITLES]
    width = len(cells) * size + (len(cells) + 1) * _GAP
    body = np.full((size + _GAP, width, 3), 255, dtype=np.uint8)
    for column, cell in enumerate(cells):
        left = _GAP + column * (size + _GAP)
        body[:size, left : left + size] = cell
    return np.concatenate([_text_band(caption, width), body], axis=0)


def _as_panel(panel: np.ndarray | None, size: int) -> np.ndarray:
    if panel is None:
        cell = np.full((size, size, 3), 220, dtype=np.uint8)
        _put_text(cell, "no threshold", (6, size // 2 - 4))
        _put_text(cell, "fixed in advance", (6, size // 2 + 12))
        return cell
    if panel.ndim == 2:
        panel = np.repeat(panel.astype(np.uint8)[..., None] * 255, 3, axis=2)
    if panel.shape[0] != size:
        panel = cv2.resize(panel, (size, size), interpolation=cv2.INTER_NEAREST)
    return panel


def _title_band(text: str, size: int) -> np.ndarray:
    return _text_band(text, len(PANEL_TITLES) * size + (len(PANEL_TITLES) + 1) * _GAP, scale=0.55)


def _column_band(size: int) -> np.ndarray:
    band = _text_band("", len(PANEL_TITLES) * size + (len(PANEL_TITLES) + 1) * _GAP)
    for column, title in enumerate(PANEL_TITLES):
        _put_text(band, title, (_GAP + column * (size + _GAP) + 4, _BAND - 6))
    return band


def _text_band(text: str, width: int, scale: float = _FONT_SCALE) -> np.ndarray:
    band = np.full((_BAND, width, 3), 255, dtype=np.uint8)
    _put_text(band, text, (_GAP + 2, _BAND - 6), scale)
    return band


def _put_text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float = _FONT_SCALE) -> None:
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def _heading(category: str, threshold: float | None) -> str:
    if not has_threshold(threshold):
        return category
    return f"{category}   (prediction: pixel score >= {threshold:.4g})"


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
