"""Predict: `python -m onenip_pl.predict ckpt_path=PATH input=DIR|FILE|GLOB [category=NAME | prompt=IMAGE]`.

Writes, in the run directory: predictions.csv (one row per image), maps/ (the anomaly map of each image at its
original resolution), overlays/ (image + heat-map + outline of the region above the pixel threshold),
run_info.json and report.html (a row per image, highest score first; report=false: none). A file that cannot
be read is named and skipped (a failed row in report.html); the run exits non-zero if any was.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from onenip_pl.calibration import PostProcessor
from onenip_pl.config import config_dir
from onenip_pl.data.image_io import IMAGE_EXTENSIONS, read_rgb
from onenip_pl.errors import ConfigError, DataError, run_or_exit
from onenip_pl.inference import Detection, OneNIPDetector
from onenip_pl.inference.visualize import overlay, save_map_png16, save_rgb
from onenip_pl.review import RunRows, write_review_page

log = logging.getLogger(__name__)

MAP_FORMATS = ("npy", "png16", "both", "none")
CSV_COLUMNS = (
    "path",
    "category",
    "prompt",
    "image_score",
    "decision",
    "similarity",
    "anomaly_map",
    "overlay",
)


@dataclass
class PredictReport:
    """What a predict run wrote: one row per predicted image, and the files that could not be read."""

    output_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def csv_path(self) -> Path:
        return self.output_dir / "predictions.csv"


def expand_input(spec: str) -> tuple[list[Path], Path]:
    """The files an `input=` names (a file, a directory searched recursively, or a glob) and their base.

    In a directory only image extensions count; other files are named in a warning, never silently dropped.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        ignored = [str(p.relative_to(path)) for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if ignored:
            log.warning(
                "Ignoring %d file(s) without an image extension %s in %s: %s%s",
                len(ignored),
                IMAGE_EXTENSIONS,
                path,
                ", ".join(ignored[:10]),
                " ..." if len(ignored) > 10 else "",
            )
        if not images:
            raise ConfigError(f"input={spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path}.")
        return images, path
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        raise ConfigError(f"input={spec} is neither a file, a directory nor a glob matching any file.")
    return files, Path(os.path.commonpath([str(p.parent) for p in files]))


def output_names(files: list[Path], base: Path) -> list[str]:
    """Relative output names mirroring the input tree; the extension is kept only to tell twins apart."""
    stems = [str(p.relative_to(base).with_suffix("")) for p in files]
    counts = Counter(stems)
    return [
        stem if counts[stem] == 1 else f"{stem}_{p.suffix.lstrip('.').lower()}"
        for stem, p in zip(stems, files, strict=True)
    ]


def _png16_scale(cfg: DictConfig, pixel_threshold: float) -> float | None:
    if cfg.maps not in ("png16", "both"):
        return None
    scale = cfg.png16_max if cfg.png16_max is not None else 2.0 * pixel_threshold
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(
            "maps=png16 needs a full scale: the checkpoint has no calibrated pixel threshold, so set "
            "png16_max=VALUE (the map value written as 65535)."
        )
    return float(scale)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[failed]} unreadable"),
    )


@dataclass
class OutputWriter:
    """Writes one image's map(s) and overlay under the run directory and returns its CSV row."""

    output_dir: Path
    maps: str
    overlays: bool
    post_processor: PostProcessor
    png16_scale: float | None

    def write(self, name: str, rgb: np.ndarray, detection: Detection, prompt: str) -> dict[str, Any]:
        map_file = ""
        if self.maps in ("npy", "both"):
            map_file = f"maps/{name}.npy"
            (self.output_dir / map_file).parent.mkdir(parents=True, exist_ok=True)
            np.save(self.output_dir / map_file, detection.anomaly_map.astype(np.float32))
        if self.maps in ("png16", "both"):
            png_file = f"maps/{name}.png"
            save_map_png16(detection.anomaly_map, self.output_dir / png_file, self.png16_scale)
            map_file = map_file or png_file
        overlay_file = ""
        if self.overlays:
            overlay_file = f"overlays/{name}.png"
            label = f"{detection.category or 'prompt'} {detection.score:.4g} {detection.verdict}"
            pixel_threshold = self.post_processor.thresholds(detection.category)[1]
            picture = overlay(rgb, detection.anomaly_map, pixel_threshold, label)
            save_rgb(picture, self.output_dir / overlay_file)
        return {
            "path": detection.source,
            "category": detection.category or "",
            "prompt": prompt,
            "image_score": f"{detection.score:.6g}",
            "decision": detection.verdict,
            "similarity": "" if detection.similarity is None else f"{detection.similarity:.4f}",
            "anomaly_map": map_file,
            "overlay": overlay_file,
        }


