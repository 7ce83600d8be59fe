"""Hydra multirun support: a summary CSV of every sweep job, and DDP inside sweep jobs."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

JOB_METRICS_FILE = "job_metrics.json"
SUMMARY_FILE = "sweep_summary.csv"


def write_job_metrics(metrics: dict[str, float], output_dir: Path) -> Path:
    """Save a job's scalar metrics where the sweep summary will find them."""
    path = output_dir / JOB_METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return path


def _job_order(job_dir: Path) -> tuple[bool, int, str]:
    """Numbered job directories in numeric order (2 before 10), anything else after them."""
    numbered = job_dir.name.isdigit()
    return (not numbered, int(job_dir.name) if numbered else 0, job_dir.name)


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory: its overrides and the metrics it saved (blank if it failed)."""
    rows = []
    job_dirs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    for job_dir in sorted(job_dirs, key=_job_order):
        overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
        metrics_path = job_dir / JOB_METRICS_FILE
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        rows.append({"job": job_dir.name, "overrides": " ".join(overrides), **metrics})
    return rows


def write_sweep_summary(sweep_dir: Path) -> Path:
    """Write `sweep_summary.csv`; atomically, since parallel jobs (submitit) may write it at once."""
    rows = collect_sweep(sweep_dir)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    path = sweep_dir / SUMMARY_FILE
    partial = path.with_name(f".{SUMMARY_FILE}.{os.getpid()}")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)
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


def in_multirun_job() -> bool:
    """True inside a job started by `-m` / a sweeper, False in a single run or outside Hydra."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def make_ddp_ranks_rerun_this_job() -> None:
    """Let Lightning's DDP start ranks 1..N-1 of a sweep job as that one job, not as the sweep.

    Lightning starts the other ranks by re-running the command line with ``hydra.run.dir`` set
    to the job's run directory. In a sweep job the command line is the whole sweep (``-m`` and
    the value lists) and the run directory is not the job's, so each rank would start the sweep
    again. This swaps the command line for this job's own overrides in single-run mode and
    points ``hydra.run.dir`` at the job's output directory.
    """
    if not in_multirun_job():
        return
    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
