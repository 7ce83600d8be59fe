"""Time the kNN baseline's nearest-patch search against the direct distance-matrix formula, same data.

Example (a bank the size realdev's training images give with Lite0 and a 10 % coreset, one test batch):
    python scripts/benchmark_knn.py --bank 120000 --queries 12544 --channels 152 --repeats 5

"direct" builds |b|^2 - 2 b.q + |q|^2 for a chunk of queries against the whole bank, clamps it and
takes the minimum over the bank, as the baseline did before; "search" is
``onenip_pl.baselines.knn.nearest_distances``. Both run in this process on the same random features;
the script prints each one's median and range over the repeats, their ratio, and the largest difference
between their distances.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from onenip_pl.baselines.knn import DISTANCE_CHUNK, nearest_distances


def direct_distances(queries: Tensor, bank: Tensor, chunk: int = DISTANCE_CHUNK) -> Tensor:
    """The textbook search: a full bank x chunk squared-distance matrix per chunk, then its minimum."""
    bank_norms = bank.square().sum(dim=1)
    nearest = [
        (bank_norms[:, None] - 2 * bank @ rows.T + rows.square().sum(dim=1)[None, :])
        .clamp_min_(0)
        .min(dim=0)
        .values
        for rows in queries.split(chunk)
    ]
    return torch.cat(nearest).sqrt()


def timed(search: Callable[[Tensor, Tensor], Tensor], queries: Tensor, bank: Tensor, repeats: int):
    search(queries[:DISTANCE_CHUNK], bank)  # warm-up: allocator and thread pool
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = search(queries, bank)
        seconds.append(time.perf_counter() - start)
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bank", type=int, default=120_000, help="bank patches")
    parser.add_argument("--queries", type=int, default=16 * 28 * 28, help="query patches (16 images, 224 px)")
    parser.add_argument("--channels", type=int, default=152, help="feature channels (Lite0: 40 + 112)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(args.bank, args.channels, generator=generator).abs()
    queries = torch.randn(args.queries, args.channels, generator=generator).abs()
    print(
        f"bank {args.bank} x {args.channels}, {args.queries} queries, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats"
    )
    results = {}
    for name, search in (("direct", direct_distances), ("search", nearest_distances)):
        seconds, results[name] = timed(search, queries, bank, args.repeats)
        print(
            f"{name:7s} median {statistics.median(seconds):.3f} s  "
            f"range {min(seconds):.3f} .. {max(seconds):.3f} s"
        )
    difference = float((results["direct"] - results["search"]).abs().max())
    print(f"largest difference between the two searches' distances: {difference:.3g}")


if __name__ == "__main__":
    main()
