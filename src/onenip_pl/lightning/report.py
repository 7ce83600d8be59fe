"""The test report, written once a test ends: the per-category table on the console, metrics.json/csv/md,
picture grids (image | ground truth | anomaly map | prediction) of a few images per category, ROC/PR
curves, report.html with a row per test image, and the same table, pictures and rows in W&B."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from onenip_pl.distributed import gather_objects
from onenip_pl.metrics.reports import format_table, plot_curves, write_reports
from onenip_pl.metrics.visual import SampleKeeper, VisualSample, write_sample_grids
from onenip_pl.review import ReviewRow, RunRows, write_review_page

log = logging.getLogger(__name__)


class TestReport(Callback):
    """Writes the report of every test into ``output_dir`` (None: only the console table).

    ``images_per_category`` test images per category go into ``visuals/<category>.png`` (0: none),
    half of them normal; ``curves`` writes ROC and PR plots under ``curves/``. Maps are kept in float16
    while the test runs and fused at the end with the scale the test used.

    ``html`` writes ``report.html`` with a row per test image (pictures under ``report/``, written by
    each rank as its batches end, so memory stays bounded); under the authors' test-set fusion, whose
    scale is known only at the end, the batches' maps are kept until then.
    """

    def __init__(
        self,
        output_dir: str | Path | None,
        images_per_category: int = 4,
        curves: bool = True,
        html: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.keeper = SampleKeeper(images_per_category)
        self.images_per_category = images_per_category
        self.curves = curves
        self.html = html
        self.files: dict[str, dict[str, Path]] = {}
        self.review: RunRows | None = None
        self._unfused: list[tuple[Any, ...]] = []
        self._started = time.perf_counter()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        keeps = self.output_dir is not None and trainer.is_global_zero
        self.keeper = SampleKeeper(self.images_per_category if keeps else 0)
        self.files = {}
        self.review = RunRows(self.output_dir) if self.html and self.output_dir is not None else None
        self._unfused = []
        self._started = time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.review is not None:
            self._review_batch(pl_module, batch, outputs)
        keeper = self.keeper
        if keeper.per_category == 0:
            return
        for i, (category, label) in enumerate(zip(batch["category"], batch["label"].tolist(), strict=True)):
            if keeper.wants(category, label):
                keeper.add(
                    category,
                    label,
                    image=batch["image"][i].mul(255).round().to(torch.uint8).cpu(),
                    mask=batch["mask"][i, 0].bool().cpu(),
                    rec_map=outputs["rec_map"][i].half().cpu(),
                    refiner_map=outputs["refiner_map"][i].half().cpu(),
                    path=str(batch["path"][i]),
                )

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = pl_module.test_results
        writes_curves = self.output_dir is not None and self.curves
        # gathered over ranks, so every rank takes part before rank zero writes
        data = pl_module.evaluator.category_data() if writes_curves and results is not None else {}
        review, seconds = None, 0.0
        if self.review is not None and results is not None:
            review = self._gathered_rows(pl_module)
            seconds = max(gather_objects(self.review.seconds))  # the ranks wrote side by side
        self.review = None
        if results is None or not trainer.is_global_zero:
            return
        if self.output_dir is not None:
            samples = self._fused_samples(pl_module)
            if samples:
                post = pl_module.post_processor
                thresholds = None if post.uses_test_set else {c: post.thresholds(c)[1] for c in samples}
                self.files["visuals"] = write_sample_grids(samples, self.output_dir / "visuals", thresholds)
            if data:
                self.files["curves"] = plot_curves(data, self.output_dir / "curves")
        if review is not None:
            start = time.perf_counter()
            title = f"Test review: {self.output_dir}"
            page = write_review_page(
                review, self.output_dir, title=title, labelled=True, results=results, files=self.files
            )
            seconds += time.perf_counter() - start
            elapsed = time.perf_counter() - self._started
            log.info(
                "Review page written to %s: %d rows in %.2f s, %.1f %% of the test's %.1f s",
                page,
                len(review),
                seconds,
                100 * seconds / elapsed,
                elapsed,
            )
        report_results(results, self.output_dir, trainer.loggers, self.files)
        if review is not None:
            log_review_table(review, self.output_dir, trainer.loggers)
        self.keeper = SampleKeeper(0)

    def _review_batch(self, pl_module: LightningModule, batch: Any, outputs: Any) -> None:
        """Write the batch's review rows now, or keep its maps when the fusion scale is not known yet."""
        fields = (
            batch["image"].mul(255).round().to(torch.uint8).cpu(),
            batch["mask"][:, 0].bool().cpu(),
            batch["label"].tolist(),
            [str(path) for path in batch["path"]],
            [str(category) for category in batch["category"]],
        )
        post = pl_module.post_processor
        if post.uses_test_set:
            maps = (outputs["rec_map"].float().cpu(), outputs["refiner_map"].float().cpu())
            self._unfused.append((*fields, *maps))
            return
        # the same fusion test_step scored the batch with, so the rows' scores are the evaluator's
        anomaly_maps, scores = pl_module.net.fuse(outputs["rec_map"], outputs["refiner_map"])
        self.review.add_test_batch(*fields, anomaly_maps, scores.cpu(), post.thresholds)

    def _gathered_rows(self, pl_module: LightningModule) -> list[ReviewRow]:
        """Every rank's rows (a collective under DDP: call it on every rank), the kept batches first
        fused with the test-set scale, which decides nothing (no threshold was fixed before the test)."""
        for *fields, rec_map, refiner_map in self._unfused:
            anomaly_maps, scores = pl_module.net.fuse(rec_map, refiner_map, pl_module.test_scale.cpu())
            self.review.add_test_batch(*fields, anomaly_maps, scores, None)
        self._unfused = []
        return [row for rows in gather_objects(self.review.rows) for row in rows]

    def _fused_samples(self, pl_module: LightningModule) -> dict[str, list[VisualSample]]:
        samples = {}
        for category, kept in sorted(self.keeper.samples.items()):
            rec_map = torch.stack([sample["rec_map"] for sample in kept]).float().to(pl_module.device)
            refiner_map = torch.stack([sample["refiner_map"] for sample in kept]).float().to(pl_module.device)
            anomaly_maps, scores = pl_module.net.fuse(rec_map, refiner_map, pl_module.test_scale)
            samples[category] = [
                VisualSample(s["image"], s["mask"], m[0].cpu(), s["label"], float(score), s["path"])
                for s, m, score in zip(kept, anomaly_maps, scores, strict=True)
            ]
        return samples


