"""OneNIPModule: the thin Lightning wrapper around the plain-torch OneNIP model.

It owns what Lightning is for: the training loss on triplets, the optimiser
and scheduler, fusion calibration before testing, and the per-category test
metrics. The model itself lives in ``onenip_pl.models`` and never imports
Lightning.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from omegaconf import Container, OmegaConf

from onenip_pl.errors import ConfigError
from onenip_pl.lightning.feature_cache import (
    CACHE_MODES,
    FeatureCache,
    build_feature_cache,
    describe_cache_size,
)
from onenip_pl.lightning.resume import restore_rng_state, rng_state
from onenip_pl.metrics import AnomalyMetrics, CategoryData, summarize
from onenip_pl.metrics.reports import plot_curves
from onenip_pl.metrics.visual import SampleKeeper, VisualSample, write_sample_grids
from onenip_pl.models import OneNIP
from onenip_pl.models.losses import onenip_loss

if TYPE_CHECKING:
    from onenip_pl.inference.retrieval import RetrievalBank

log = logging.getLogger(__name__)

# The frozen backbone is in eval mode on purpose (spec §3: BatchNorm keeps its running statistics).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# The module's on_before_batch_transfer (feature cache) is meant to run with the datamodule.
warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule` but"
)
# Without data.val_fraction the validation loader is deliberately empty.
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")


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


def _gather_objects(local: Any) -> list[Any]:
    """This rank's picklable object and, under DDP, every other rank's, in rank order."""
    if not _distributed():
        return [local]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return everyone


def f1_at_threshold(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    """F1 of the decision ``score >= threshold`` (a threshold fixed before the test, unlike F1max);
    NaN when there is neither an anomaly nor a false alarm to count."""
    predicted = scores >= threshold
    actual = labels.bool()
    true_positives = int((predicted & actual).sum())
    errors = int((predicted ^ actual).sum())
    denominator = 2 * true_positives + errors
    return 2 * true_positives / denominator if denominator else float("nan")


def _plain_containers(hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters with OmegaConf lists/dicts turned into builtin ones."""
    return {
        name: OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
        for name, value in hyper_parameters.items()
    }


