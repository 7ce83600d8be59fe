"""What train and eval share: seeding, printing and saving the per-category results."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from onenip_pl.metrics.reports import format_table, write_reports

log = logging.getLogger(__name__)

REPORT_DEFAULTS = {"images_per_category": 4, "curves": True}


def report_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``report`` block of a run config (visual grids and ROC/PR curves), with defaults filled in."""
    settings = dict(REPORT_DEFAULTS)
    settings.update(cfg.get("report") or {})
    return {name: settings[name] for name in REPORT_DEFAULTS}


@rank_zero_only
def report_results(
    results: dict[str, Any],
    output_dir: str | Path,
    loggers: list[Logger],
    files: Mapping[str, Mapping[str, Path]] | None = None,
) -> None:
    """Print the per-category table, write metrics.json/csv/md and log the table to W&B, with the
    visual report's PNG files (``{"visuals": {category: path}, "curves": {...}}``) as W&B images."""
    print(format_table(results), flush=True)
    paths = write_reports(results, Path(output_dir))
    log.info("Metrics written to %s", ", ".join(str(p) for p in paths.values()))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            metric_names = list(results["mean"].keys())
            rows = [
                [cat, *[values.get(m) for m in metric_names]]
                for cat, values in results["per_category"].items()
            ]
            rows.append(["mean", *[results["mean"].get(m) for m in metric_names]])
            logger.log_table("test/per_category", columns=["category", *metric_names], data=rows)
            for kind, pictures in (files or {}).items():
                if pictures:
                    images = [str(path) for path in pictures.values()]
                    logger.log_image(f"test/{kind}", images, caption=list(pictures))
    for kind, pictures in (files or {}).items():
        if pictures:
            log.info("Test %s written to %s", kind, Path(next(iter(pictures.values()))).parent)


@rank_zero_only
def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs (each sweep job is its own run) and say where an offline run lies."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run_dir = Path(logger.experiment.dir).parent
        offline = logger._offline
        logger.experiment.finish()
        if offline:
            log.info("W&B offline run saved in %s; upload it with `wandb sync %s`", run_dir, run_dir)
