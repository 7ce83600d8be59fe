"""Training loss (spec §8): feature restoration MSE + weighted Dice of the refiner, both in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dice_loss(refiner_logit: Tensor, masks: Tensor, smooth: float = 1.0) -> Tensor:
    """Mean over images of 1 - (sum p*t + 1) / (sum p^2 + sum t^2 + 1), with p = sigmoid(logit)."""
    prediction = torch.sigmoid(refiner_logit.float()).flatten(1)
    target = masks.float().flatten(1)
    if prediction.shape != target.shape:
        raise ValueError(
            f"refiner logits {tuple(refiner_logit.shape)} and masks {tuple(masks.shape)} differ."
        )
    overlap = (prediction * target).sum(dim=1) + smooth
    total = (prediction.square() + target.square()).sum(dim=1) + smooth
    return (1.0 - overlap / total).mean()


def onenip_loss(
    reconstruction: Tensor,
    target_features: Tensor,
    refiner_logit: Tensor,
    masks: Tensor,
    dice_weight: float = 0.5,
) -> dict[str, Tensor]:
    """MSE(reconstruction, clean target features) + dice_weight * Dice(sigmoid(logit), masks)."""
    with torch.autocast(device_type=reconstruction.device.type, enabled=False):
        mse = F.mse_loss(reconstruction.float(), target_features.float())
        dice = dice_loss(refiner_logit, masks)
    return {"mse": mse, "dice": dice, "total": mse + dice_weight * dice}
