"""Training and inference throughput of OneNIP, its time split and peak memory, on generated images.

No data set is needed: a seeded set of generated normal images stands in for the training set, the real
AnomalySynthesizer makes the anomalies and the real TrainTripletDataset draws the prompts. The model comes
from the Hydra config (positional ``key=value`` overrides, as on the training command line), by default
``experiment=mvtec`` (the paper's B4 model) with ``model.pretrained=false``, so nothing is downloaded.

* training: query images/s of full steps (data synthesis, forward, backward, gradient clipping, AdamW), after
  warm-up, median over repeats; with ``model.feature_cache`` the cache is filled first (epoch 1's extra
  cost, reported apart), sized for ``--cache-images`` images so that its memory counts in the peak RSS;
* inference: images/s of ``OneNIP.forward`` on query batches of one category with that category's prompt
  features computed once (the prompt bank);
* a time split (data, backbone, reconstructor, refiner, optimiser) from a few extra instrumented steps;
* peak memory: RSS of the process (each phase runs in its own process), and on a GPU its peak allocation;
* ``--profile-matmuls``: every matrix product of the reconstructor's forward+backward against a plain
  ``torch.matmul`` of the same sizes on this machine.

Example (the issue's reference setting)::

    python scripts/benchmark.py model.pretrained=false data.image_size=224 data.batch_size=8 \\
        trainer.precision=32-true model.feature_cache=memory --threads 2 --json benchmark.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# albumentations (imported with the anomaly synthesis) would otherwise look for updates online
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

MVTEC_TRAIN_IMAGES = 3629
PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


# ---- settings -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the train config, e.g. data.batch_size=8"
    )
    parser.add_argument("--backbone", help="shortcut for model.backbone=...")
    parser.add_argument("--image-size", type=int, help="shortcut for data.image_size=...")
    parser.add_argument("--batch-size", type=int, help="shortcut for data.batch_size=...")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), help="shortcut for trainer.precision")
    parser.add_argument("--feature-cache", choices=("none", "memory", "disk"), help="model.feature_cache")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--split-steps", type=int, default=2, help="instrumented steps for the time split")
    parser.add_argument("--categories", type=int, default=4, help="generated categories (default: 4)")
    parser.add_argument("--images-per-category", type=int, default=16, help="generated images each")
    parser.add_argument(
        "--cache-images",
        type=int,
        default=MVTEC_TRAIN_IMAGES,
        help="size the memory cache for this many training images (MVTec AD: 3629); entries past the "
        "generated ones are copies, there only so that the cache's memory counts in the peak RSS",
    )
    parser.add_argument(
        "--phases", default="train,inference", help="comma list of train, inference (empty: neither)"
    )
    parser.add_argument("--profile-matmuls", action="store_true", help="add the reconstructor matmul profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_intermixed_args(argv)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """Hydra overrides: the paper's model (experiment=mvtec) without download or logger unless overridden,
    then the positional ones, then the shortcuts."""
    chosen = any(override.startswith("experiment=") for override in args.overrides)
    overrides = [*([] if chosen else ["experiment=mvtec"]), "model.pretrained=false", "logger=none"]
    overrides += args.overrides
    shortcuts = {
        "model.backbone": args.backbone,
        "data.image_size": args.image_size,
        "data.batch_size": args.batch_size,
        "trainer.precision": args.precision,
        "model.feature_cache": args.feature_cache,
    }
    overrides += [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    return overrides


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    from onenip_pl.config import compose

    cfg = compose("train", config_overrides(args))
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise SystemExit(f"trainer.precision={precision} is not benchmarked; use one of {sorted(PRECISIONS)}")
    if precision == "16-mixed" and not args.device.startswith("cuda"):
        raise SystemExit("16-mixed needs a CUDA device; use bf16-mixed on CPU")
    from omegaconf import OmegaConf

    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "image_size": int(cfg.data.image_size),
        "batch_size": int(cfg.data.batch_size),
        "precision": precision,
        "gradient_clip_val": cfg.trainer.get("gradient_clip_val"),
        "overrides": config_overrides(args),
        "device": args.device,
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "split_steps": args.split_steps,
        "categories": args.categories,
        "images_per_category": args.images_per_category,
        "cache_images": args.cache_images,
        "seed": args.seed,
    }


# ---- generated data -----------------------------------------------------------------------------------


class GeneratedImages:
    """Normal images that look like textured products: smooth colour fields plus fine noise, seeded.

    Quacks like onenip_pl.data.datasets.ImageSource (``records`` and ``image(index)``).
    """

    def __init__(self, categories: int, per_category: int, size: int, seed: int) -> None:
        from onenip_pl.data.records import ImageRecord

        self.records = []
        self._images = []
        rng = np.random.default_rng(seed)
        for category in range(categories):
            for item in range(per_category):
                path = Path(f"generated/category_{category}/{item:03d}.png")
                self.records.append(ImageRecord(path, f"category_{category}", "train"))
                self._images.append(self._draw(rng, size))

    @staticmethod
    def _draw(rng: np.random.Generator, size: int) -> np.ndarray:
        import cv2

        coarse = rng.uniform(0, 255, size=(7, 7, 3)).astype(np.float32)
        smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        return np.clip(smooth + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)

    def image(self, index: int) -> np.ndarray:
        return self._images[index]


def training_batches(settings: dict[str, Any]) -> tuple[Any, Callable[[int], dict[str, Any]]]:
    """The generated source and a function making training batch `step` with the real dataset class."""
    from torch.utils.data import default_collate

    from onenip_pl.data.datasets import TrainTripletDataset
    from onenip_pl.data.synthesis import AnomalySynthesizer

    size, batch = settings["image_size"], settings["batch_size"]
    source = GeneratedImages(settings["categories"], settings["images_per_category"], size, settings["seed"])
    dataset = TrainTripletDataset(source, AnomalySynthesizer(size), seed=settings["seed"])
    order = np.random.default_rng(settings["seed"])

    def make(step: int) -> dict[str, Any]:
        items = order.integers(0, len(dataset), size=batch)
        return default_collate([dataset[(int(i), 0, step * batch + k)] for k, i in enumerate(items)])

    return source, make


# ---- measuring ----------------------------------------------------------------------------------------


def setup_process(settings: dict[str, Any]) -> torch.device:
    warnings.filterwarnings("ignore", message=".*self.trainer. reference is not registered.*")
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    return torch.device(settings["device"])


def build_module(settings: dict[str, Any], device: torch.device) -> nn.Module:
    """The training config's module on ``device``, with the CPU training kernels its switch asks for."""
    from hydra.utils import instantiate

    from onenip_pl.models.ops import training_kernels

    model = dict(settings["model"])
    if model.get("feature_cache") == "disk" and not model.get("feature_cache_dir"):
        model["feature_cache_dir"] = settings["scratch_dir"]
    module = instantiate(model).to(device)
    kernels = training_kernels(module.hparams.cpu_training_kernels, device)
    if kernels is not None:
        kernels.install(module.net.reconstructor)
    return module


