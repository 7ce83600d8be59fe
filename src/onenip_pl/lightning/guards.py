"""Stop a training run at the first non-finite loss or weight, before it is stepped on or checkpointed."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from onenip_pl.distributed import all_ranks_agree


class _DeferredFiniteFlag:
    """A GPU loss's finiteness, copied to pinned host memory without waiting; read one step later.

    Waiting on the copy's event (recorded right after the loss) does not wait for the backward pass and
    optimiser step queued behind it, unlike reading the flag at once.
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


class NonFiniteGuard(Callback):
    """A NaN/inf loss raises FloatingPointError naming the global step: on a CPU before that step's
    update, on a GPU at the start of the next step (reading the flag at once would wait for the GPU).
    Under DDP every rank raises together (one rank stopping alone would leave the others waiting in the
    gradient all-reduce). Weights made non-finite by an update are refused when a checkpoint is written."""

    def __init__(self) -> None:
        self._pending: _DeferredFiniteFlag | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = all_ranks_agree(torch.isfinite(loss.detach()).float())
        step, epoch = trainer.global_step, trainer.current_epoch
        if loss.is_cuda:
            self._pending = _DeferredFiniteFlag(finite, loss, step, epoch)
            return
        if not bool(finite):
            raise FloatingPointError(
                f"non-finite training loss at global step {step} (epoch {epoch}; this rank's loss: "
                f"{loss.item()}): training stopped before that step's update and checkpoint. Lower "
                "model.optimizer.lr or check the input data."
            )

    def check_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.is_finite():
            raise FloatingPointError(
                f"non-finite training loss at global step {pending.step} (epoch {pending.epoch}; this rank's "
                f"loss: {pending.loss.item()}): training stopped after that step's update, before any "
                "checkpoint. Lower model.optimizer.lr or check the input data."
            )

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.check_pending()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_pending()

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.check_pending()
        trained = [p.detach() for p in pl_module.parameters() if p.requires_grad]
        if trained and not bool(torch.stack([torch.isfinite(p).all() for p in trained]).all()):
            raise FloatingPointError(
                f"non-finite weights at global step {trainer.global_step} (epoch {trainer.current_epoch}): "
                "training stopped without writing this checkpoint. Lower model.optimizer.lr."
            )
