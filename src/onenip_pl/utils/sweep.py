"""Hydra callback that gathers every sweep job's metrics into one CSV in the multirun directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

JOB_METRICS_FILE = "job_metrics.json"


def write_job_metrics(metrics: dict[str, float], output_dir: Path) -> Path:
    """Save a job's scalar metrics where the sweep summary will find them."""
    path = output_dir / JOB_METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return path


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory: its overrides and the metrics it saved (blank if it failed)."""
    rows = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()):
        overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
        metrics_path = job_dir / JOB_METRICS_FILE
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        rows.append({"job": job_dir.name, "overrides": " ".join(overrides), **metrics})
    return rows


def write_sweep_summary(sweep_dir: Path) -> Path:
    rows = collect_sweep(sweep_dir)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    path = sweep_dir / "sweep_summary.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


class SweepSummary(Callback):
    """Writes `sweep_summary.csv` after each job, so a partial sweep is summarised too."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if (
            config.hydra.mode is not None
            and str(config.hydra.mode).endswith("MULTIRUN")
            and sweep_dir.is_dir()
        ):
            write_sweep_summary(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            write_sweep_summary(sweep_dir)
