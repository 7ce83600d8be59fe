"""Time the metric suite on synthetic data the size of the MVTec AD test set.

The data imitate the real evaluation: 15 categories with MVTec AD's test counts (467 normal, 1,258
anomalous images), maps made like OneNIP's (a 14x14 feature-distance grid upsampled x16 bilinearly,
plus a response around the defect), defects as irregular blobs covering about 4 % of all pixels, and
image scores taken as the maximum of the 16x16-average-pooled map. Everything is seeded.

Example::

    python scripts/benchmark_metrics.py --threads 2 --json benchmark_metrics.json
    python scripts/benchmark_metrics.py --check-sklearn   # also compare with scikit-learn (slow)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from onenip_pl.metrics import (
    ALL_METRICS,
    DEFAULT_NUM_BINS,
    AnomalyMetrics,
    CategoryData,
    MetricUndefinedWarning,
    compute_category_metrics,
)

# (normal, anomalous) test images per MVTec AD category.
MVTEC_TEST_COUNTS: dict[str, tuple[int, int]] = {
    "bottle": (20, 63),
    "cable": (58, 92),
    "capsule": (23, 109),
    "carpet": (28, 89),
    "grid": (21, 57),
    "hazelnut": (40, 70),
    "leather": (32, 92),
    "metal_nut": (22, 93),
    "pill": (26, 141),
    "screw": (41, 119),
    "tile": (33, 84),
    "toothbrush": (12, 30),
    "transistor": (60, 40),
    "wood": (19, 60),
    "zipper": (32, 119),
}
MEAN_DEFECT_FRACTION = 0.055  # of an anomalous image; about 4 % of all test pixels overall


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="map side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=5, help="timings report the fastest of this many runs")
    parser.add_argument("--num-bins", type=int, default=DEFAULT_NUM_BINS)
    parser.add_argument("--check-sklearn", action="store_true", help="compare exact values with scikit-learn")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def make_dataset(size: int, seed: int) -> dict[str, CategoryData]:
    """Synthetic test set: per category, scores, labels, float32 maps and bool masks."""
    generator = torch.Generator().manual_seed(seed)
    data = {}
    for category, (num_normal, num_anomalous) in MVTEC_TEST_COUNTS.items():
        labels = torch.cat([torch.zeros(num_normal), torch.ones(num_anomalous)]).to(torch.uint8)
        masks = torch.stack([_defect_mask(size, bool(label), generator) for label in labels])
        maps = _anomaly_maps(masks, generator)
        scores = _image_scores(maps)
        data[category] = CategoryData(scores, labels, maps, masks)
    return data


def _image_scores(maps: Tensor) -> Tensor:
    """Maximum of the 16x16 mean-filtered map (OneNIP's image score), with a separable filter for speed."""
    pooled = F.avg_pool2d(maps[:, None], kernel_size=(16, 1), stride=1)
    return F.avg_pool2d(pooled, kernel_size=(1, 16), stride=1).amax(dim=(1, 2, 3))


def _defect_mask(size: int, anomalous: bool, generator: torch.Generator) -> Tensor:
    """Union of 1-3 ellipses with noisy outlines, covering a log-normally drawn share of the image."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    if not anomalous:
        return mask
    y, x = _unit_grid(size)
    num_blobs = int(torch.randint(1, 4, (1,), generator=generator))
    fraction = MEAN_DEFECT_FRACTION * math.exp(0.8 * float(torch.randn(1, generator=generator)) - 0.32)
    outline_noise = _smooth_noise(size, 8, generator)
    for _ in range(num_blobs):
        area = fraction / num_blobs
        aspect = math.exp(float(torch.empty(1).uniform_(-1.0, 1.0, generator=generator)))
        a = math.sqrt(area * aspect / math.pi)
        b = math.sqrt(area / aspect / math.pi)
        cy, cx = (0.1 + 0.8 * torch.rand(2, generator=generator)).tolist()
        angle = math.pi * float(torch.rand(1, generator=generator))
        u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
        v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
        mask |= (u / a) ** 2 + (v / b) ** 2 + 0.6 * outline_noise < 1.0
    return mask


@functools.cache
def _unit_grid(size: int) -> tuple[Tensor, Tensor]:
    coords = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return y, x


def _anomaly_maps(masks: Tensor, generator: torch.Generator) -> Tensor:
    """OneNIP-like maps: upsampled coarse distances plus a blurred, randomly strong defect response."""
    count, size = masks.shape[0], masks.shape[-1]
    coarse = torch.rand(count, 1, size // 16, size // 16, generator=generator)
    base = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    blurred = F.avg_pool2d(masks[:, None].float(), kernel_size=9, stride=1, padding=4)
    strength = 0.3 + 1.2 * torch.rand(count, 1, 1, 1, generator=generator)
    return (base + strength * blurred)[:, 0].contiguous()


def _smooth_noise(size: int, cells: int, generator: torch.Generator) -> Tensor:
    coarse = torch.randn(1, 1, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0, 0]


@dataclass(frozen=True)
class Timing:
    """Fastest wall-clock and fastest process CPU time (all threads) over the repeats, in seconds.

    On a machine shared with other jobs both grow with the load (CPU time less so), hence the minimum.
    """

    wall: float
    cpu: float

    def __str__(self) -> str:
        return f"{self.wall:6.2f} s wall  {self.cpu:6.2f} s cpu"


def suite_job(
    data: dict[str, CategoryData], metrics: tuple[str, ...], binned: bool, num_bins: int
) -> Callable[[], dict]:
    """All categories through :func:`compute_category_metrics`."""
    def run() -> dict[str, dict[str, float]]:
        return {
            name: compute_category_metrics(
                d.image_scores, d.image_labels, d.anomaly_maps, d.masks,
                metrics=metrics, binned=binned, num_bins=num_bins, category=name,
            )
            for name, d in data.items()
        }

    return run


def metric_object_job(data: dict[str, CategoryData], batch_size: int) -> Callable[[], dict]:
    """The set fed to :class:`AnomalyMetrics` in batches, then computed (exact, all metrics)."""
    def run() -> dict:
        metric = AnomalyMetrics()
        for name, d in data.items():
            for start in range(0, len(d.image_labels), batch_size):
                rows = slice(start, start + batch_size)
                metric.update(
                    d.image_scores[rows], d.image_labels[rows], d.anomaly_maps[rows], d.masks[rows],
                    [name] * len(d.image_labels[rows]),
                )
        with warnings.catch_warnings():
            warnings.simplefilter("error", MetricUndefinedWarning)
            return metric.compute()

    return run


def time_interleaved(jobs: dict[str, Callable[[], dict]], repeats: int) -> tuple[dict[str, Timing], dict]:
    """Runs every job once per round, ``repeats`` rounds; returns each job's best timing and last result.

    Interleaving spreads each job's repeats over the whole benchmark, so a burst of load from other
    processes cannot spoil all of them.
    """
    walls: dict[str, list[float]] = {name: [] for name in jobs}
    cpus: dict[str, list[float]] = {name: [] for name in jobs}
    results: dict[str, dict] = {}
    for _ in range(repeats):
        for name, job in jobs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = job()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {name: Timing(min(walls[name]), min(cpus[name])) for name in jobs}, results


def sklearn_differences(
    data: dict[str, CategoryData], exact: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Largest |ours - scikit-learn| per ranking metric over the categories."""
    import numpy as np
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
        precision, recall, _ = precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
        return float(f1.max())

    references = {"AUROC": roc_auc_score, "AP": average_precision_score, "F1max": f1_max}
    worst: dict[str, float] = {}
    for name, d in data.items():
        levels = {
            "image": (d.image_labels.numpy(), d.image_scores.numpy()),
            "pixel": (d.masks.reshape(-1).numpy(), d.anomaly_maps.reshape(-1).numpy()),
        }
        for level, (labels, scores) in levels.items():
            for kind, reference in references.items():
                key = f"{level}_{kind}"
                difference = abs(exact[name][key] - reference(labels, scores))
                worst[key] = max(worst.get(key, 0.0), difference)
    return worst


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = make_dataset(args.size, args.seed)
    num_pixels = sum(d.masks.numel() for d in data.values())
    anomalous = sum(int(d.masks.sum()) for d in data.values()) / num_pixels
    num_maps = sum(len(d.image_labels) for d in data.values())
    print(
        f"synthetic set: {num_maps} maps of {args.size} px in {len(data)} categories, "
        f"{anomalous:.2%} anomalous pixels (built in {time.perf_counter() - started:.1f} s)"
    )
    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} cores, load average {load:.1f}")

    jobs = {name: suite_job(data, (name,), False, args.num_bins) for name in ALL_METRICS}
    jobs |= {
        "exact": suite_job(data, ALL_METRICS, False, args.num_bins),
        "binned": suite_job(data, ALL_METRICS, True, args.num_bins),
        "metric_object": metric_object_job(data, 32),
    }
    timings, results = time_interleaved(jobs, args.repeats)
    per_metric = {name: timings[name] for name in ALL_METRICS}
    exact_total, exact = timings["exact"], results["exact"]
    binned_total, binned = timings["binned"], results["binned"]
    metric_object_total = timings["metric_object"]

    print("\nexact, seconds for all categories (each metric alone; together they share one sort):")
    for name, timing in per_metric.items():
        print(f"  {name:<12} {timing}")
    print(f"  {'all 7':<12} {exact_total}")
    print(f"binned ({args.num_bins} thresholds), all 7: {binned_total}")
    print(f"AnomalyMetrics, update in batches of 32 + compute (exact, all 7): {metric_object_total}")
    mean_exact = {m: statistics.fmean(v[m] for v in exact.values()) for m in ALL_METRICS}
    binned_error = {m: max(abs(binned[c][m] - exact[c][m]) for c in exact) for m in ALL_METRICS}
    print("\nmean over categories (exact) and largest |binned - exact| per category:")
    for name in ALL_METRICS:
        print(f"  {name:<12} {mean_exact[name]:.4f}   {binned_error[name]:.2e}")

    report = {
        "maps": num_maps,
        "size": args.size,
        "threads": threads,
        "load_average_1min": load,
        "anomalous_pixel_fraction": anomalous,
        "exact_seconds_per_metric": {name: asdict(timing) for name, timing in per_metric.items()},
        "exact_seconds_all": asdict(exact_total),
        "binned_seconds_all": asdict(binned_total),
        "anomaly_metrics_update_and_compute_seconds": asdict(metric_object_total),
        "num_bins": args.num_bins,
        "mean_exact": mean_exact,
        "max_binned_error": binned_error,
    }
    if args.check_sklearn:
        report["max_sklearn_difference"] = sklearn_differences(data, exact)
        print("\nlargest |ours - scikit-learn|:", json.dumps(report["max_sklearn_difference"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
