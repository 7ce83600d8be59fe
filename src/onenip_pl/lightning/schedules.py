"""Learning-rate schedules beyond torch's, built like them from the optimiser (Hydra ``_partial_`` nodes)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from onenip_pl.errors import ConfigError


def warmup_cosine(
    optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 1, final_fraction: float = 0.01
) -> LambdaLR:
    """A linear warm-up over ``warmup_epochs`` epochs, then a cosine decay to ``final_fraction`` of the
    learning rate at ``max_epochs`` (stepped once per epoch). A short run spends its last epochs at small
    steps instead of stopping at full speed, which the authors' 1000-epoch StepLR never had to care about."""
    if max_epochs < 1 or not 0 <= warmup_epochs < max_epochs:
        raise ConfigError(
            f"model.scheduler: warmup_epochs={warmup_epochs} must lie in [0, max_epochs={max_epochs})"
        )

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        progress = (epoch - warmup_epochs) / max(1, max_epochs - warmup_epochs)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
