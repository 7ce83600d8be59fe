"""Time training-data epochs with and without the decode-once image cache.

Example (the shared real hazelnut images, 512-px JPEG, resized to 224):
    python scripts/benchmark_loading.py --root ../shared/data/hazelnut_toy --epochs 3

Each epoch decodes (or fetches) every query and its prompt, resizes them and
synthesises an anomaly, exactly as the training dataloader does, in one
process so the figures compare the cache modes and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from onenip_pl.data.datasets import IMAGE_CACHE_MODES, ImageSource, TrainTripletDataset  # noqa: E402
from onenip_pl.data.readers import read_dataset  # noqa: E402
from onenip_pl.data.synthesis import AnomalySynthesizer  # noqa: E402


def _epoch(work, count: int) -> float:
    start = time.perf_counter()
    for item in range(count):
        work(item)
    return time.perf_counter() - start


def time_epochs(records, image_size: int, cache: str, epochs: int, cache_dir: str) -> dict:
    """Per epoch: fetching query+prompt images alone, and whole training samples (with synthesis)."""
    start = time.perf_counter()
    source = ImageSource(records, image_size, cache=cache, cache_dir=cache_dir)
    setup = time.perf_counter() - start
    dataset = TrainTripletDataset(source, AnomalySynthesizer(image_size))
    torch.manual_seed(0)
    fetch = [
        _epoch(lambda i: (source.image(i), source.image((i + 1) % len(source))), len(source))
        for _ in range(epochs)
    ]
    full = [_epoch(dataset.__getitem__, len(dataset)) for _ in range(epochs)]
    return {
        "cache": cache,
        "setup_s": setup,
        "fetch_epoch_s": fetch,
        "sample_epoch_s": full,
        "fetch_later_s": statistics.median(fetch[1:]),
        "sample_later_s": statistics.median(full[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True)
    parser.add_argument("--reader", default="mvtec")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch fills the caches)")
    records = [r for r in read_dataset(args.reader, args.root) if r.split == "train"]
    results = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for cache in IMAGE_CACHE_MODES:
            results.append(time_epochs(records, args.image_size, cache, args.epochs, cache_dir))
    print(f"{len(records)} training images from {args.root} at {args.image_size} px, {args.epochs} epochs")
    print("cache      setup s  fetch ep1 s  fetch later s  speed-up  samples later s  speed-up")
    fetch0, sample0 = results[0]["fetch_later_s"], results[0]["sample_later_s"]
    for row in results:
        fetch, sample = row["fetch_later_s"], row["sample_later_s"]
        print(
            f"{row['cache']:<8} {row['setup_s']:>9.2f} {row['fetch_epoch_s'][0]:>12.2f} {fetch:>14.3f} "
            f"{fetch0 / fetch:>8.1f}x {sample:>16.2f} {sample0 / sample:>8.1f}x"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
