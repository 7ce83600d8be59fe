"""The test report, written once a test ends: the per-category table on the console, metrics.json/csv/md,
picture grids (image | ground truth | anomaly map | prediction) of a few images per category, ROC/PR
curves, and the same table and pictures in W&B."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from onenip_pl.metrics.reports import format_table, plot_curves, write_reports
from onenip_pl.metrics.visual import SampleKeeper, VisualSample, write_sample_grids

log = logging.getLogger(__name__)


class TestReport(Callback):
    """Writes the report of every test into ``output_dir`` (None: only the console table).

    ``images_per_category`` test images per category go into ``visuals/<category>.png`` (0: none),
    half of them normal; ``curves`` writes ROC and PR plots under ``curves/``. Maps are kept in float16
    while the test runs and fused at the end with the scale the test used.
    """

    def __init__(
        self, output_dir: str | Path | None, images_per_category: int = 4, curves: bool = True
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.keeper = SampleKeeper(images_per_category)
        self.images_per_category = images_per_category
        self.curves = curves
        self.files: dict[str, dict[str, Path]] = {}

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        keeps = self.output_dir is not None and trainer.is_global_zero
        self.keeper = SampleKeeper(self.images_per_category if keeps else 0)
        self.files = {}

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
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
        report_results(results, self.output_dir, trainer.loggers, self.files)
        self.keeper = SampleKeeper(0)

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