@rank_zero_only
def report_results(
    results: dict[str, Any],
    output_dir: Path | None,
    loggers: list[Logger],
    files: Mapping[str, Mapping[str, Path]] | None = None,
) -> None:
    """Print the per-category table, write metrics.json/csv/md and log the table to W&B, with the
    report's PNG files (``{"visuals": {category: path}, "curves": {...}}``) as W&B images."""
    print(format_table(results), flush=True)
    if output_dir is not None:
        paths = write_reports(results, output_dir)
        log.info("Metrics written to %s", ", ".join(str(p) for p in paths.values()))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            metric_names = list(results["mean"].keys())
            rows = [
                [cat, *[values.get(m) for m in metric_names]]
                for cat, values in results["per_category"].items()
            ]
            rows.append(["mean", *[results["mean"].get(m) for m in metric_names]])
            logger.log_table("test/per_category", columns=["category", *metric_names], data=rows)
            for kind, pictures in (files or {}).items():
                if pictures:
                    logger.log_image(
                        f"test/{kind}", [str(p) for p in pictures.values()], caption=list(pictures)
                    )
    for kind, pictures in (files or {}).items():
        if pictures:
            log.info("Test %s written to %s", kind, Path(next(iter(pictures.values()))).parent)


def log_review_table(rows: list[ReviewRow], run_dir: Path, loggers: list[Logger]) -> None:
    """The review rows as a W&B table (overlay thumbnail, score, threshold, decision, label, outcome)."""
    import wandb

    columns = ["overlay", "name", "category", "score", "image_threshold", "decision", "label", "outcome"]
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        data = [
            [
                wandb.Image(str(run_dir / row.overlay_thumbnail)) if row.overlay_thumbnail else None,
                row.name,
                row.category,
                row.score,
                row.image_threshold,
                None if row.decision is None else ("anomalous" if row.decision else "normal"),
                row.label,
                row.outcome,
            ]
            for row in rows
        ]
        logger.log_table("test/review", columns=columns, data=data)
