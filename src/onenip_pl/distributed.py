"""What calibration, evaluation and checkpointing need from torch.distributed: gathers and reductions that
are the identity in a single process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(local: Any) -> list[Any]:
    """This rank's picklable object and, under DDP, every other rank's, in rank order."""
    if not is_distributed():
        return [local]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return everyone


def gather_cat(chunks: Sequence[Tensor]) -> Tensor:
    """1-D tensors of this rank and, under DDP, of every rank, concatenated on the CPU."""
    local = torch.cat([chunk.cpu() for chunk in chunks]) if chunks else torch.empty(0)
    return torch.cat(gather_objects(local))


def global_extremes(maps: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """(min, max) over every value of ``maps`` on every rank (inf, -inf when there is none), on ``device``
    (the one the process group reduces on)."""
    maps = [m for m in maps if m.numel()]
    if maps:
        low = torch.stack([m.min() for m in maps]).min().to(device)
        high = torch.stack([m.max() for m in maps]).max().to(device)
    else:
        low, high = (torch.tensor(value, device=device) for value in (float("inf"), -float("inf")))
    if is_distributed():
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return low, high


def all_ranks_agree(flag: Tensor) -> Tensor:
    """The minimum of a 0/1 flag over ranks: 1 only where every rank says 1."""
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag
