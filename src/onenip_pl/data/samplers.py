"""Samplers that shard data across DDP ranks the way OneNIP needs it.

Training shards a (optionally category-balanced) shuffle per epoch; evaluation
shards WITHOUT padding so that every test image is counted exactly once,
whatever the number of devices.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class TrainShardSampler(Sampler[int]):
    """Per-epoch shuffle (or category-balanced draw), padded to split evenly over ranks.

    With ``balance_categories`` every category is equally likely per draw, so a
    category with 10× fewer images is not seen 10× less often.
    """

    def __init__(
        self,
        categories: Sequence[str],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        balance_categories: bool = False,
    ) -> None:
        self.categories = list(categories)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.balance_categories = balance_categories
        self.epoch = 0
        self.num_samples = math.ceil(len(self.categories) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.num_samples * self.world_size
        if not self.balance_categories:
            order = rng.permutation(len(self.categories))
            return np.concatenate([order, order[: total - len(order)]])
        counts = Counter(self.categories)
        weights = np.array([1.0 / (len(counts) * counts[c]) for c in self.categories])
        return rng.choice(len(self.categories), size=total, replace=True, p=weights / weights.sum())

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


class EvalShardSampler(Sampler[int]):
    """Rank r takes items r, r+W, r+2W, ...: no padding, no duplicates, nothing dropped."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