class _DeferredFiniteFlag:
    """A GPU loss's finiteness, copied to pinned host memory without waiting; read one step later.

    Waiting on the copy's event (recorded right after the loss) does not wait for the backward pass
    and optimiser step queued behind it, unlike reading the flag at once.
    """

    def __init__(self, finite: torch.Tensor, loss: torch.Tensor, step: int, epoch: int) -> None:
        self.host = torch.empty((), dtype=finite.dtype, pin_memory=True)
        self.host.copy_(finite, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        self.loss, self.step, self.epoch = loss.detach(), step, epoch

    def is_finite(self) -> bool:
        self.copied.synchronize()
        return bool(self.host)


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

    ``compile=True`` runs the reconstructor (the trained transformer) through
    ``torch.compile`` when fitting starts (a backend name instead of ``True``
    picks another compile backend than inductor); the weights keep their names.

    ``feature_cache="memory"|"disk"`` keeps the frozen backbone's features of the
    (never augmented) normal training images, so that a training step runs the
    backbone on its synthetic anomalies only; ``feature_cache_dir`` holds the
    on-disk cache (default ``<trainer.default_root_dir>/feature_cache``).
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
        compile: bool | str = False,
        feature_cache: str = "none",
        feature_cache_dir: str | None = None,
        **net_kwargs: Any,
    ) -> None:
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ConfigError(f"model.fusion={fusion!r} is unknown; use one of {FUSION_MODES}")
        if feature_cache not in CACHE_MODES:
            raise ConfigError(f"model.feature_cache={feature_cache!r} is unknown; use one of {CACHE_MODES}")
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
        self.calibration_prompt: str | None = None
        self.report_dir: Path | None = None
        self.report_images_per_category = 0
        self.report_curves = False
        self.report_files: dict[str, dict[str, Path]] = {}
        self._retrieval_bank: RetrievalBank | None = None
        self._retrieval_pairs: list[tuple[str, str]] = []
        self._sample_keeper = SampleKeeper(0)
        self._test_scale: torch.Tensor | None = None
        self._resumed_rng_states: list[dict[str, Any]] | None = None
        self._feature_cache: FeatureCache | None = None
        self._deferred_loss_check: _DeferredFiniteFlag | None = None

    # ---- training -------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._check_deferred_loss()
        query, synthetic, prompt = batch["query"], batch["synthetic"], batch["prompt"]
        size = query.shape[0]
        if self.feature_cache is None:
            features = self.net.extract_features(torch.cat([query, synthetic, prompt]))
            query_features, synthetic_features, prompt_features = features.split(size)
        else:
            query_features, synthetic_features, prompt_features = self.feature_cache.triplet_features(
                self.net, batch
            )
        inputs = torch.cat([query_features, synthetic_features])
        reconstruction = self.net.reconstruct(inputs, prompt_features)
        logit = self.net.refine(reconstruction, inputs)
        masks = torch.cat([torch.zeros_like(batch["synthetic_mask"]), batch["synthetic_mask"]])
        target = torch.cat([query_features, query_features])
        losses = onenip_loss(reconstruction, target, logit, masks, dice_weight=self.hparams.dice_weight)
        self._stop_on_non_finite(losses["total"])
        self.log_dict(
            {f"train/{name}": value for name, value in losses.items()},
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=size,
            sync_dist=True,
        )
        return losses["total"]

    def _stop_on_non_finite(self, loss: torch.Tensor) -> None:
        """Raise before the optimiser steps on a NaN/inf loss; under DDP every rank raises together
        (one rank stopping alone would leave the others waiting in the gradient all-reduce)."""
        finite = torch.isfinite(loss.detach()).float()
        if _distributed():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if loss.is_cuda:
            # reading the flag now would wait for the GPU: it is copied asynchronously and read next step
            step, epoch = self.global_step, self.current_epoch
            self._deferred_loss_check = _DeferredFiniteFlag(finite, loss, step, epoch)
            return
        if not bool(finite):
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}; "
                f"this rank's loss: {loss.item()}): training stopped before that step's update and "
                "checkpoint. Lower model.lr or check the input data."
            )

    def _check_deferred_loss(self) -> None:
        """Raise for a NaN/inf loss of the previous GPU step (every rank at the same step, before any
        checkpoint: this runs at the start of each step and at the end of each epoch)."""
        pending, self._deferred_loss_check = self._deferred_loss_check, None
        if pending is not None and not pending.is_finite():
            raise FloatingPointError(
                f"non-finite training loss at global step {pending.step} (epoch {pending.epoch}; "
                f"this rank's loss: {pending.loss.item()}): training stopped after that step's update, "
                "before any checkpoint. Lower model.lr or check the input data."
            )

    @property
    def feature_cache(self) -> FeatureCache | None:
        """The training feature cache (model.feature_cache), built on first use; None when off."""
        if self._feature_cache is None and self.hparams.feature_cache != "none":
            directory = self.hparams.feature_cache_dir
            if directory is None and self._trainer is not None:
                directory = Path(self.trainer.default_root_dir) / "feature_cache"
            self._feature_cache = build_feature_cache(self.hparams.feature_cache, self.net, directory)
        return self._feature_cache

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With the feature cache, read a training batch's image indices and check its images here, on
        the host, so that the step itself never waits for the device."""
        if isinstance(batch, dict) and "query_index" in batch and self.feature_cache is not None:
            batch = self.feature_cache.prepare_batch(batch)
        return batch

    def on_train_start(self) -> None:
        """The feature cache is exact only for un-augmented queries and prompts: check, then log its size."""
        if self.feature_cache is None:
            return
        dataset = self.trainer.train_dataloader.dataset
        mode = self.hparams.feature_cache
        if getattr(dataset, "augments_normals", True):
            raise ConfigError(
                f"model.feature_cache={mode} needs a training set that serves its queries and prompts "
                f"un-augmented, and {type(dataset).__name__} does not declare augments_normals=False; "
                "set model.feature_cache=none."
            )
        shape = (self.net.feature_channels, self.net.feature_size, self.net.feature_size)
        bytes_per_value = 2 if str(self.trainer.precision).startswith(("16", "bf16")) else 4
        log.info(describe_cache_size(mode, len(dataset), shape, bytes_per_value))

    def _refuse_non_finite_weights(self) -> None:
        """Stop instead of checkpointing NaN/inf weights (a finite loss with a huge update can still
        overflow them). Checked when a checkpoint is written, not every step: no per-step GPU sync."""
        trained = [p.detach() for p in self.net.parameters() if p.requires_grad]
        if trained and not bool(torch.stack([torch.isfinite(p).all() for p in trained]).all()):
            raise FloatingPointError(
                f"non-finite weights at global step {self.global_step} (epoch {self.current_epoch}): "
                "training stopped without writing this checkpoint. Lower model.lr."
            )

    def setup(self, stage: str) -> None:
        backend = self.hparams.get("compile")
        if backend and stage == "fit":
            self.net.reconstructor.compile(backend="inductor" if backend is True else backend)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Right before the first step after a resume, put back this rank's saved random states, so
        that nothing run in between (sanity validation, loader start-up) shifts the stream."""
        if self._resumed_rng_states is None:
            return
        states, self._resumed_rng_states = self._resumed_rng_states, None
        if len(states) != self.trainer.world_size:
            log.warning(
                "Resuming with %d processes from a checkpoint of %d: random states are not restored, "
                "so the run continues correctly but not bit-for-bit as an uninterrupted one.",
                self.trainer.world_size,
                len(states),
            )
            return
        restore_rng_state(states[self.global_rank], self.device)

    def on_train_epoch_end(self) -> None:
        self._check_deferred_loss()
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
        all DDP ranks, so each rank ends with the same values. Prompts are
        chosen as at test time (K averaged, or retrieved with the image itself
        left out of the candidates).
        """
        was_training = self.training
        self.eval()
        rec_maps, refiner_maps = [], []
        for batch in dataloader:
            rec_map, refiner_map, _ = self.prompted_maps(batch, exclude_self=True)
            rec_maps.append(rec_map)
            refiner_maps.append(refiner_map)
        self.train(was_training)
        self.calibration_prompt = getattr(dataloader.dataset, "prompt_setting", None)
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

    # ---- test prompts: given (one or K per image) or retrieved without the label -----------------

    @torch.no_grad()
    def prompted_maps(
        self, batch: dict[str, Any], exclude_self: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        """Reconstruction and refiner maps (N×1×S×S) of a prompted batch, and the retrieved categories.

        With K prompts per image (``prompt`` N×K×3×S×S) both maps are averaged over the K prompts before
        fusion; fusion being linear, this equals averaging the fused maps, and the image score is taken
        from the averaged map. A batch without ``prompt`` (``test_prompt=retrieval``) gets the
        ``num_prompts`` most similar normal training images of the category of its nearest one, with
        the image itself left out when ``exclude_self`` (calibration on training images).
        """
        query_features = self.net.extract_features(batch["image"].to(self.device))
        retrieved = None
        if "prompt" in batch:
            prompts = batch["prompt"].to(self.device)
            prompts = prompts[:, None] if prompts.dim() == 4 else prompts
            prompt_features = self.net.extract_features(prompts.flatten(0, 1)).unflatten(0, prompts.shape[:2])
        else:
            bank = self.retrieval_bank()
            exclude = bank.same_image(batch["path"]) if exclude_self else None
            k = int(torch.as_tensor(batch["num_prompts"]).flatten()[0])
            prompt_features, retrieved = bank.retrieve(query_features, k, exclude)
        rec_maps, refiner_maps = [], []
        for k in range(prompt_features.shape[1]):
            reconstruction = self.net.reconstruct(query_features, prompt_features[:, k])
            logit = self.net.refine(reconstruction, query_features)
            maps = self.net.anomaly_maps(query_features, reconstruction, logit)
            rec_maps.append(maps["rec_map"])
            refiner_maps.append(maps["refiner_map"])
        return torch.stack(rec_maps).mean(0), torch.stack(refiner_maps).mean(0), retrieved

    def retrieval_bank(self) -> RetrievalBank:
        """The retrieval candidates, computed once (per test) from the datamodule's normal training images."""
        # imported here: onenip_pl.inference's package imports the detector, which imports this module
        from onenip_pl.inference.retrieval import RetrievalBank

        if self._retrieval_bank is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "retrieval_bank_dataloader"):
                raise ConfigError("data.test_prompt=retrieval needs a datamodule with normal training images")
            was_training = self.training
            self.eval()
            self._retrieval_bank = RetrievalBank.build(
                self.net.extract_features, datamodule.retrieval_bank_dataloader(), self.device
            )
            self.train(was_training)
            log.info(
                "Prompt retrieval: %d normal training images of %d categories as candidates",
                len(self._retrieval_bank.categories),
                len(set(self._retrieval_bank.categories)),
            )
        return self._retrieval_bank

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
        self._check_deferred_loss()
        self._refuse_non_finite_weights()
        checkpoint["prompt_bank"] = self.prompt_bank
        checkpoint["calibration_prompt"] = self.calibration_prompt
        # Lightning calls this on every rank; each rank's generators go in, for an exact resume
        checkpoint["rng_states"] = _gather_objects(rng_state(self.device))
        # plain lists and dicts instead of OmegaConf nodes: the file then loads with weights_only=True
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = _plain_containers(checkpoint[key])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.prompt_bank = checkpoint.get("prompt_bank", {})
        self.calibration_prompt = checkpoint.get("calibration_prompt")
        self._resumed_rng_states = checkpoint.get("rng_states")

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

    def configure_reports(
        self, output_dir: str | Path | None, images_per_category: int = 4, curves: bool = True
    ) -> None:
        """Where the test writes its pictures: ``<output_dir>/visuals/<category>.png`` grids of
        ``images_per_category`` test images (0: none) and ``<output_dir>/curves`` ROC/PR plots."""
        if images_per_category < 0:
            raise ConfigError(f"report.images_per_category={images_per_category} must be 0 (off) or more")
        self.report_dir = Path(output_dir) if output_dir is not None else None
        self.report_images_per_category = images_per_category
        self.report_curves = curves

    def on_test_start(self) -> None:
        self.test_metrics.reset()
        self._official_maps = []
        self._retrieval_bank = None
        self._retrieval_pairs = []
        self._test_scale = None
        self.report_files = {}
        keeps_samples = self.report_dir is not None and self.trainer.is_global_zero
        self._sample_keeper = SampleKeeper(self.report_images_per_category if keeps_samples else 0)
        if self.hparams.fusion == "calibrated" and not bool(self.fusion_calibrated):
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
                raise ConfigError("fusion=calibrated needs a datamodule with normal training images")
            log.warning(
                "Checkpoint has no calibrated fusion scale: calibrating now on normal training images."
            )
            self.calibrate_fusion(datamodule.calibration_dataloader())
        self._warn_if_prompts_differ_from_calibration()

    def _warn_if_prompts_differ_from_calibration(self) -> None:
        test_dataset = getattr(self.trainer.test_dataloaders, "dataset", None)
        test_setting = getattr(test_dataset, "prompt_setting", None)
        calibrated_setting = self.calibration_prompt
        if self.hparams.fusion != "calibrated" or None in (test_setting, calibrated_setting):
            return
        if test_setting != calibrated_setting:
            log.warning(
                "The fusion scale and thresholds were calibrated with prompts '%s' but the test uses '%s'; "
                "image_F1 and pixel_F1 may suffer. Calibrate with the test's data.test_prompt settings.",
                calibrated_setting,
                test_setting,
            )

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rec_map, refiner_map, retrieved = self.prompted_maps(batch)
        categories = list(batch["category"])
        if retrieved is not None:
            self._retrieval_pairs.extend(zip(categories, retrieved, strict=True))
        self._keep_samples(batch, rec_map, refiner_map)
        if self.hparams.fusion == "official":
            self._official_maps.append(
                {
                    "rec_map": rec_map,
                    "refiner_map": refiner_map,
                    "label": batch["label"],
                    "mask": batch["mask"],
                    "category": categories,
                }
            )
            return
        anomaly_map, image_score = self.net.fuse(rec_map, refiner_map)
        self.test_metrics.update(image_score, batch["label"], anomaly_map, batch["mask"], categories)

    def _keep_samples(self, batch: dict[str, Any], rec_map: torch.Tensor, refiner_map: torch.Tensor) -> None:
        """A few images per category for the visual report; maps in float16, fused at the end."""
        keeper = self._sample_keeper
        if keeper.per_category == 0:
            return
        for i, (category, label) in enumerate(zip(batch["category"], batch["label"].tolist(), strict=True)):
            if keeper.wants(category, label):
                keeper.add(
                    category,
                    label,
                    image=batch["image"][i].mul(255).round().to(torch.uint8).cpu(),
                    mask=batch["mask"][i, 0].bool().cpu(),
                    rec_map=rec_map[i].half().cpu(),
                    refiner_map=refiner_map[i].half().cpu(),
                    path=str(batch["path"][i]),
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
        self._test_scale = scale
        for maps in self._official_maps:
            anomaly_map, image_score = self.net.fuse(maps["rec_map"], maps["refiner_map"], scale)
            self.test_metrics.update(image_score, maps["label"], anomaly_map, maps["mask"], maps["category"])
        self._official_maps = []

    def on_test_epoch_end(self) -> None:
        calibrated = self.hparams.fusion == "calibrated"
        if calibrated:
            self._test_scale = self.net.fusion_scale.detach().clone()
        else:
            self._update_official_metrics()
        per_category = {c: dict(v) for c, v in self.test_metrics.compute()["per_category"].items()}
        writes_curves = self.report_dir is not None and self.report_curves
        data = self.test_metrics.category_data() if calibrated or writes_curves else {}
        if calibrated:
            self._add_threshold_f1(per_category, data)
        self._add_retrieval_accuracy(per_category)
        results = summarize({c: _grouped_columns(v) for c, v in per_category.items()})
        self.test_results = results
        flat = {f"test/{name}": value for name, value in results["mean"].items()}
        for category, values in results["per_category"].items():
            flat.update({f"test/{category}/{name}": value for name, value in values.items()})
        self.log_dict(flat, sync_dist=False, rank_zero_only=True)
        if self.report_dir is not None and self.trainer.is_global_zero:
            self._write_visual_report(data if writes_curves else {})

    def _add_threshold_f1(
        self, per_category: dict[str, dict[str, float]], data: dict[str, CategoryData]
    ) -> None:
        """F1 at the thresholds fixed on normal images before the test (beside F1max, which is not)."""
        image_threshold, pixel_threshold = float(self.image_threshold), float(self.pixel_threshold)
        for category, category_data in data.items():
            values = per_category[category]
            if any(name.startswith("image_") for name in values):
                values["image_F1"] = f1_at_threshold(
                    category_data.image_scores, category_data.image_labels, image_threshold
                )
            if category_data.anomaly_maps is not None:
                values["pixel_F1"] = f1_at_threshold(
                    category_data.anomaly_maps, category_data.masks, pixel_threshold
                )

    def _add_retrieval_accuracy(self, per_category: dict[str, dict[str, float]]) -> None:
        """Per category, how often retrieval picked a prompt of the image's true category."""
        pairs = [pair for chunk in _gather_objects(self._retrieval_pairs) for pair in chunk]
        self._retrieval_pairs = []
        if not pairs:
            return
        total = Counter(true for true, _ in pairs)
        correct = Counter(true for true, retrieved in pairs if true == retrieved)
        for category, values in per_category.items():
            values["retrieval_accuracy"] = correct[category] / total[category] if total[category] else np.nan
        log.info(
            "Prompt retrieval picked the true category for %d of %d test images (%.2f %%)",
            sum(correct.values()),
            len(pairs),
            100 * sum(correct.values()) / len(pairs),
        )

    def _write_visual_report(self, data: dict[str, CategoryData]) -> None:
        """Sample grids under <report_dir>/visuals and ROC/PR plots under <report_dir>/curves."""
        files: dict[str, dict[str, Path]] = {}
        samples = self._visual_samples()
        if samples:
            threshold = float(self.pixel_threshold) if self.hparams.fusion == "calibrated" else None
            files["visuals"] = write_sample_grids(samples, self.report_dir / "visuals", threshold)
        if data:
            files["curves"] = plot_curves(data, self.report_dir / "curves")
        self.report_files = files
        self._sample_keeper = SampleKeeper(0)

    def _visual_samples(self) -> dict[str, list[VisualSample]]:
        """The kept samples with their maps fused by the scale the test used."""
        samples = {}
        for category, kept in sorted(self._sample_keeper.samples.items()):
            rec_map = torch.stack([sample["rec_map"] for sample in kept]).float().to(self.device)
            refiner_map = torch.stack([sample["refiner_map"] for sample in kept]).float().to(self.device)
            anomaly_maps, scores = self.net.fuse(rec_map, refiner_map, self._test_scale)
            samples[category] = [
                VisualSample(s["image"], s["mask"], m[0].cpu(), s["label"], float(score), s["path"])
                for s, m, score in zip(kept, anomaly_maps, scores, strict=True)
            ]
        return samples


_COLUMN_GROUPS = {"image": 0, "pixel": 1}


def _grouped_columns(values: dict[str, float]) -> dict[str, float]:
    """Image metrics, then pixel metrics, then the rest, each group in its own order (stable sort)."""
    return dict(sorted(values.items(), key=lambda item: _COLUMN_GROUPS.get(item[0].split("_", 1)[0], 2)))