def precision_context(settings: dict[str, Any], device: torch.device) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[settings["precision"]]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak RSS of this process (Linux reports KiB) and, on a GPU, its peak allocation, in GiB."""
    peaks = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        peaks["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return peaks


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


class StageClock:
    """Wall time per stage of a step, from forward hooks and one gradient hook (synchronising a GPU).

    The gradient hook on the reconstruction fires when the loss and the refiner have been
    differentiated; the rest of the backward pass is the reconstructor's.
    """

    def __init__(self, net: nn.Module, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}
        self.backward_mark: float | None = None
        self.handles = []
        for name in ("backbone", "reconstructor", "refiner"):
            module = getattr(net, name)
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _start(self, name: str) -> Callable:
        def hook(module, args):
            self._started[name] = self.now()

        return hook

    def _stop(self, name: str) -> Callable:
        def hook(module, args, output):
            self.times[f"{name} forward"] += self.now() - self._started.pop(name)
            if name == "reconstructor" and isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(self._mark_backward)

        return hook

    def _mark_backward(self, grad: Tensor) -> None:
        self.backward_mark = self.now()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def fill_feature_cache(module: nn.Module, source: GeneratedImages, settings: dict[str, Any], device) -> float:
    """Compute every generated image's cached features (what epoch 1 does on the side), then pad the
    memory cache with copies up to `cache_images` entries; returns the seconds the filling took."""
    from onenip_pl.data.datasets import to_tensor

    cache = module.feature_cache
    count, batch = len(source.records), settings["batch_size"]
    start = time.perf_counter()
    with torch.no_grad(), precision_context(settings, device):
        for first in range(0, count, batch):
            indices = list(range(first, min(first + batch, count)))
            images = torch.stack([to_tensor(source.image(i)) for i in indices])
            cache.check_images(indices, images)
            features = module.net.extract_features(images.to(device))
            for index, entry in zip(indices, features, strict=True):
                cache.store(index, entry)
    synchronize(device)
    seconds = time.perf_counter() - start
    if module.hparams.feature_cache == "memory":
        for index in range(count, settings["cache_images"]):
            cache.store(index, cache.load(index % count, device, features.dtype))
    return seconds


def training_phase(settings: dict[str, Any]) -> dict[str, Any]:
    """Full training steps; runs in its own process so that its peak RSS is its own."""
    device = setup_process(settings)
    module = build_module(settings, device).train()
    source, make_batch = training_batches(settings)
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for p in module.parameters() if p.requires_grad]
    clip = settings["gradient_clip_val"]
    scaler = torch.amp.GradScaler("cuda", enabled=settings["precision"] == "16-mixed")
    result: dict[str, Any] = {}
    if module.feature_cache is not None:
        result["cache_fill_s"] = fill_feature_cache(module, source, settings, device)
        result["cache_entries"] = len(module.feature_cache)
    step_counter = iter(range(10**9))

    def step(clock: StageClock | None = None) -> tuple[float, float]:
        """One step; returns (seconds making the batch, seconds of the rest)."""
        start = time.perf_counter()
        batch = make_batch(next(step_counter))
        batch = module.on_before_batch_transfer(batch, 0)
        data_done = time.perf_counter()
        batch = to_device(batch, device)
        with precision_context(settings, device):
            loss = module.training_step(batch, 0)
        backward_start = clock.now() if clock else 0.0
        scaler.scale(loss).backward()
        backward_end = clock.now() if clock else 0.0
        if clock:
            mark = clock.backward_mark or backward_end
            clock.times["refiner + loss backward"] += mark - backward_start
            clock.times["reconstructor backward"] += backward_end - mark
        scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        end = time.perf_counter()
        if clock:
            clock.times["optimiser (clip + AdamW)"] += end - backward_end
        return data_done - start, end - data_done

    for _ in range(settings["warmup"]):
        step()
    repeats, data_times, compute_times = [], [], []
    cpu_start = time.process_time()
    for _ in range(settings["repeats"]):
        start = time.perf_counter()
        for _ in range(settings["steps"]):
            data_s, compute_s = step()
            data_times.append(data_s)
            compute_times.append(compute_s)
        repeats.append(settings["steps"] * settings["batch_size"] / (time.perf_counter() - start))
    result.update(throughput_summary(repeats, time.process_time() - cpu_start, len(data_times)))
    result["data_s_per_step"] = statistics.median(data_times)
    result["compute_s_per_step"] = statistics.median(compute_times)
    result["split_s_per_step"] = split_of(module, device, settings["split_steps"], step)
    result.update(peak_memory(device))
    return result


def split_of(module: nn.Module, device: torch.device, steps: int, step: Callable) -> dict[str, float]:
    """Mean seconds per stage over `steps` instrumented steps (0 steps: no split)."""
    if steps <= 0:
        return {}
    clock = StageClock(module.net, device)
    data = 0.0
    total_start = time.perf_counter()
    for _ in range(steps):
        clock.backward_mark = None
        data_s, _ = step(clock)
        data += data_s
    total = time.perf_counter() - total_start
    clock.remove()
    split = {"data (synthesis + collate)": data, **clock.times}
    split["other"] = total - sum(split.values())
    return {name: seconds / steps for name, seconds in split.items()}


def inference_phase(settings: dict[str, Any]) -> dict[str, Any]:
    """OneNIP.forward on one category's query batch with its prompt features computed once."""
    from onenip_pl.data.datasets import to_tensor

    device = setup_process(settings)
    module = build_module(settings, device).eval()
    net = module.net
    size, batch = settings["image_size"], settings["batch_size"]
    source = GeneratedImages(settings["categories"], max(batch, 2), size, settings["seed"])
    by_category: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(source.records):
        by_category[record.category].append(index)
    categories = sorted(by_category)
    with torch.inference_mode(), precision_context(settings, device):
        prompts = {
            c: net.extract_features(to_tensor(source.image(by_category[c][0]))[None].to(device))
            for c in categories
        }
        queries = {
            c: torch.stack([to_tensor(source.image(i)) for i in by_category[c][:batch]]).to(device)
            for c in categories
        }
        counter = iter(range(10**9))

        def step() -> None:
            category = categories[next(counter) % len(categories)]
            net(queries[category], prompt_features=prompts[category])

        for _ in range(settings["warmup"]):
            step()
        synchronize(device)
        repeats = []
        cpu_start = time.process_time()
        for _ in range(settings["repeats"]):
            start = time.perf_counter()
            for _ in range(settings["steps"]):
                step()
            synchronize(device)
            repeats.append(settings["steps"] * batch / (time.perf_counter() - start))
        steps = settings["repeats"] * settings["steps"]
        result = throughput_summary(repeats, time.process_time() - cpu_start, steps)
        if settings["split_steps"] > 0:
            clock = StageClock(net, device)
            start = time.perf_counter()
            for _ in range(settings["split_steps"]):
                step()
            synchronize(device)
            total = time.perf_counter() - start
            clock.remove()
            split = dict(clock.times)
            split["other (maps, fusion)"] = total - sum(split.values())
            result["split_s_per_step"] = {k: v / settings["split_steps"] for k, v in split.items()}
    result.update(peak_memory(device))
    return result


