"""Callbacks of OneNIP training: calibration and the prompt bank at the end of fit."""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, LightningModule, Trainer

from onenip_pl.data.prompts import PromptBank
from onenip_pl.errors import ConfigError
from onenip_pl.lightning.interfaces import normal_image_source

log = logging.getLogger(__name__)


def is_last_training_epoch(trainer: Trainer) -> bool:
    """True while the epoch that just finished is the final one of this fit."""
    if trainer.fast_dev_run:
        return True
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    return trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs


class Calibration(Callback):
    """Fixes the fusion scale and thresholds on held-out normal images at the end of training.

    Runs before the checkpoint callback (Lightning orders checkpointing last), so the final checkpoint
    carries the calibration and a later ``eval`` or ``predict`` needs no training data to decide.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.post_processor.uses_test_set or not is_last_training_epoch(trainer):
            return
        pl_module.calibrate_on(normal_image_source(trainer, "calibration"))


class PromptBankBuilder(Callback):
    """Puts the first ``per_category`` normal training images of each category, with their features,
    into the final checkpoint: inference then needs no training data."""

    def __init__(self, per_category: int = 1) -> None:
        if per_category < 1:
            raise ConfigError(f"callbacks.prompt_bank.per_category={per_category} must be at least 1")
        self.per_category = per_category

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not is_last_training_epoch(trainer):
            return
        images = normal_image_source(trainer, "the prompt bank").prompt_bank_images(self.per_category)
        pl_module.prompt_bank = PromptBank.from_images(
            pl_module.net.extract_features, images, pl_module.device
        )
        log.info("Prompt bank: %d categories, %d prompt(s) each", len(images), self.per_category)
