"""What the LightningModule and its callbacks need from a datamodule, as an explicit, checked interface."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from lightning.pytorch import Trainer
from torch import Tensor
from torch.utils.data import DataLoader

from onenip_pl.errors import ConfigError


@runtime_checkable
class NormalImageSource(Protocol):
    """Normal training images of every category, beyond the training triplets (OneNIPDataModule)."""

    holdout_categories: list[str]
    """Categories not trained on (the unseen-product protocol)."""

    @property
    def calibration_sources(self) -> dict[str, str]:
        """Where each category's calibration images come from (held_out, training, unseen)."""

    def calibration_dataloader(
        self, synthetic_anomalies: bool = False, all_normals: bool = False
    ) -> DataLoader:
        """Held-out normal images (and, for the F1 rule, synthetic anomalies of them) with test prompts."""

    def retrieval_bank_dataloader(self) -> DataLoader:
        """Normal training images as candidates of label-free prompt retrieval."""

    def prompt_bank_images(self, per_category: int) -> dict[str, Tensor]:
        """The first ``per_category`` normal training images of each category, uint8 K×3×S×S."""


def normal_image_source(trainer: Trainer | None, needed_for: str) -> NormalImageSource:
    """The trainer's datamodule, or a ConfigError saying what needs one."""
    datamodule = trainer.datamodule if trainer is not None else None
    if not isinstance(datamodule, NormalImageSource):
        raise ConfigError(
            f"{needed_for} needs a datamodule with normal training images (OneNIPDataModule); "
            f"got {type(datamodule).__name__}"
        )
    return datamodule
