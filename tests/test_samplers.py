"""Training shards: a fresh seeded order per epoch, disjoint per rank, optional category balance."""

from __future__ import annotations

from collections import Counter

from onenip_pl.data.samplers import EvalShardSampler, TrainShardSampler

CATEGORIES = ["big"] * 90 + ["small"] * 10


def test_plain_sampling_visits_every_image_once_per_epoch() -> None:
    sampler = TrainShardSampler(CATEGORIES, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(100))
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(100)) and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_ranks_get_disjoint_shards_of_equal_length() -> None:
    shards = [list(TrainShardSampler(CATEGORIES[:99], seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert set(shards[0]) | set(shards[1]) == set(range(99))
    assert len(set(shards[0]) & set(shards[1])) <= 1  # one index repeats to even out the shards


def test_balanced_sampling_draws_categories_equally() -> None:
    sampler = TrainShardSampler(CATEGORIES, seed=0, balance_categories=True)
    draws = Counter()
    for epoch in range(50):
        sampler.set_epoch(epoch)
        draws.update(CATEGORIES[i] for i in sampler)
    share = draws["small"] / sum(draws.values())
    assert 0.45 < share < 0.55, f"small category drawn {share:.2%} of the time, expected about 50%"
    plain = Counter(CATEGORIES[i] for i in TrainShardSampler(CATEGORIES, seed=0))
    assert plain["small"] == 10


def test_eval_shards_cover_an_odd_set_exactly_once() -> None:
    shards = [list(EvalShardSampler(7, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))
