"""OneNIPModule: the thin LightningModule around the plain-torch OneNIP network.

It owns the training loss, the optimiser and scheduler (Hydra ``_partial_`` nodes) and the three
evaluation steps. Everything else is a component with one job: the fusion post-processor
(onenip_pl.calibration), the evaluator (onenip_pl.metrics.evaluator), the prompt bank and retrieval
(onenip_pl.data.prompts), the feature cache and CPU training kernels (speed), and callbacks for
calibration at the end of fit, the prompt bank, the test report, non-finite guards and exact resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from onenip_pl.calibration import PostProcessor, TestSetFusion, collect_maps
from onenip_pl.checkpoint_file import read_checkpoint
from onenip_pl.checkpoint_format import (
    FORMAT_VERSION,
    NO_BACKBONE_WEIGHTS,
    load_state,
    plain_containers,
    require_onenip_checkpoint,
    upgrade_checkpoint,
)
from onenip_pl.data.pose import PoseState, TurnedPromptCache, align_batch, align_prompts, turned_features
from onenip_pl.data.prompts import PromptBank, batch_prompt_features
from onenip_pl.errors import ConfigError
from onenip_pl.lightning.feature_cache import FeatureCache
from onenip_pl.lightning.interfaces import NormalImageSource, normal_image_source
from onenip_pl.lightning.speedups import TrainingSpeedups
from onenip_pl.metrics.evaluator import Evaluator, flat_results, validation_evaluator
from onenip_pl.models import OneNIP, onenip_loss

log = logging.getLogger(__name__)

Factory = Callable[..., Any]


class OneNIPModule(LightningModule):
    """Trains OneNIP with MSE + dice_weight·Dice (the paper's loss) and tests it per category.

    Keywords not listed are OneNIP's (``backbone``, ``image_size``, ``hidden_dim``, ...). ``optimizer``
    and ``scheduler`` build the optimiser from the trainable parameters and the epoch-wise scheduler from
    it (default: the authors' AdamW 1e-4 and StepLR(800, 0.1)). ``fusion``, ``threshold_rule``,
    ``threshold_quantile`` and ``pixel_threshold_quantile`` configure the post-processor;
    ``feature_cache`` (none | memory | disk) keeps the frozen backbone's features of the un-augmented
    normal training images; ``cpu_training_kernels`` (auto: when fitting on a CPU) trains the
    reconstructor with packed dropout masks; ``compile`` runs the reconstructor through torch.compile
    (True or a backend name).
    """

    def __init__(
        self,
        optimizer: Factory | None = None,
        scheduler: Factory | None = None,
        dice_weight: float = 0.5,
        fusion: str = "calibrated",
        threshold_rule: str = "quantile",
        threshold_quantile: float = 0.9,
        pixel_threshold_quantile: float = 0.999,
        binned_metrics: bool = False,
        compile: bool | str = False,
        feature_cache: str = "none",
        feature_cache_dir: str | None = None,
        cpu_training_kernels: str = "auto",
        **net_config: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-4)
        self.scheduler_factory = scheduler or partial(
            torch.optim.lr_scheduler.StepLR, step_size=800, gamma=0.1
        )
        self.net_config = plain_containers(net_config)
        self.net = OneNIP(**net_config)
        self.post_processor = PostProcessor(
            fusion, threshold_rule, threshold_quantile, pixel_threshold_quantile
        )
        self.prompt_bank = PromptBank()
        self.evaluator = Evaluator(binned_metrics)
        self.val_evaluator = validation_evaluator(binned_metrics)
        self.test_results: dict[str, Any] | None = None
        self.test_scale: torch.Tensor | None = None
        self._set_fusion: TestSetFusion | None = None
        self._retrieval_bank: PromptBank | None = None
        self.speedups = TrainingSpeedups(feature_cache, feature_cache_dir, cpu_training_kernels, compile)
        # which categories turn their prompts to the query's pose: the checkpoint's, else the datamodule's
        self.pose_state: PoseState | None = None
        self._turned_prompts = TurnedPromptCache()
        self._training_turns: tuple[torch.Tensor, dict[int, int]] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, **settings: Any) -> OneNIPModule:
        """A module from a checkpoint file (read with weights_only; no backbone download), in eval mode;
        ``settings`` replace saved hyper-parameters that decide how it is evaluated (e.g. ``fusion``)."""
        checkpoint = upgrade_checkpoint(read_checkpoint(path))
        require_onenip_checkpoint(checkpoint, path)
        module = cls(**{**checkpoint["hyper_parameters"], **NO_BACKBONE_WEIGHTS, **settings})
        module._checkpoint_path = str(path)
        module.on_load_checkpoint(checkpoint)
        load_state(module, checkpoint["state_dict"], path)
        return module.eval()

    # ---- training -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.speedups.start_fit(self.net, self.trainer)

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.speedups.end_fit(self.net)

    @property
    def feature_cache(self) -> FeatureCache | None:
        return self.speedups.cache(self.net, self._trainer)

    def on_train_start(self) -> None:
        self.speedups.check_training_set(self.net, self.trainer)
        self._training_turns = None
        images = getattr(self.trainer.datamodule, "turned_training_prompts", dict)()
        if images and self.pose.rotating_categories:
            indices = sorted(images)
            stacked = torch.stack([images[i] for i in indices])
            # float16 keeps the turned features of a category's pool small (R turns of each image)
            turned = turned_features(self.net.extract_features, stacked, self.pose.grid, self.device)
            self._training_turns = (turned.half(), {index: row for row, index in enumerate(indices)})
            log.info(
                "Turned training prompts: %d images x %d turns x %s features = %.0f MiB (float16)",
                len(indices),
                turned.shape[1],
                "x".join(str(d) for d in turned.shape[2:]),
                turned.numel() * 2 / 2**20,
            )

    def _align_training_prompts(
        self, batch: dict[str, Any], query_features: torch.Tensor, prompt_features: torch.Tensor
    ) -> torch.Tensor:
        """Prompts of rotating categories turned to their query's pose, as the test turns them."""
        if self._training_turns is None:
            return prompt_features
        turns, rows_of = self._training_turns
        rows = [i for i, index in enumerate(batch["prompt_index"]) if int(index) in rows_of]
        if not rows:
            return prompt_features
        posed = turns[[rows_of[int(batch["prompt_index"][i])] for i in rows]].to(prompt_features.dtype)
        aligned = prompt_features.clone()
        aligned[rows] = align_prompts(query_features[rows], posed[:, None])[0][:, 0]
        return aligned

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.speedups.prepare_batch(self.net, self._trainer, batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        features = self.speedups.triplet_features(self.net, self._trainer, batch)
        query_features, synthetic_features, prompt_features = features
        prompt_features = self._align_training_prompts(batch, query_features, prompt_features)
        inputs = torch.cat([query_features, synthetic_features])
        reconstruction = self.net.reconstruct(inputs, prompt_features)
        logit = self.net.refine(reconstruction, inputs)
        masks = torch.cat([torch.zeros_like(batch["synthetic_mask"]), batch["synthetic_mask"]])
        target = torch.cat([query_features, query_features])
        losses = onenip_loss(reconstruction, target, logit, masks, dice_weight=self.hparams.dice_weight)
        logged = {f"train/{name}": value for name, value in losses.items()}
        size = query_features.shape[0]
        self.log_dict(logged, on_step=True, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        return losses["total"]

    def on_train_epoch_end(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([p for p in self.net.parameters() if p.requires_grad])
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---- scoring: prompts from the batch (one or K per image) or retrieved without the label -------

    @torch.no_grad()
    def prompted_maps(
        self, batch: dict[str, Any], exclude_self: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        """rec_map and refiner_map (N×1×S×S, averaged over the K prompts) and the retrieved categories.

        A batch without ``prompt`` (``test_prompt=retrieval``) gets the ``num_prompts`` most similar normal
        training images of the category of its nearest one, the image itself left out when ``exclude_self``.
        """
        query_features = self.net.extract_features(batch["image"].to(self.device))
        prompt_features, retrieved = batch_prompt_features(
            self.net.extract_features, batch, query_features, self.retrieval_bank, exclude_self
        )
        pose = self.pose
        if retrieved is not None and any(pose.rotating(c) for c in retrieved):
            raise ConfigError(
                "data.test_prompt=retrieval does not turn prompts to the query's pose; for the rotating "
                f"categories ({', '.join(pose.rotating_categories)}) use test_prompt=random|first|nearest"
            )
        if retrieved is None:
            prompts = batch["prompt"].to(self.device)
            prompt_features = align_batch(
                query_features,
                prompt_features,
                prompts[:, None] if prompts.dim() == 4 else prompts,
                batch["category"],
                pose,
                lambda images: self._turned_prompts.features(self.net.extract_features, images, pose.grid),
            )
        return (*self.net.prompted_maps(query_features, prompt_features), retrieved)

    @property
    def pose(self) -> PoseState:
        """Which categories turn their prompts: the checkpoint's decisions, else (a model being fitted or
        tested fresh) the datamodule's, else none."""
        if self.pose_state is None:
            datamodule = self._trainer.datamodule if self._trainer is not None else None
            decided = getattr(datamodule, "pose_state", None)
            if decided is None:
                return PoseState()
            self.pose_state = decided
        return self.pose_state

    def retrieval_bank(self) -> PromptBank:
        """The retrieval candidates, built once per test from the datamodule's normal training images."""
        if self._retrieval_bank is None:
            source = normal_image_source(self._trainer, "data.test_prompt=retrieval")
            loader = source.retrieval_bank_dataloader()
            self._retrieval_bank = PromptBank.build(self.net.extract_features, loader, self.device)
            log.info("Prompt retrieval: %s", self._retrieval_bank.describe())
        return self._retrieval_bank

    def calibrate(
        self, dataloader: DataLoader, sources: dict[str, str] | None = None, **options: Any
    ) -> float:
        """Fix the fusion scale and thresholds on ``dataloader``'s images, prompted as at test time (an
        image never its own prompt); ``sources`` and ``options`` go to PostProcessor.calibrate. Returns the
        scale."""
        was_training = self.training
        self.eval()
        maps = collect_maps(lambda batch: self.prompted_maps(batch, exclude_self=True)[:2], dataloader)
        self.train(was_training)
        setting = dataloader.dataset.prompt_setting
        return self.post_processor.calibrate(self.net, maps, setting, sources, **options)

    def calibrate_on(self, source: NormalImageSource) -> float:
        """Calibrate on a datamodule's held-out split (with synthetic anomalies for the F1 rule)."""
        loader = source.calibration_dataloader(synthetic_anomalies=self.post_processor.needs_anomalies)
        return self.calibrate(loader, source.calibration_sources)

    # ---- validation: held-out normals + synthetic anomalies, fused by their own normals' scale ------

    def on_validation_epoch_start(self) -> None:
        self.val_evaluator.reset()
        self._set_fusion = TestSetFusion(normal_only=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._set_fusion.add(*self.prompted_maps(batch)[:2], batch)

    def on_validation_epoch_end(self) -> None:
        self._set_fusion.evaluate(self.net, self.val_evaluator)
        results = self.val_evaluator.compute()
        self.log_dict({f"val/{name}": value for name, value in results["mean"].items()}, sync_dist=False)

    # ---- testing --------------------------------------------------------------------------------

    def on_test_start(self) -> None:
        self.evaluator.reset()
        self._retrieval_bank = None
        self._turned_prompts.clear()
        official = self.post_processor.uses_test_set
        self._set_fusion = TestSetFusion() if official else None
        if not official and not self.post_processor.calibrated:
            log.warning(
                "Checkpoint has no calibrated fusion scale: calibrating now on normal training images."
            )
            self.calibrate_on(normal_image_source(self._trainer, "calibration"))
        self.post_processor.check_prompt_setting(self.trainer.test_dataloaders.dataset.prompt_setting)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        rec_map, refiner_map, retrieved = self.prompted_maps(batch)
        if retrieved is not None:
            self.evaluator.add_retrievals(batch["category"], retrieved)
        if self._set_fusion is not None:
            self._set_fusion.add(rec_map, refiner_map, batch)
        else:
            fused = self.net.fuse(rec_map, refiner_map)
            self.evaluator.update(*fused, batch["label"], batch["mask"], batch["category"])
        return {"rec_map": rec_map, "refiner_map": refiner_map}

    def on_test_epoch_end(self) -> None:
        datamodule = self.trainer.datamodule
        unseen = datamodule.holdout_categories if isinstance(datamodule, NormalImageSource) else []
        if self._set_fusion is None:
            self.test_scale = self.net.fusion_scale.detach().clone()
            self.test_results = self.evaluator.compute(self.post_processor.thresholds, unseen)
        else:
            self.test_scale = self._set_fusion.evaluate(self.net, self.evaluator)
            self.test_results = self.evaluator.compute(unseen=unseen)
        self.log_dict(flat_results(self.test_results, "test"), sync_dist=False, rank_zero_only=True)

    # ---- checkpoint -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["format_version"] = FORMAT_VERSION
        checkpoint["net_config"] = self.net_config
        checkpoint["prompt_bank"] = self.prompt_bank.to_state()
        checkpoint["pose"] = self.pose.to_state()
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain_containers(checkpoint[key])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint(checkpoint)
        self.prompt_bank = PromptBank.from_state(checkpoint.get("prompt_bank"))
        source = getattr(self, "_checkpoint_path", "being resumed")
        self.pose_state = PoseState.from_checkpoint(checkpoint, source)
