"""What makes a training step cheaper without changing its maths, behind the module's switches: the
frozen-backbone feature cache, the CPU training kernels and torch.compile of the reconstructor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from torch import Tensor

from onenip_pl.errors import check_choice
from onenip_pl.lightning.feature_cache import (
    FEATURE_CACHE_MODES,
    FeatureCache,
    build_feature_cache,
    check_cached_training,
    triplet_features,
)
from onenip_pl.models import OneNIP
from onenip_pl.models.ops import KERNEL_SWITCH, CPUTrainingKernels, training_kernels

log = logging.getLogger(__name__)


class TrainingSpeedups:
    """``feature_cache`` (none | memory | disk, under ``feature_cache_dir`` or the run directory),
    ``cpu_training_kernels`` (auto | on | off) and ``compile`` (False, True or a backend name)."""

    def __init__(
        self,
        feature_cache: str = "none",
        feature_cache_dir: str | None = None,
        cpu_training_kernels: str = "auto",
        compile: bool | str = False,
    ) -> None:
        check_choice("model.feature_cache", feature_cache, FEATURE_CACHE_MODES)
        check_choice("model.cpu_training_kernels", cpu_training_kernels, KERNEL_SWITCH)
        self.cache_mode = feature_cache
        self.cache_dir = feature_cache_dir
        self.kernel_switch = cpu_training_kernels
        self.compile_backend = compile
        self._cache: FeatureCache | None = None
        self._kernels: CPUTrainingKernels | None = None

    def cache(self, net: OneNIP, trainer: Trainer | None) -> FeatureCache | None:
        """The feature cache, built on first use; None when off."""
        if self._cache is None and self.cache_mode != "none":
            directory = self.cache_dir
            if directory is None and trainer is not None:
                directory = Path(trainer.default_root_dir) / "feature_cache"
            self._cache = build_feature_cache(self.cache_mode, net, directory)
        return self._cache

    def start_fit(self, net: OneNIP, trainer: Trainer) -> None:
        """Install the CPU kernels (when training on a CPU) and compile the reconstructor, as switched."""
        self._kernels = training_kernels(self.kernel_switch, trainer.strategy.root_device)
        if self._kernels is not None:
            self._kernels.install(net.reconstructor)
        if self.compile_backend:
            backend = "inductor" if self.compile_backend is True else self.compile_backend
            net.reconstructor.compile(backend=backend)

    def check_training_set(self, net: OneNIP, trainer: Trainer) -> None:
        if self.cache(net, trainer) is not None:
            dataset = trainer.train_dataloader.dataset
            log.info(check_cached_training(self.cache_mode, dataset, net, trainer.precision))

    def end_fit(self, net: OneNIP) -> None:
        if self._kernels is not None:
            self._kernels.remove(net.reconstructor)
            self._kernels = None

    def prepare_batch(self, net: OneNIP, trainer: Trainer | None, batch: Any) -> Any:
        """With the cache, a training batch's indices are read and its images checked on the host, before
        the batch moves to the device, so that the step itself never waits for it."""
        cache = self.cache(net, trainer)
        if cache is not None and isinstance(batch, dict) and "query_index" in batch:
            return cache.prepare_batch(batch)
        return batch

    def triplet_features(self, net: OneNIP, trainer: Trainer | None, batch: dict) -> tuple[Tensor, ...]:
        return triplet_features(net, batch, self.cache(net, trainer))