def _read_batch(batch: list[tuple[Path, str]], report: PredictReport) -> list[tuple[Path, str, np.ndarray]]:
    """Decode a batch; a file that cannot be read is recorded in the report and skipped, not fatal."""
    loaded = []
    for path, name in batch:
        try:
            loaded.append((path, name, read_rgb(path)))
        except DataError as error:
            report.failures.append((str(path), str(error)))
            log.error("Skipping %s: %s", path, error)
    return loaded


def predict_files(cfg: DictConfig) -> PredictReport:
    """Predict every file of `cfg.input` and write the results into `cfg.paths.output_dir`."""
    if cfg.maps not in MAP_FORMATS:
        raise ConfigError(f"maps={cfg.maps!r} is unknown; use one of {MAP_FORMATS}.")
    if cfg.category is not None and cfg.prompt is not None:
        raise ConfigError("give either category=NAME or prompt=IMAGE, not both.")
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be at least 1.")
    files, base = expand_input(str(cfg.input))
    names = output_names(files, base)
    category = None if cfg.category is None else str(cfg.category)  # BTAD's are named 01, 02, 03
    detector = OneNIPDetector.from_checkpoint(cfg.ckpt_path, device=cfg.device, runtime=cfg.runtime)
    prompt = read_rgb(cfg.prompt) if cfg.prompt is not None else None
    if prompt is None and category is None:
        log.info("No category given: each image gets the category of its nearest bank prompt")
    report = PredictReport(Path(cfg.paths.output_dir))
    report.output_dir.mkdir(parents=True, exist_ok=True)
    writer = OutputWriter(
        report.output_dir,
        cfg.maps,
        bool(cfg.overlays),
        detector.post_processor,
        _png16_scale(cfg, detector.pixel_threshold),
    )
    review = RunRows(report.output_dir) if cfg.report else None
    batch_size = int(cfg.batch_size)
    with open(report.csv_path, "w", newline="") as handle, _progress() as progress:
        table = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        table.writeheader()
        task = progress.add_task("predict", total=len(files), failed=0)
        for start in range(0, len(files), batch_size):
            stop = start + batch_size
            batch = list(zip(files[start:stop], names[start:stop], strict=True))
            loaded = _read_batch(batch, report)
            if loaded:
                detections = detector.predict(
                    [rgb for _, _, rgb in loaded],
                    category=category,
                    prompt=prompt,
                    batch_size=batch_size,
                    names=[str(path) for path, _, _ in loaded],
                )
                for (_, name, rgb), detection in zip(loaded, detections, strict=True):
                    row = writer.write(name, rgb, detection, str(cfg.prompt or ""))
                    table.writerow(row)
                    report.rows.append(row)
                    if review is not None:
                        review.add_detection(name, rgb, detection, detector.post_processor.thresholds)
            progress.update(task, advance=len(batch), failed=len(report.failures))
    _write_run_info(report, cfg, writer)
    if review is not None:
        _write_review(review, report, str(cfg.input))
    _log_summary(report)
    return report


def _write_review(review: RunRows, report: PredictReport, input_spec: str) -> None:
    """report.html: the predicted rows and a failed row, with its reason, per unreadable file."""
    for path, error in report.failures:
        review.add_failure(path, error)
    title = f"Predict review: {input_spec}"
    page = write_review_page(review.rows, report.output_dir, title=title, labelled=False)
    log.info("Review page written to %s", page)


def _write_run_info(
    report: PredictReport, cfg: DictConfig, writer: OutputWriter
) -> None:
    """run_info.json: what was predicted with which thresholds, and every unreadable file with its error."""
    info = {
        "ckpt_path": str(cfg.ckpt_path),
        "input": str(cfg.input),
        "category": cfg.category,
        "prompt": cfg.prompt,
        "thresholds": writer.post_processor.threshold_table(),
        "png16_full_scale": writer.png16_scale,
        "predicted": len(report.rows),
        "anomalous": sum(row["decision"] == "anomalous" for row in report.rows),
        "failed": [{"path": path, "error": error} for path, error in report.failures],
    }
    (report.output_dir / "run_info.json").write_text(json.dumps(info, indent=2))


def _log_summary(report: PredictReport) -> None:
    verdicts = Counter(row["decision"] for row in report.rows)
    log.info(
        "Predicted %d image(s): %s. Results in %s",
        len(report.rows),
        ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items())) or "none",
        report.csv_path,
    )
    if report.failures:
        log.error("%d file(s) could not be read:", len(report.failures))
        for path, error in report.failures:
            log.error("  %s: %s", path, error)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
def main(cfg: DictConfig) -> None:
    report = run_or_exit(predict_files, cfg, log)
    if report.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