def throughput_summary(images_per_second: list[float], cpu_seconds: float, steps: int) -> dict[str, Any]:
    """Median, min and max over repeats, and the process CPU seconds per step: on a shared machine the
    best repeat and the CPU time say more about the work than the median wall time does."""
    return {
        "images_per_s": statistics.median(images_per_second),
        "images_per_s_min": min(images_per_second),
        "images_per_s_max": max(images_per_second),
        "repeats": images_per_second,
        "cpu_s_per_step": cpu_seconds / steps,
    }


# ---- reconstructor matmul profile ---------------------------------------------------------------------


def matmul_profile_phase(settings: dict[str, Any]) -> dict[str, Any]:
    """Each matrix product of one reconstructor forward+backward (a training step's sizes) against a plain
    fp32 torch.matmul of the same sizes: how far each is from what this machine's BLAS reaches."""
    from torch.profiler import ProfilerActivity, profile

    device = setup_process(settings)
    module = build_module(settings, device).train()
    net, batch = module.net, settings["batch_size"]
    grid, channels = net.feature_size, net.feature_channels
    generator = torch.Generator().manual_seed(settings["seed"])
    inputs = torch.randn(2 * batch, channels, grid, grid, generator=generator).to(device)
    prompts = torch.randn(batch, channels, grid, grid, generator=generator).to(device)

    def forward_backward() -> None:
        with precision_context(settings, device):
            reconstruction = net.reconstruct(inputs, prompts)
        reconstruction.float().square().mean().backward()
        synchronize(device)

    for _ in range(2):
        forward_backward()
    start = time.perf_counter()
    forward_backward()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as profiler:
        forward_backward()
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    total_self_us = 0.0
    for event in profiler.events():
        total_self_us += event.self_cpu_time_total
        if event.name not in MATMUL_OPS:
            continue
        key = (event.name, str(event.input_shapes))
        group = groups.setdefault(
            key, {"op": event.name, "shapes": event.input_shapes, "calls": 0, "us": 0.0}
        )
        group["calls"] += 1
        group["us"] += event.self_cpu_time_total
        group["flops"] = group.get("flops", 0) + (event.flops or matmul_flops(event.name, event.input_shapes))
    rows = []
    for group in sorted(groups.values(), key=lambda g: -g["us"]):
        m, k, n, b = matmul_sizes(group["op"], group["shapes"])
        achieved = group["flops"] / (group["us"] * 1e-6) / 1e9
        reference = plain_matmul_gflops(b, m, k, n, device)
        rows.append(
            {
                "op": group["op"],
                "size (b x m x k x n)": f"{b}x{m}x{k}x{n}",
                "calls": group["calls"],
                "ms": group["us"] / 1e3,
                "gflop_per_s": achieved,
                "plain_matmul_gflop_per_s": reference,
                "ratio": achieved / reference,
            }
        )
    matmul_ms = sum(r["ms"] for r in rows)
    return {
        "wall_s_forward_backward": wall,
        "profiled_self_ms": total_self_us / 1e3,
        "matmul_ms": matmul_ms,
        "matmul_share": matmul_ms / (total_self_us / 1e3),
        "matmul_gflop": sum(g["flops"] for g in groups.values()) / 1e9,
        "rows": rows,
    }


