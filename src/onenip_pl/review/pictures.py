"""The pictures of a review row: a small thumbnail of the image, the anomaly-map overlay with the
pixel-threshold region outlined (white) and the ground-truth outline (green) where a mask exists, and a
thumbnail of that overlay. JPEG, so a run of thousands of images stays a few tens of kB per image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from onenip_pl.inference.visualize import overlay

THUMBNAIL_SIZE = 128
THUMBNAIL_QUALITY = 80
OVERLAY_QUALITY = 88
GROUND_TRUTH_RGB = (0, 230, 0)


@dataclass(frozen=True)
class RowPictures:
    """Where a row's pictures were written, relative to the run directory (POSIX separators)."""

    thumbnail: str
    overlay_thumbnail: str
    overlay: str


def write_row_pictures(
    run_dir: Path,
    name: str,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    pixel_threshold: float | None,
    mask: np.ndarray | None = None,
) -> RowPictures:
    """Write ``report/thumbnails/<name>.jpg``, ``report/overlays/<name>.jpg`` and its thumbnail
    ``report/overlay_thumbnails/<name>.jpg`` for an H×W×3 uint8 image and its H×W map."""
    picture = overlay(image, anomaly_map, pixel_threshold)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(min(image.shape[:2]) / 200))
        cv2.drawContours(picture, contours, -1, GROUND_TRUTH_RGB, thickness)
    files = RowPictures(
        thumbnail=f"report/thumbnails/{name}.jpg",
        overlay_thumbnail=f"report/overlay_thumbnails/{name}.jpg",
        overlay=f"report/overlays/{name}.jpg",
    )
    _save_jpeg(_thumbnail(image), run_dir / files.thumbnail, THUMBNAIL_QUALITY)
    _save_jpeg(_thumbnail(picture), run_dir / files.overlay_thumbnail, THUMBNAIL_QUALITY)
    _save_jpeg(picture, run_dir / files.overlay, OVERLAY_QUALITY)
    return files


def _thumbnail(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    factor = THUMBNAIL_SIZE / max(height, width)
    if factor >= 1:
        return image
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _save_jpeg(image: np.ndarray, path: Path, quality: int) -> None:
    # PIL rather than cv2.imwrite: it takes any file name the OS does (spaces, unicode, '<', '&')
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(image).save(path, format="JPEG", quality=quality)
    except OSError as error:
        raise OSError(f"could not write {path}: {error}; check that the run directory is writable") from error
