"""Rows of a run, image by image, as the run goes: a test run's batches or a predict run's detections."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from onenip_pl.review.pictures import write_row_pictures
from onenip_pl.review.rows import ReviewRow, decided_row

if TYPE_CHECKING:  # the detector's imports (the model, timm) are not needed to write rows
    from onenip_pl.inference.detector import Detection

ThresholdLookup = Callable[[str | None], tuple[float, float]]


class RunRows:
    """The rows of one run with their pictures written under ``<run_dir>/report/``; ``seconds`` is the
    time spent writing them, so a run can say what its report cost."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[ReviewRow] = []
        self.seconds = 0.0
        self._names: Counter[str] = Counter()

    def unique_name(self, name: str) -> str:
        """``name``, or ``name~2``, ``name~3``... when an earlier image had it: no two rows share files."""
        self._names[name] += 1
        count = self._names[name]
        return name if count == 1 else f"{name}~{count}"

    def add_test_batch(
        self,
        images: Tensor,
        masks: Tensor,
        labels: Sequence[int],
        paths: Sequence[str],
        categories: Sequence[str],
        anomaly_maps: Tensor,
        scores: Tensor,
        thresholds: ThresholdLookup | None,
    ) -> None:
        """A test batch: images N×3×H×W uint8, masks N×H×W, fused maps N×1×H×W and image scores N.

        ``thresholds`` (category -> image, pixel threshold) is None when no threshold was fixed before the
        test (the authors' test-set fusion): the rows are then undecided.
        """
        start = time.perf_counter()
        images_np = images.permute(0, 2, 3, 1).cpu().numpy()
        masks_np = masks.cpu().numpy().astype(bool)
        maps_np = anomaly_maps[:, 0].float().cpu().numpy()
        for i, (category, path) in enumerate(zip(categories, paths, strict=True)):
            image_threshold, pixel_threshold = thresholds(category) if thresholds else (None, None)
            source = Path(path)
            name = self.unique_name(f"{category}/{source.parent.name}/{source.stem}")
            pictures = write_row_pictures(
                self.run_dir, name, images_np[i], maps_np[i], pixel_threshold, masks_np[i]
            )
            self.rows.append(
                decided_row(
                    name,
                    str(path),
                    category,
                    float(scores[i]),
                    image_threshold,
                    label=int(labels[i]),
                    thumbnail=pictures.thumbnail,
                    overlay_thumbnail=pictures.overlay_thumbnail,
                    overlay=pictures.overlay,
                )
            )
        self.seconds += time.perf_counter() - start

    def add_detection(
        self, name: str, image: np.ndarray, detection: Detection, thresholds: ThresholdLookup
    ) -> None:
        """A predicted image (H×W×3 uint8 at its own resolution) with its detection; no label."""
        start = time.perf_counter()
        image_threshold, pixel_threshold = thresholds(detection.category)
        name = self.unique_name(name)
        pictures = write_row_pictures(self.run_dir, name, image, detection.anomaly_map, pixel_threshold)
        row = decided_row(
            name,
            detection.source,
            detection.category or "",
            detection.score,
            image_threshold,
            thumbnail=pictures.thumbnail,
            overlay_thumbnail=pictures.overlay_thumbnail,
            overlay=pictures.overlay,
        )
        self.rows.append(row)
        self.seconds += time.perf_counter() - start

    def add_failure(self, path: str, reason: str) -> None:
        """An image that could not be read: a row with the reason and no score."""
        name = self.unique_name(Path(path).name)
        self.rows.append(ReviewRow(name=name, source=path, category="", error=reason))
