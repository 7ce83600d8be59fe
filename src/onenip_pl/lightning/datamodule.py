"""OneNIPDataModule: one unified training set over many categories, triplets for training,
prompted test samples for evaluation."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from onenip_pl.data.check import check_records
from onenip_pl.data.datasets import (
    ImageSource,
    NormalImageDataset,
    PromptedImageDataset,
    SyntheticValidationDataset,
    TrainTripletDataset,
    normal_train_index,
)
from onenip_pl.data.demo import generate_demo_dataset
from onenip_pl.data.pose import POSE_MODES, LazyImages, PoseGrid, PoseState, decide_poses
from onenip_pl.data.prompts import PROMPT_MODES
from onenip_pl.data.readers import read_dataset
from onenip_pl.data.records import ImageRecord
from onenip_pl.data.samplers import EvalShardSampler, TrainShardSampler
from onenip_pl.data.splits import NormalSplits, split_normals
from onenip_pl.data.synthesis import AnomalySynthesizer, describe_texture_source, find_textures
from onenip_pl.errors import ConfigError, check_choice
from onenip_pl.lightning.resume import ResumableTrainLoader

log = logging.getLogger(__name__)


class OneNIPDataModule(LightningDataModule):
    """Reads a data set once, validates it, and serves training triplets and prompted test images.

    ``dataset`` names a reader (``mvtec``, ``visa``, ``btad``, ``mvtec_visa_btad``,
    ``folder``) or ``demo``, which writes the seeded demo set under ``root``
    on first use and reads it in MVTec AD layout.
    """

    def __init__(
        self,
        dataset: str = "demo",
        root: str | Mapping[str, str] = "data/demo",
        categories: Sequence[str] | None = None,
        reader_options: Mapping[str, Any] | None = None,
        strict: bool = False,
        image_size: int = 224,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        texture_dir: str | None = None,
        seed: int = 133,
        balance_categories: bool = False,
        train_prompt: str = "random",
        test_prompt: str = "random",
        test_prompt_k: int = 1,
        retrieval_images_per_category: int | None = 32,
        val_fraction: float = 0.0,
        calibration_fraction: float = 0.1,
        calibration_min_images: int = 3,
        holdout_categories: Sequence[str] | None = None,
        cache_images: str = "none",
        cache_dir: str | None = None,
        check_decode: bool | str = "verify",
        demo_seed: int = 0,
        pose: str = "fixed",
        pose_per_category: Mapping[str, str] | None = None,
        pose_angles: int = 36,
        pose_mirror: bool = False,
        pose_fill: str = "border",
        pose_train: bool = True,
        pose_train_prompts: int = 32,
    ) -> None:
        super().__init__()
        if image_size % 16 != 0 or image_size <= 0:
            raise ConfigError(
                f"data.image_size={image_size} must be a positive multiple of 16 (e.g. 224, 256)"
            )
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size={batch_size} must be positive")
        self.save_hyperparameters(logger=False)
        self.dataset = dataset
        self.root = root
        self.categories = list(categories) if categories else None
        self.reader_options = dict(reader_options or {})
        self.strict = strict
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.texture_dir = texture_dir
        self.seed = seed
        self.balance_categories = balance_categories
        self.train_prompt = train_prompt
        if test_prompt not in PROMPT_MODES:
            raise ConfigError(f"data.test_prompt={test_prompt!r} is unknown; use one of {PROMPT_MODES}")
        if test_prompt_k < 1:
            raise ConfigError(f"data.test_prompt_k={test_prompt_k} must be at least 1")
        if retrieval_images_per_category is not None and retrieval_images_per_category < test_prompt_k:
            raise ConfigError(
                f"data.retrieval_images_per_category={retrieval_images_per_category} must be at least "
                f"data.test_prompt_k={test_prompt_k} (or null for every normal training image)"
            )
        self.test_prompt = test_prompt
        self.test_prompt_k = test_prompt_k
        self.retrieval_images_per_category = retrieval_images_per_category
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        self.val_fraction = val_fraction
        self.calibration_fraction = calibration_fraction
        self.calibration_min_images = calibration_min_images
        self.holdout_categories = [str(c) for c in holdout_categories or ()]
        self.cache_images = cache_images
        self.cache_dir = cache_dir
        self.check_decode = check_decode
        self.demo_seed = demo_seed
        check_choice("data.pose", pose, POSE_MODES)
        if pose_train_prompts < 1:
            raise ConfigError(f"data.pose_train_prompts={pose_train_prompts} must be at least 1")
        self.pose = pose
        self.pose_per_category = {str(k): str(v) for k, v in (pose_per_category or {}).items()}
        self.pose_grid = PoseGrid(int(pose_angles), bool(pose_mirror), pose_fill)
        self.pose_train = pose_train
        self.pose_train_prompts = pose_train_prompts
        self.pose_state: PoseState | None = None
        self.records: list[ImageRecord] = []
        self.splits = NormalSplits()
        self.train_source: ImageSource | None = None

    @property
    def reader_name(self) -> str:
        return "mvtec" if self.dataset == "demo" else self.dataset

    def prepare_data(self) -> None:
        """Write the demo data set on first use (rank zero only, as Lightning calls it)."""
        if self.dataset == "demo":
            generate_demo_dataset(self._single_root(), seed=self.demo_seed)

    def _single_root(self) -> Path:
        if isinstance(self.root, Mapping):
            raise ConfigError(f"data.root must be one directory for data.dataset={self.dataset!r}")
        return Path(self.root).expanduser()

    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        if self.dataset == "demo":
            self.prepare_data()
        root = self.root if isinstance(self.root, Mapping) else self._single_root()
        records = read_dataset(self.reader_name, root, self.categories, self.strict, **self.reader_options)
        # the demo's categories are not MVTec's: compare counts with official ones only for benchmarks
        official = None if self.dataset == "demo" else self.dataset
        report = check_records(records, official, decode=self.check_decode)
        for note in report.notes:
            log.warning("Data check: %s", note)
        self.records = list(report.records)
        self.splits = split_normals(
            [r for r in self.records if r.split == "train"],
            self.seed,
            self.val_fraction,
            self.calibration_fraction,
            self.calibration_min_images,
            self.holdout_categories,
        )
        self.train_source = ImageSource(self.splits.pool, self.image_size, self.cache_images, self.cache_dir)
        self.pose_state = self._decide_poses()
        trained = sum(r.category in self.splits.trained_categories for r in self.splits.pool)
        log.info(
            "Data: %s at %s, %d categories (%d trained on), %d training, %d validation, %d calibration and "
            "%d test images",
            self.dataset,
            root,
            len(self.category_names),
            len(self.splits.trained_categories),
            trained,
            len(self.val_records),
            len(self.splits.calibration),
            len(self.test_records),
        )

    def _decide_poses(self) -> PoseState:
        """Which categories turn their prompts (data.pose, data.pose_per_category), from each category's
        normal training images only."""
        pool = normal_train_index(self.train_source.records)
        images = {
            category: LazyImages(self.train_source.image, indices) for category, indices in pool.items()
        }
        state = decide_poses(
            images, self.pose, self.pose_per_category, self.pose_grid, self.seed, self.category_names
        )
        log.info("Poses: %s", state.describe())
        return state

    def turned_training_prompts(self) -> dict[int, torch.Tensor]:
        """Training prompts of rotating categories (data.pose_train): at most data.pose_train_prompts
        normal images per category (a seeded draw), uint8 3×S×S by training-set index; the model turns and
        encodes each once. Empty when no category rotates or pose_train is off."""
        if not self.pose_train or self.pose_state is None:
            return {}
        chosen = {}
        for indices in self._turned_prompt_pools().values():
            for index in indices:
                chosen[index] = torch.from_numpy(self.train_source.image(index)).permute(2, 0, 1)
        return chosen

    def _turned_prompt_pools(self) -> dict[str, list[int]]:
        pools = {}
        for category, indices in sorted(normal_train_index(self.train_source.records).items()):
            if not self.pose_state.rotating(category):
                continue
            if len(indices) > self.pose_train_prompts:
                rng = np.random.default_rng([self.seed, len(indices), 7])
                indices = sorted(int(i) for i in rng.choice(indices, self.pose_train_prompts, replace=False))
            pools[category] = list(indices)
        return pools

    @property
    def val_records(self) -> list[ImageRecord]:
        return self.splits.validation

    @property
    def calibration_sources(self) -> dict[str, str]:
        """Where each category's calibration images come from: held_out, training or unseen."""
        return self.splits.calibration_sources

    @property
    def category_names(self) -> list[str]:
        return sorted({r.category for r in self.records})

    @property
    def test_records(self) -> list[ImageRecord]:
        return [r for r in self.records if r.split == "test"]

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset, batch_size: int, sampler, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=drop_last,
        )

    def build_synthesizer(self) -> AnomalySynthesizer:
        textures = find_textures(self.texture_dir) if self.texture_dir else None
        log.info("Anomaly synthesis textures: %s", describe_texture_source(textures, None, self.texture_dir))
        return AnomalySynthesizer(self.image_size, texture_paths=textures)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = TrainTripletDataset(
            self.train_source,
            self.build_synthesizer(),
            self.seed,
            categories=self.splits.trained_categories,
            prompt_choice=self.train_prompt,
            prompt_pools=self._turned_prompt_pools() if self.pose_train else None,
        )
        categories = [self.train_source.records[i].category for i in dataset.indices]
        shard = TrainShardSampler(categories, self.seed, rank, world, self.balance_categories)
        return ResumableTrainLoader(
            dataset,
            shard,
            self.seed,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=len(shard) >= self.batch_size,
        )

    def test_dataloader(self) -> DataLoader:
        return self._prompted_loader(self.test_records)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out normal images and their synthetic anomalies (empty without data.val_fraction)."""
        if not self.val_records:
            return []
        rank, world = self._rank_and_world()
        normal = PromptedImageDataset(
            self.val_records, self.train_source, self.image_size, self.seed, "first"
        )
        dataset = SyntheticValidationDataset(normal, self.build_synthesizer(), self.seed)
        return self._loader(dataset, self.eval_batch_size, EvalShardSampler(len(dataset), rank, world))

    def calibration_dataloader(
        self, synthetic_anomalies: bool = False, all_normals: bool = False
    ) -> DataLoader:
        """The images that fix the fusion scale and the thresholds, prompted as the test is.

        The calibration split (held out before training, see onenip_pl.data.splits), or with
        ``all_normals`` every normal training image of the data set (``python -m onenip_pl.calibrate`` on
        a folder of new normal parts); an image is never its own prompt. ``synthetic_anomalies`` adds one
        synthetic anomaly of each image, as training makes them (for the F1 threshold rule).
        """
        records = [r for r in self.records if r.split == "train"] if all_normals else self.splits.calibration
        dataset = self._prompted_dataset(records)
        if synthetic_anomalies:
            dataset = SyntheticValidationDataset(dataset, self.build_synthesizer(), self.seed)
        rank, world = self._rank_and_world()
        return self._loader(dataset, self.eval_batch_size, EvalShardSampler(len(dataset), rank, world))

    def prompt_bank_images(self, per_category: int) -> dict[str, torch.Tensor]:
        """The first ``per_category`` normal training images of each category (K×3×S×S uint8)."""
        pool = normal_train_index(self.train_source.records)
        return {
            category: torch.stack(
                [
                    torch.from_numpy(self.train_source.image(i)).permute(2, 0, 1)
                    for i in indices[:per_category]
                ]
            )
            for category, indices in sorted(pool.items())
        }

    def retrieval_bank_dataloader(self) -> DataLoader:
        """The candidates of ``test_prompt=retrieval``: normal training images, at most
        ``retrieval_images_per_category`` per category (a seeded subset), not sharded: each rank needs
        them all."""
        limit = self.retrieval_images_per_category
        chosen = []
        for _, indices in sorted(normal_train_index(self.train_source.records).items()):
            if limit is not None and len(indices) > limit:
                rng = np.random.default_rng([self.seed, len(indices)])
                indices = sorted(int(i) for i in rng.choice(indices, limit, replace=False))
            chosen.extend(indices)
        return self._loader(NormalImageDataset(self.train_source, chosen), self.eval_batch_size, None)

    def _prompted_dataset(self, records: list[ImageRecord]) -> PromptedImageDataset:
        return PromptedImageDataset(
            records, self.train_source, self.image_size, self.seed, self.test_prompt, self.test_prompt_k
        )

    def _prompted_loader(self, records: list[ImageRecord]) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = self._prompted_dataset(records)
        return self._loader(dataset, self.eval_batch_size, EvalShardSampler(len(dataset), rank, world))

    def state_dict(self) -> dict[str, Any]:
        return {"categories": self.category_names}
