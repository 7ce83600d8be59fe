"""The learning curve: the test metrics every few epochs, as a report of how quality grows with training.

A report, never a checkpoint chooser: it writes no checkpoint, it changes nothing the final test uses
(the end-of-fit calibration runs again after it), and it puts back every random generator, so training
goes on exactly as it would without it. Its own time is left out of the training time it records.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from onenip_pl.errors import ConfigError
from onenip_pl.lightning.callbacks import is_last_training_epoch
from onenip_pl.lightning.interfaces import normal_image_source
from onenip_pl.lightning.resume import restore_rng_state, rng_state
from onenip_pl.metrics.evaluator import Evaluator

CURVE_METRICS = ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AP", "pixel_AUPRO")


class LearningCurve(Callback):
    """Every ``every_n_epochs`` epochs (the last one excepted: the run's own test measures it): calibrate
    on the held-out split, test, and append a row to ``csv_path`` (epoch, training seconds so far, the
    mean metrics and each category's). When training ends, ``<csv_path>.json`` gets the epochs trained and
    the training seconds without the curve's own; ``every_n_epochs=None`` only times the training."""

    def __init__(self, every_n_epochs: int | None, csv_path: str | Path) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ConfigError(f"the learning curve's every_n_epochs={every_n_epochs} must be at least 1")
        self.every_n_epochs = every_n_epochs
        self.csv_path = Path(csv_path)
        self._start = 0.0
        self._spent = 0.0
        self.rows: list[dict[str, Any]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._spent = time.perf_counter(), 0.0

    def training_seconds(self) -> float:
        """Wall seconds of training since it started, the curve's own evaluations left out."""
        return time.perf_counter() - self._start - self._spent

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs is None or epoch % self.every_n_epochs or is_last_training_epoch(trainer):
            return
        began = time.perf_counter()
        seconds = began - self._start - self._spent
        states = rng_state(pl_module.device)
        results = self._test(trainer, pl_module)
        restore_rng_state(states, pl_module.device)
        self._spent += time.perf_counter() - began
        if trainer.is_global_zero:
            self.add_row(epoch, seconds, results)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            summary = {
                "epochs": trainer.current_epoch,
                "train_seconds": round(self.training_seconds(), 1),
                "curve_seconds": round(self._spent, 1),
            }
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            self.csv_path.with_suffix(".json").write_text(json.dumps(summary, indent=2))

    @torch.no_grad()
    def _test(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        source = normal_image_source(trainer, "the learning curve")
        pl_module.calibrate_on(source)
        was_training = pl_module.training
        pl_module.eval()
        evaluator = Evaluator(metrics=CURVE_METRICS).to(pl_module.device)
        for batch in trainer.datamodule.test_dataloader():
            rec_map, refiner_map, _ = pl_module.prompted_maps(batch)
            labels, masks = batch["label"].to(pl_module.device), batch["mask"].to(pl_module.device)
            evaluator.update(*pl_module.net.fuse(rec_map, refiner_map), labels, masks, batch["category"])
        pl_module.train(was_training)
        return evaluator.compute()

    def add_row(self, epoch: int, seconds: float, results: dict[str, Any]) -> None:
        """Append one point of the curve to the CSV (written anew, so a killed run keeps its points)."""
        row = {"epoch": epoch, "train_seconds": round(seconds, 1)}
        row |= {f"mean/{name}": results["mean"].get(name) for name in CURVE_METRICS}
        for category, values in results["per_category"].items():
            row |= {f"{category}/{name}": values.get(name) for name in CURVE_METRICS}
        self.rows.append(row)
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(key for entry in self.rows for key in entry))
        with self.csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