def matmul_sizes(op: str, shapes: list) -> tuple[int, int, int, int]:
    """(m, k, n, batch) of an mm/addmm/bmm/baddbmm call from its recorded input shapes."""
    first, second = (
        (shapes[1], shapes[2]) if op in ("aten::addmm", "aten::baddbmm") else (shapes[0], shapes[1])
    )
    batch = first[0] if len(first) == 3 else 1
    return first[-2], first[-1], second[-1], batch


def matmul_flops(op: str, shapes: list) -> int:
    m, k, n, batch = matmul_sizes(op, shapes)
    return 2 * batch * m * k * n


def plain_matmul_gflops(
    batch: int, m: int, k: int, n: int, device: torch.device, seconds: float = 0.3, calls: int = 10
) -> float:
    """GFLOP/s of torch.matmul on contiguous fp32 operands of these sizes: the best of at least `calls`
    calls and `seconds` (the best, since a shared machine only ever slows a call down)."""
    shape_a, shape_b = ((batch, m, k), (batch, k, n)) if batch > 1 else ((m, k), (k, n))
    a, b = torch.randn(shape_a, device=device), torch.randn(shape_b, device=device)
    torch.matmul(a, b)
    best, deadline, done = math.inf, time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline or done < calls:
        done += 1
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * batch * m * k * n / best / 1e9


