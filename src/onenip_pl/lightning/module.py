"""OneNIPModule: the thin Lightning wrapper around the plain-torch OneNIP model.

It owns what Lightning is for: the training loss on triplets, the optimiser
and scheduler, fusion calibration before testing, and the per-category test
metrics. The model itself lives in ``onenip_pl.models`` and never imports
Lightning.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

from onenip_pl.errors import ConfigError
from onenip_pl.metrics import AnomalyMetrics
from onenip_pl.models import OneNIP
from onenip_pl.models.losses import onenip_loss

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate 1-D CPU tensors from this rank and, under DDP, from every rank."""
    local = torch.cat(chunks) if chunks else torch.empty(0)
    if not _distributed():
        return local
    everyone: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return torch.cat([t for t in everyone if t is not None])


def _quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile without torch.quantile's 16M-element limit."""
    return float(np.quantile(values.double().numpy(), q))


FUSION_MODES = ("calibrated", "official")
VALIDATION_METRICS = ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AP")


class OneNIPModule(LightningModule):
    """Trains OneNIP with MSE + dice_weight·Dice (spec §8) and tests it per category.

    Every keyword not listed here is passed to :class:`onenip_pl.models.OneNIP`
    (``backbone``, ``image_size``, ``num_decoder_layers``, ...), so each config
    key maps to exactly one constructor argument.

    ``fusion="calibrated"`` (default) fixes the refiner-map scale from normal
    training images before the test starts and stores it in the checkpoint;
    ``fusion="official"`` reproduces the authors' test-set min/max scale.
    """

    def __init__(
        self,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        lr_step_size: int = 800,
        lr_gamma: float = 0.1,
        dice_weight: float = 0.5,
        fusion: str = "calibrated",
        threshold_quantile: float = 0.99,
        binned_metrics: bool = False,
        **net_kwargs: Any,
    ) -> None:
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ConfigError(f"model.fusion={fusion!r} is unknown; use one of {FUSION_MODES}")
        self.save_hyperparameters()
        self.net = OneNIP(**net_kwargs)
        self.register_buffer("fusion_calibrated", torch.tensor(False))
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.test_metrics = AnomalyMetrics(binned=binned_metrics)
        self.val_metrics = AnomalyMetrics(metrics=VALIDATION_METRICS, binned=binned_metrics)
        self.test_results: dict[str, Any] | None = None
        self.prompt_bank: dict[str, dict[str, torch.Tensor]] = {}
        self._official_maps: list[dict[str, Any]] = []

    # ---- training -------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        query, synthetic, prompt = batch["query"], batch["synthetic"], batch["prompt"]
        size = query.shape[0]
        features = self.net.extract_features(torch.cat([query, synthetic, prompt]))
        query_features, synthetic_features, prompt_features = features.split(size)
        inputs = torch.cat([query_features, synthetic_features])
        reconstruction = self.net.reconstruct(inputs, prompt_features)
        logit = self.net.refine(reconstruction, inputs)
        masks = torch.cat([torch.zeros_like(batch["synthetic_mask"]), batch["synthetic_mask"]])
        target = torch.cat([query_features, query_features])
        losses = onenip_loss(reconstruction, target, logit, masks, dice_weight=self.hparams.dice_weight)
        if not torch.isfinite(losses["total"]):
            raise FloatingPointError(
                f"non-finite loss ({losses['total'].item()}) at global step {self.global_step}, epoch "
                f"{self.current_epoch}; lower model.lr or check the input data. No checkpoint was written "
                "for this step."
            )
        self.log_dict(
            {f"train/{name}": value for name, value in losses.items()},
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=size,
        )
        return losses["total"]

    def on_train_epoch_end(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=self.hparams.lr_step_size, gamma=self.hparams.lr_gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---- fusion calibration ---------------------------------------------------------------------

    @torch.no_grad()
    def calibrate_fusion(self, dataloader) -> float:
        """Fix the fusion scale and the decision thresholds on normal images, before any test.

        The scale is (max+min)/2 of the reconstruction maps, as the authors
        compute it over the test set (spec §7), but taken here over normal
        images only. The image and pixel thresholds are the
        ``threshold_quantile`` quantiles of the fused normal scores and pixels
        (pixels subsampled 4×4 to bound memory). Everything is reduced over
        all DDP ranks, so each rank ends with the same values.
        """
        was_training = self.training
        self.eval()
        rec_maps, refiner_maps = [], []
        for batch in dataloader:
            output = self.net(batch["image"].to(self.device), batch["prompt"].to(self.device))
            rec_maps.append(output["rec_map"].float())
            refiner_maps.append(output["refiner_map"].float())
        self.train(was_training)
        high = torch.stack([m.max() for m in rec_maps]).max() if rec_maps else torch.tensor(-float("inf"))
        low = torch.stack([m.min() for m in rec_maps]).min() if rec_maps else torch.tensor(float("inf"))
        high, low = high.to(self.device), low.to(self.device)
        if _distributed():
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if not torch.isfinite(high) or not torch.isfinite(low):
            raise RuntimeError("fusion calibration saw no normal image; check the training set")
        scale = (high + low) / 2
        scores, pixels = [], []
        for rec_map, refiner_map in zip(rec_maps, refiner_maps, strict=True):
            anomaly_map, image_score = self.net.fuse(rec_map, refiner_map, scale)
            scores.append(image_score.cpu())
            pixels.append(anomaly_map[..., ::4, ::4].flatten().cpu())
        scores_all = _gather_cat(scores)
        pixels_all = _gather_cat(pixels)
        quantile = self.hparams.threshold_quantile
        self.net.fusion_scale.fill_(scale)
        self.image_threshold.fill_(_quantile(scores_all, quantile))
        self.pixel_threshold.fill_(_quantile(pixels_all, quantile))
        self.fusion_calibrated.fill_(True)
        log.info(
            "Calibrated on %d normal images: fusion scale %.6g, image threshold %.6g, pixel threshold %.6g "
            "(quantile %.3g)",
            scores_all.numel(),
            float(scale),
            float(self.image_threshold),
            float(self.pixel_threshold),
            quantile,
        )
        return float(scale)

    # ---- prompt bank ----------------------------------------------------------------------------

    @torch.no_grad()
    def build_prompt_bank(self, images_per_category: dict[str, torch.Tensor]) -> None:
        """Store each category's prompt images (uint8) and their features in the checkpoint.

        With the bank, inference needs no training data: a test image is
        compared with its category's stored prompt features.
        """
        was_training = self.training
        self.eval()
        bank = {}
        for category, images in sorted(images_per_category.items()):
            batch = images.to(self.device).float().div(255.0)
            bank[category] = {
                "images": images.cpu(),
                "features": self.net.extract_features(batch).float().cpu(),
            }
        self.train(was_training)
        self.prompt_bank = bank
        log.info(
            "Prompt bank: %d categories, %d prompt(s) each",
            len(bank),
            len(next(iter(bank.values()))["images"]),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["prompt_bank"] = self.prompt_bank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.prompt_bank = checkpoint.get("prompt_bank", {})

    # ---- validation (held-out normals + synthetic anomalies) -----------------------------------

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        if self.hparams.fusion == "calibrated":
            self.calibrate_fusion(self.trainer.datamodule.calibration_dataloader())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        output = self.net(batch["image"], batch["prompt"])
        self.val_metrics.update(
            output["image_score"].float(),
            batch["label"],
            output["anomaly_map"].float(),
            batch["mask"],
            list(batch["category"]),
        )

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.log_dict({f"val/{name}": value for name, value in results["mean"].items()}, sync_dist=False)

    # ---- testing --------------------------------------------------------------------------------

    def on_test_start(self) -> None:
        self.test_metrics.reset()
        self._official_maps = []
        if self.hparams.fusion == "calibrated" and not bool(self.fusion_calibrated):
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
                raise ConfigError("fusion=calibrated needs a datamodule with normal training images")
            log.warning(
                "Checkpoint has no calibrated fusion scale: calibrating now on normal training images."
            )
            self.calibrate_fusion(datamodule.calibration_dataloader())

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        output = self.net(batch["image"], batch["prompt"])
        if self.hparams.fusion == "official":
            self._official_maps.append(
                {
                    "rec_map": output["rec_map"].float(),
                    "refiner_map": output["refiner_map"].float(),
                    "label": batch["label"],
                    "mask": batch["mask"],
                    "category": list(batch["category"]),
                }
            )
            return
        self.test_metrics.update(
            output["image_score"].float(),
            batch["label"],
            output["anomaly_map"].float(),
            batch["mask"],
            list(batch["category"]),
        )

    def _update_official_metrics(self) -> None:
        """Authors' fusion: scale from the min/max reconstruction map over the whole test set."""
        maps = self._official_maps
        high = torch.stack([m["rec_map"].max() for m in maps]).max() if maps else torch.tensor(-float("inf"))
        low = torch.stack([m["rec_map"].min() for m in maps]).min() if maps else torch.tensor(float("inf"))
        high, low = high.to(self.device), low.to(self.device)
        if _distributed():
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
        scale = (high + low) / 2
        for maps in self._official_maps:
            anomaly_map, image_score = self.net.fuse(maps["rec_map"], maps["refiner_map"], scale)
            self.test_metrics.update(image_score, maps["label"], anomaly_map, maps["mask"], maps["category"])
        self._official_maps = []

    def on_test_epoch_end(self) -> None:
        if self.hparams.fusion == "official":
            self._update_official_metrics()
        results = self.test_metrics.compute()
        self.test_results = results
        flat = {f"test/{name}": value for name, value in results["mean"].items()}
        for category, values in results["per_category"].items():
            flat.update({f"test/{category}/{name}": value for name, value in values.items()})
        self.log_dict(flat, sync_dist=False, rank_zero_only=True)
