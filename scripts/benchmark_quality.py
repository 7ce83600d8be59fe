"""Quality on real parts: one unified OneNIP model against a PatchCore-style kNN, same images, same backbone.

    python scripts/benchmark_quality.py --root DIR [--epochs E | --minutes N] [--curve K] [--json OUT]
        [--out DIR] [--knn-coreset 0.1] [hydra overrides ...]

``DIR`` is a data set in MVTec AD layout (any categories; ``data.dataset=folder`` and other readers work as
overrides). OneNIP is trained on all categories within the budget (``--epochs``, or ``--minutes`` of wall
time for training) with the package's own ``train`` (default ``experiment=demo``: Lite0, the laptop width)
and tested by it. The kNN baseline (onenip_pl.baselines.knn) keeps the same training images' patch
features through the same backbone and is scored by the package's metric suite. One table compares them
per category and on the mean, with both wall times; ``--curve K`` tests OneNIP every K epochs and draws
``quality_curve.png`` (and writes ``quality_curve.csv``) beside the kNN's flat line. The curve is a
report: the final weights are what the table shows, whatever the curve says.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from onenip_pl.baselines import PatchKNN  # noqa: E402
from onenip_pl.config import compose  # noqa: E402
from onenip_pl.data.datasets import NormalImageDataset, PromptedImageDataset  # noqa: E402
from onenip_pl.errors import OneNIPError  # noqa: E402
from onenip_pl.metrics import AnomalyMetrics  # noqa: E402
from onenip_pl.metrics.reports import load_results  # noqa: E402
from onenip_pl.train import train  # noqa: E402
from onenip_pl.utils.instantiate import instantiate  # noqa: E402

METRICS = (
    "image_AUROC",
    "image_AP",
    "image_F1max",
    "pixel_AUROC",
    "pixel_AP",
    "pixel_F1max",
    "pixel_AUPRO",
)
CURVE_FILE = "quality_curve.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="data set root (MVTec AD layout by default)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="OneNIP training epochs (default: the experiment's)")
    budget.add_argument("--minutes", type=float, help="OneNIP training wall-time budget in minutes")
    parser.add_argument(
        "--curve", type=int, metavar="K", help="test OneNIP every K epochs: quality_curve.png"
    )
    parser.add_argument("--knn-coreset", type=float, default=0.1, help="kNN coreset ratio (default 0.1)")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    parser.add_argument(
        "--out", type=Path, default=Path("logs/quality") / stamp, help="where runs and reports go"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-knn", action="store_true", help="OneNIP only (e.g. for a sweep of factors)")
    skip.add_argument("--skip-onenip", action="store_true", help="the kNN only (e.g. for its coreset size)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")
    return parser.parse_intermixed_args(argv)


def onenip_overrides(args: argparse.Namespace) -> list[str]:
    """The train config's overrides: the demo recipe on the root, the budget, the curve, CSV logging."""
    given = {override.split("=", 1)[0].lstrip("+~") for override in args.overrides}
    out = args.out.resolve()
    defaults = {"experiment": "demo", "logger": "csv", "progress": "default"}
    if "experiment" not in given:
        # the demo recipe's own reader writes synthetic data; a root given here is read as MVTec AD
        defaults["data.dataset"] = "mvtec"
    overrides = [f"{key}={value}" for key, value in defaults.items() if key not in given]
    overrides += [
        f"data.root={args.root.resolve()}",
        f"paths.output_dir={out / 'onenip'}",
        f"paths.log_dir={out}",
    ]
    if args.epochs is not None:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    if args.minutes is not None:
        seconds = round(args.minutes * 60)
        overrides += [
            "trainer.max_epochs=100000",
            f"++trainer.max_time=00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}",
        ]
    overrides += [
        "+callbacks.learning_curve._target_=onenip_pl.lightning.curve.LearningCurve",
        f"+callbacks.learning_curve.every_n_epochs={args.curve or 'null'}",
        f"+callbacks.learning_curve.csv_path={out / CURVE_FILE}",
    ]
    return [*overrides, *args.overrides]


class Clock:
    """Wall and CPU seconds (this process and its finished children, e.g. data-loader workers)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def read(self) -> dict[str, float]:
        return {"wall_s": time.perf_counter() - self.wall, "cpu_s": self._cpu() - self.cpu}


def run_onenip(cfg, out: Path) -> dict[str, Any]:
    """Train and test with the package's own ``train``; its metrics.json is the OneNIP row."""
    clock = Clock()
    train(cfg)
    results = load_results(Path(cfg.paths.output_dir) / "metrics.json")
    timing = json.loads((out / CURVE_FILE).with_suffix(".json").read_text())
    return {"results": results, **clock.read(), **timing}


