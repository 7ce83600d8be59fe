"""Callbacks specific to OneNIP training."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from onenip_pl.errors import ConfigError


def is_last_training_epoch(trainer: Trainer) -> bool:
    """True while the epoch that just finished is the final one of this fit."""
    if trainer.fast_dev_run:
        return True
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    return trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs


class FusionCalibration(Callback):
    """Fixes the fusion scale on normal training images at the end of training.

    Runs before the checkpoint callback (Lightning orders checkpointing last),
    so the final checkpoint carries the scale and a later `eval` or `predict`
    needs no training data to fuse maps.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.hparams.get("fusion") != "calibrated" or not is_last_training_epoch(trainer):
            return
        pl_module.calibrate_fusion(trainer.datamodule.calibration_dataloader())


class PromptBank(Callback):
    """Puts the first ``per_category`` normal training images of each category, with their
    features, into the final checkpoint (see OneNIPModule.build_prompt_bank)."""

    def __init__(self, per_category: int = 1) -> None:
        if per_category < 1:
            raise ConfigError(f"prompt_bank.per_category={per_category} must be at least 1")
        self.per_category = per_category

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if is_last_training_epoch(trainer):
            pl_module.build_prompt_bank(trainer.datamodule.prompt_bank_images(self.per_category))
