"""Human- and machine-readable reports of :func:`~onenip_pl.metrics.suite.summarize` results.

``results`` below always means ``{"per_category": {category: {metric: value}}, "mean": {metric: value}}``
with values in [0, 1] (NaN where undefined), optionally with ``"groups"`` (``{"seen": means, "unseen":
means}`` of the unseen-product protocol) and ``"unseen_categories"`` (marked in the tables). Tables
show percentages with two decimals; the JSON and CSV files keep the raw fractions at full precision so
that they can be compared and re-read exactly.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from onenip_pl.errors import DataError
from onenip_pl.metrics.ranking import (
    ThresholdSweep,
    auroc,
    average_precision,
    pr_points,
    roc_points,
    sweep_exact,
)
from onenip_pl.metrics.suite import CategoryData

__all__ = ["format_table", "load_results", "plot_curves", "write_reports"]

MEAN_ROW = "mean"
_MISSING = "n/a"
_MAX_PLOTTED_POINTS = 4096


def format_table(results: Mapping[str, Any]) -> str:
    """Plain-text table: one row per category and a final mean row, metrics as columns, values in %."""
    header, rows = _percent_rows(results)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        numbers = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([cells[0].ljust(widths[0]), *numbers])

    rule = "  ".join("-" * width for width in widths)
    body = [line(row) for row in rows]
    count = len(results["per_category"])
    legend = ["* unseen: not trained on (its normal images were prompts and calibration only)"]
    footer = legend if results.get("unseen_categories") else []
    return "\n".join([line(header), rule, *body[:count], rule, *body[count:], *footer])


def write_reports(results: Mapping[str, Any], run_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json, metrics.csv and metrics.md into ``run_dir``; returns their paths by format.

    JSON holds ``{"per_category": ..., "mean": ...}`` with NaN written as null; CSV has a ``category``
    column (the last row is ``mean``), raw fractions and empty cells for NaN; Markdown is the table in %.
    """
    names = _metric_names(results)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": run_dir / "metrics.json",
        "csv": run_dir / "metrics.csv",
        "markdown": run_dir / "metrics.md",
    }
    document = {
        "per_category": {c: _nan_to_none(v) for c, v in results["per_category"].items()},
        "mean": _nan_to_none(results["mean"]),
    }
    if results.get("groups"):
        document["groups"] = {name: _nan_to_none(v) for name, v in results["groups"].items()}
        document["unseen_categories"] = list(results.get("unseen_categories", []))
    paths["json"].write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", *names])
        for category, values in _rows_with_mean(results, marked=False):
            writer.writerow([category, *(_csv_cell(values.get(name, math.nan)) for name in names)])
    paths["markdown"].write_text(_markdown_table(results), encoding="utf-8")
    return paths


def load_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a metrics.json written by :func:`write_reports` back, null becoming NaN."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    optional = {"groups", "unseen_categories"}
    if (
        not isinstance(document, dict)
        or not {"per_category", "mean"} <= set(document) <= {"per_category", "mean"} | optional
    ):
        raise DataError(f"{path}: not a metrics.json written by write_reports (keys per_category and mean)")
    results: dict[str, Any] = {
        "per_category": {c: _none_to_nan(v) for c, v in document["per_category"].items()},
        "mean": _none_to_nan(document["mean"]),
    }
    if "groups" in document:
        results["groups"] = {name: _none_to_nan(v) for name, v in document["groups"].items()}
        results["unseen_categories"] = document.get("unseen_categories", [])
    return results


def plot_curves(data: Mapping[str, CategoryData], out_dir: str | Path) -> dict[str, Path]:
    """One PNG per category with the ROC and precision-recall curves, image and pixel level.

    ``data`` is e.g. ``AnomalyMetrics.category_data()``.
    Curves are exact; long ones are thinned to a few thousand points for drawing only.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for category, category_data in data.items():
        figure = Figure(figsize=(10, 4.5), layout="constrained")
        roc_axes, pr_axes = figure.subplots(1, 2)
        for level, sweep in _level_sweeps(category_data).items():
            if not sweep.is_defined:
                continue
            fpr, tpr = roc_points(sweep)
            recall, precision = pr_points(sweep)
            roc_axes.plot(*_thinned(fpr, tpr), label=f"{level} (AUROC {_percent(auroc(sweep))} %)")
            ap_label = f"{level} (AP {_percent(average_precision(sweep))} %)"
            pr_axes.plot(*_thinned(recall, precision), label=ap_label)
        roc_axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        _style(roc_axes, "ROC", "false positive rate", "true positive rate")
        _style(pr_axes, "precision-recall", "recall", "precision")
        figure.suptitle(category)
        paths[category] = out_dir / f"{_file_safe(category)}_curves.png"
        figure.savefig(paths[category], dpi=100)
    return paths


def _level_sweeps(data: CategoryData) -> dict[str, ThresholdSweep]:
    sweeps = {"image": sweep_exact(torch.as_tensor(data.image_scores), torch.as_tensor(data.image_labels))}
    if data.anomaly_maps is not None and data.masks is not None:
        sweeps["pixel"] = sweep_exact(data.anomaly_maps, data.masks)
    return sweeps


def _thinned(x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
    if x.numel() > _MAX_PLOTTED_POINTS:
        keep = torch.linspace(0, x.numel() - 1, _MAX_PLOTTED_POINTS, device=x.device).round().long()
        x, y = x[keep], y[keep]
    return x.cpu().tolist(), y.cpu().tolist()


def _style(axes: Any, title: str, x_label: str, y_label: str) -> None:
    axes.set(title=title, xlabel=x_label, ylabel=y_label, xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right" if title == "ROC" else "lower left")


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _metric_names(results: Mapping[str, Any]) -> list[str]:
    if not isinstance(results, Mapping) or "per_category" not in results or "mean" not in results:
        raise DataError("results must be summarize() output: {'per_category': {...}, 'mean': {...}}")
    per_category_names = (name for values in results["per_category"].values() for name in values)
    return list(dict.fromkeys([*results["mean"], *per_category_names]))


def _rows_with_mean(results: Mapping[str, Any], marked: bool = True) -> list[tuple[str, Mapping[str, float]]]:
    """Category rows (an unseen one marked with * when ``marked``), the mean, then each group's mean."""
    unseen = set(results.get("unseen_categories", ()))
    rows = [(f"{c} *" if marked and c in unseen else c, v) for c, v in results["per_category"].items()]
    groups = [(f"{name} {MEAN_ROW}", values) for name, values in results.get("groups", {}).items()]
    return [*rows, (MEAN_ROW, results["mean"]), *groups]


def _percent_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    names = _metric_names(results)
    rows = [
        [category, *(_percent(values.get(name, math.nan)) for name in names)]
        for category, values in _rows_with_mean(results)
    ]
    return ["category", *names], rows


def _markdown_table(results: Mapping[str, Any]) -> str:
    header, rows = _percent_rows(results)
    for row in rows[len(results["per_category"]) :]:
        row[0] = f"**{row[0]}**"
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "Values in %.\n\n" + "\n".join(lines) + "\n"


def _percent(value: float) -> str:
    return _MISSING if math.isnan(value) else f"{100 * value:.2f}"


def _csv_cell(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


def _nan_to_none(values: Mapping[str, float]) -> dict[str, float | None]:
    return {name: None if math.isnan(value) else float(value) for name, value in values.items()}


def _none_to_nan(values: Mapping[str, float | None]) -> dict[str, float]:
    return {name: math.nan if value is None else float(value) for name, value in values.items()}