# ---- report -------------------------------------------------------------------------------------------


def run_isolated(function: Callable[[dict[str, Any]], dict[str, Any]], settings: dict[str, Any]) -> dict:
    """Run a phase in a fresh process: its peak RSS is then its own, and phases do not share caches.
    A scratch folder (for an on-disk feature cache without model.feature_cache_dir) lives as long."""
    with (
        tempfile.TemporaryDirectory(prefix="onenip_benchmark_") as scratch,
        ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool,
    ):
        return pool.submit(function, {**settings, "scratch_dir": scratch}).result()


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"OneNIP benchmark: {s['model']['backbone']} (pretrained={s['model']['pretrained']}), "
        f"{s['image_size']} px, batch {s['batch_size']}, {s['precision']}, {s['device']}, "
        f"threads {report['threads']}, feature_cache={s['model'].get('feature_cache', 'none')}, "
        f"channels_last={s['model'].get('channels_last', False)}",
        f"load average before/after: {report['load_before']} / {report['load_after']}",
        "",
        f"{'phase':<11}{'images/s (median)':>19}{'min':>8}{'max':>8}{'CPU s/step':>12}{'peak RSS GiB':>14}"
        f"{'GPU GiB':>9}",
    ]
    for phase in ("train", "inference"):
        r = report.get(phase)
        if r is None:
            continue
        gpu = f"{r['peak_gpu_allocated_gib']:.2f}" if "peak_gpu_allocated_gib" in r else "-"
        lines.append(
            f"{phase:<11}{r['images_per_s']:>19.2f}{r['images_per_s_min']:>8.2f}{r['images_per_s_max']:>8.2f}"
            f"{r['cpu_s_per_step']:>12.2f}{r['peak_rss_gib']:>14.2f}{gpu:>9}"
        )
    for phase in ("train", "inference"):
        split = report.get(phase, {}).get("split_s_per_step")
        if split:
            total = sum(split.values())
            lines += ["", f"{phase} time split per step ({total:.3f} s instrumented):"]
            lines += [f"  {name:<28}{sec:>8.3f} s {100 * sec / total:>6.1f} %" for name, sec in split.items()]
    train = report.get("train", {})
    if "cache_fill_s" in train:
        lines += [
            "",
            f"feature cache: {train['cache_entries']} entries; the generated images' features took "
            f"{train['cache_fill_s']:.2f} s (epoch 1's extra backbone work); steady-state steps: data "
            f"{train['data_s_per_step']:.3f} s, rest {train['compute_s_per_step']:.3f} s",
        ]
    profile = report.get("matmul_profile")
    if profile:
        lines += [
            "",
            f"reconstructor forward+backward: {profile['wall_s_forward_backward']:.3f} s wall; matmuls "
            f"{profile['matmul_gflop']:.1f} GFLOP in {profile['matmul_ms']:.0f} ms "
            f"({100 * profile['matmul_share']:.0f} % of profiled op time)",
            f"  {'op':<14}{'b x m x k x n':>22}{'calls':>6}{'ms':>8}{'GFLOP/s':>9}{'plain':>8}{'ratio':>7}",
        ]
        for row in profile["rows"]:
            lines.append(
                f"  {row['op']:<14}{row['size (b x m x k x n)']:>22}{row['calls']:>6}{row['ms']:>8.1f}"
                f"{row['gflop_per_s']:>9.1f}{row['plain_matmul_gflop_per_s']:>8.1f}{row['ratio']:>7.2f}"
            )
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = settings_of(args)
    phases = {name.strip() for name in args.phases.split(",") if name.strip()}
    unknown = phases - {"train", "inference"}
    if unknown:
        raise SystemExit(f"--phases: unknown {sorted(unknown)}; use train and/or inference")
    report: dict[str, Any] = {
        "settings": settings,
        "threads": settings["threads"] or torch.get_num_threads(),
        "torch": torch.__version__,
        "load_before": load_average(),
    }
    if "train" in phases:
        report["train"] = run_isolated(training_phase, settings)
    if "inference" in phases:
        report["inference"] = run_isolated(inference_phase, settings)
    if args.profile_matmuls:
        report["matmul_profile"] = run_isolated(matmul_profile_phase, settings)
    report["load_after"] = load_average()
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
