"""Exact resumption after a crash: a training loader Lightning can checkpoint, and RNG states.

Lightning's checkpoint holds the weights, optimiser, scheduler and loop counters, but neither
where the training loader stood inside its epoch nor the random generators. A run killed
mid-epoch would replay the epoch's first batches and draw other dropout masks and feature
jitter. :class:`ResumableTrainLoader` implements Lightning's stateful-loader interface
(``state_dict``/``load_state_dict``, kept in the fit loop's checkpoint state), and
:class:`ExactResume` saves every rank's generator states and puts them back before the first step.
:class:`StepCheckpoint` writes the mid-epoch checkpoints to resume from.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, Sampler

from onenip_pl.data.samplers import TrainShardSampler
from onenip_pl.distributed import gather_objects

log = logging.getLogger(__name__)


class PositionedSampler(Sampler[tuple[int, int, int]]):
    """Yields ``(index, epoch, position)`` from a TrainShardSampler and can start part-way into an epoch.

    ``position`` is the sample's place in the epoch's global order, whatever the number of ranks
    (rank r takes positions r, r+W, r+2W, ...). A dataset that seeds a sample's randomness with
    (epoch, position) therefore draws it identically on any rank, worker or restart.
    """

    def __init__(self, shard: TrainShardSampler) -> None:
        self.shard = shard
        self._resume_before = 0
        self._start = 0

    @property
    def epoch(self) -> int:
        return self.shard.epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.shard.epoch:
            self._resume_before = 0
        self.shard.set_epoch(epoch)

    def resume(self, epoch: int, next_position: int) -> None:
        """Skip the global positions below ``next_position`` of ``epoch`` on the next pass."""
        self.shard.set_epoch(epoch)
        self._resume_before = next_position

    def begin(self) -> int:
        """Start a pass: how many of this rank's samples it skips (consumed before a restart)."""
        rank, world = self.shard.rank, self.shard.world_size
        skipped = max(0, math.ceil((self._resume_before - rank) / world))
        self._start = min(skipped, len(self.shard))
        self._resume_before = 0
        return self._start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        rank, world, epoch = self.shard.rank, self.shard.world_size, self.shard.epoch
        for local, index in enumerate(self.shard):
            if local >= self._start:
                yield index, epoch, local * world + rank

    def __len__(self) -> int:
        return len(self.shard)


class ResumableTrainLoader(DataLoader):
    """The training DataLoader, with its place in the epoch saved in Lightning checkpoints.

    Batches are consecutive runs of the sampler's order, so the samples this rank has consumed
    are a prefix of its shard: the state is (epoch, first unconsumed global position). Loader
    start-up draws its worker seeds from a private generator, never from torch's global one,
    so starting a loader does not shift the random stream the model trains with.
    """

    def __init__(self, dataset: Dataset, shard: TrainShardSampler, seed: int, **loader_kwargs: Any) -> None:
        super().__init__(
            dataset,
            sampler=PositionedSampler(shard),
            generator=torch.Generator().manual_seed(seed),
            **loader_kwargs,
        )
        self._consumed = 0

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing below runs before the first batch is asked for, i.e. after
        # Lightning has restored the state and set the epoch
        self._consumed = self.sampler.begin()
        for batch in super().__iter__():
            self._consumed = min(self._consumed + self.batch_size, len(self.sampler))
            yield batch

    def state_dict(self) -> dict[str, int]:
        shard = self.sampler.shard
        return {"epoch": shard.epoch, "next_position": self._consumed * shard.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(int(state["epoch"]), int(state["next_position"]))


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device), numpy and Python generator states,
    in plain types so that the checkpoint still loads with ``weights_only=True``."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, keys.tolist(), int(position), int(has_gauss), float(cached_gauss)),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StepCheckpoint(ModelCheckpoint):
    """Checkpoints every ``every_n_train_steps`` optimiser steps, for resuming after a crash.

    The last batch of an epoch is left to the end-of-epoch checkpoint: Lightning resumes a
    checkpoint taken on an epoch's last batch without running that epoch's end (the epoch-wise
    scheduler step, fusion calibration and prompt bank after the final epoch).
    """

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class ExactResume(Callback):
    """Every rank's torch/numpy/Python random states in each checkpoint, put back right before the first
    step after a resume, so that nothing run in between (sanity validation, loader start-up) shifts the
    stream: a resumed run then draws the dropout masks and jitter of an uninterrupted one."""

    def __init__(self) -> None:
        self._resumed: list[dict[str, Any]] | None = None

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # called on every rank: each rank's generators go in
        checkpoint["rng_states"] = gather_objects(rng_state(pl_module.device))

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resumed = checkpoint.get("rng_states")

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._resumed is None:
            return
        states, self._resumed = self._resumed, None
        if len(states) != trainer.world_size:
            log.warning(
                "Resuming with %d processes from a checkpoint of %d: random states are not restored, "
                "so the run continues correctly but not bit-for-bit as an uninterrupted one.",
                trainer.world_size,
                len(states),
            )
            return
        restore_rng_state(states[trainer.global_rank], pl_module.device)