@torch.no_grad()
def run_knn(cfg, coreset: float) -> dict[str, Any]:
    """The baseline on the training images OneNIP trained on, tested on the same test images."""
    clock = Clock()
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    source = datamodule.train_source
    trained = set(datamodule.splits.trained_categories)
    indices = [i for i, record in enumerate(source.records) if record.category in trained]
    batch_size, workers = cfg.data.eval_batch_size, cfg.data.num_workers
    normals = DataLoader(NormalImageDataset(source, indices), batch_size=batch_size, num_workers=workers)
    knn = PatchKNN(
        cfg.model.backbone, cfg.data.image_size, coreset, pretrained=cfg.model.pretrained, seed=cfg.seed
    )
    bank = knn.fit(batch["image"] for batch in normals)
    fitted = clock.read()
    tests = PromptedImageDataset(datamodule.test_records, source, cfg.data.image_size, cfg.seed, "retrieval")
    metrics = AnomalyMetrics()
    for batch in DataLoader(tests, batch_size=batch_size, num_workers=workers):
        maps, scores = knn.score(batch["image"])
        metrics.update(scores, batch["label"], maps, batch["mask"], list(batch["category"]))
    return {
        "results": metrics.compute(),
        **clock.read(),
        "fit_wall_s": fitted["wall_s"],
        "bank_patches": bank,
    }


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def format_table(runs: dict[str, dict[str, Any]]) -> str:
    """Per category and mean, one row per method, the seven metrics in %; then the wall times."""
    names = list(runs)
    categories = list(next(iter(runs.values()))["results"]["per_category"])
    width = max(len(c) for c in [*categories, "category", "mean"])
    header = f"{'category':<{width}}  {'method':<7}" + "".join(f"  {m:>11}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for category in [*categories, "mean"]:
        for index, name in enumerate(names):
            results = runs[name]["results"]
            values = results["mean"] if category == "mean" else results["per_category"][category]
            label = category if index == 0 else ""
            cells = "".join(f"  {100 * values.get(m, float('nan')):>11.2f}" for m in METRICS)
            lines.append(f"{label:<{width}}  {name:<7}{cells}")
        if category == categories[-1]:
            lines.append("-" * len(header))
    for name, run in runs.items():
        extra = (
            f", {run['epochs']} epochs, {_duration(run['train_seconds'])} training" if "epochs" in run else ""
        )
        extra += f", bank of {run['bank_patches']} patches" if run.get("bank_patches") else ""
        lines.append(f"{name}: {_duration(run['wall_s'])} wall, {_duration(run['cpu_s'])} CPU{extra}")
    return "\n".join(lines)


def read_curve(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)
        ]


def plot_curve(curve: list[dict[str, float]], runs: dict[str, dict[str, Any]], out: Path) -> Path:
    """Mean metrics against epochs and against training minutes, OneNIP's final point included, beside
    the kNN's flat line."""
    from matplotlib.figure import Figure

    onenip = runs["OneNIP"]
    final = {"epoch": float(onenip["epochs"]), "train_seconds": onenip["train_seconds"]}
    final |= {f"mean/{m}": onenip["results"]["mean"][m] for m in ("image_AUROC", "pixel_AP", "pixel_AUROC")}
    points = [*curve, final]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2)
    for metric, colour in (
        ("image_AUROC", "tab:blue"),
        ("pixel_AP", "tab:red"),
        ("pixel_AUROC", "tab:green"),
    ):
        for ax, x_key, scale in ((axes[0], "epoch", 1.0), (axes[1], "train_seconds", 1 / 60)):
            xs = [p[x_key] * scale for p in points if f"mean/{metric}" in p]
            ys = [p[f"mean/{metric}"] for p in points if f"mean/{metric}" in p]
            ax.plot(xs, ys, marker="o", color=colour, label=f"OneNIP {metric}")
            if "kNN" in runs:
                ax.axhline(
                    runs["kNN"]["results"]["mean"][metric],
                    color=colour,
                    linestyle="--",
                    label=f"kNN {metric}",
                )
    axes[0].set(xlabel="epoch", ylabel="mean over categories", ylim=(0, 1.02), title="quality by epoch")
    axes[1].set(xlabel="training wall time (min)", ylim=(0, 1.02), title="quality by training time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    path = out / "quality_curve.png"
    figure.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        overrides = onenip_overrides(args)
        cfg = compose("train", overrides)
        runs = {} if args.skip_onenip else {"OneNIP": run_onenip(cfg, args.out.resolve())}
        curve = read_curve(args.out.resolve() / CURVE_FILE) if args.curve else []
        if not args.skip_knn:
            runs["kNN"] = run_knn(cfg, args.knn_coreset)
    except OneNIPError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(runs), flush=True)
    report = {"overrides": overrides, **runs}
    if args.curve and "OneNIP" in runs:
        report["curve"] = curve
        report["curve_png"] = str(plot_curve(curve, runs, args.out.resolve()))
    out_json = args.json or args.out / "quality.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2))
    print(f"results written to {out_json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
