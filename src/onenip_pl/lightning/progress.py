"""Progress a person can read: Lightning's Rich bar on a terminal, plain log lines everywhere else.

Under SLURM, nohup or CI, stdout is a file: a redrawn bar writes nothing readable there, so a long run
would show nothing between its model summary and its end. The plain reporter writes one line every
``every_n_steps`` optimiser steps and one at the end of each epoch: epoch, step, loss, images per second,
elapsed time and time left; and one every ``every_n_steps`` batches while testing.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from onenip_pl.errors import ConfigError

log = logging.getLogger(__name__)


def progress_callback(every_n_steps: int = 50, terminal: bool | None = None) -> ProgressBar:
    """The Rich bar when stdout is a terminal (``terminal=None``: look), else :class:`LogProgress`."""
    if every_n_steps < 1:
        raise ConfigError(f"progress.every_n_steps={every_n_steps} must be at least 1")
    on_terminal = sys.stdout.isatty() if terminal is None else terminal
    return RichProgressBar() if on_terminal else LogProgress(every_n_steps)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class LogProgress(ProgressBar):
    """Plain progress lines through the logging system (console and the run's log file)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.enabled = True
        self._fit_start = 0.0
        # (start time, images since) of the current step window and of the current epoch
        self._windows = {"step": [0.0, 0], "epoch": [0.0, 0]}
        self._test_start = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    # ---- training -------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if self.enabled:
            log.info(
                "Training: %d epochs of %s batches, %s optimiser steps; a progress line every %d steps",
                trainer.max_epochs,
                self.total_train_batches,
                trainer.estimated_stepping_batches,
                self.every_n_steps,
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        now = time.perf_counter()
        self._windows = {"step": [now, 0], "epoch": [now, 0]}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for window in self._windows.values():
            window[1] += _batch_size(batch) * trainer.world_size
        if self.enabled and trainer.global_step % self.every_n_steps == 0 and trainer.global_step:
            self._report(trainer, outputs, "step")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled:
            self._report(trainer, None, "epoch")

    def _report(self, trainer: Trainer, outputs: Any, window: str) -> None:
        """A line; its speed is over the images since the last step line (or the whole epoch)."""
        now = time.perf_counter()
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        elapsed = now - self._fit_start
        left = elapsed / step * (total - step) if step else math.inf
        started, images = self._windows[window]
        speed = images / max(now - started, 1e-9)
        self._windows["step"] = [now, 0]
        epoch_done = window == "epoch"
        loss = _loss(outputs, trainer, epoch_done)
        log.info(
            "epoch %d/%d%s  step %d/%d  loss %s  %.1f img/s  elapsed %s  left %s",
            trainer.current_epoch + 1,
            trainer.max_epochs,
            " done" if epoch_done else "",
            step,
            total,
            loss,
            speed,
            _duration(elapsed),
            _duration(left),
        )

    # ---- testing --------------------------------------------------------------------------------

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._test_start = time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        done, total = batch_idx + 1, trainer.num_test_batches[dataloader_idx]
        if self.enabled and (done % self.every_n_steps == 0 or done == total):
            elapsed = time.perf_counter() - self._test_start
            left = elapsed / done * (total - done)
            log.info(
                "test batch %d/%d  elapsed %s  left %s", done, total, _duration(elapsed), _duration(left)
            )


def _batch_size(batch: Any) -> int:
    return len(batch["query"]) if isinstance(batch, dict) and "query" in batch else 0


def _loss(outputs: Any, trainer: Trainer, epoch_done: bool) -> str:
    """The step's loss, or the epoch's mean once the epoch is done."""
    value = trainer.callback_metrics.get("train/total_epoch") if epoch_done else None
    if value is None and outputs is not None:
        value = outputs["loss"] if isinstance(outputs, dict) else outputs
    return "?" if value is None else f"{float(value):.4g}"
