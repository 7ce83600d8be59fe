"""Train OneNIP and test the final weights: `python -m onenip_pl.train [experiment=NAME] [key=value ...]`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from onenip_pl.config import config_dir
from onenip_pl.errors import ConfigError, run_or_exit
from onenip_pl.utils.instantiate import (
    build_trainer,
    instantiate,
    instantiate_loggers,
    instantiate_run_callbacks,
)
from onenip_pl.utils.run import expected_warnings_silenced, finish_loggers, log_from_rank_zero
from onenip_pl.utils.sweep import in_multirun_job, make_ddp_ranks_rerun_this_job, write_job_metrics

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, search_other_runs: bool = True) -> str | None:
    """'last' resumes from the newest checkpoint (last.ckpt or a step checkpoint) of this run's
    directory or, with `search_other_runs`, of the task's other runs (`runs/*/`), so that re-running
    the same command resumes. Other values pass through."""
    if ckpt_path != "last":
        return ckpt_path
    candidates = [p for p in output_dir.glob("checkpoints/*.ckpt") if p.is_file()]
    if not candidates and search_other_runs:
        candidates = [p for p in output_dir.parent.glob("*/checkpoints/*.ckpt") if p.is_file()]
    if not candidates:
        where = f"{output_dir.parent}/*/checkpoints" if search_other_runs else f"{output_dir}/checkpoints"
        raise ConfigError(f"ckpt_path=last: no checkpoint found under {where}; pass ckpt_path=PATH instead")
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("Resuming from %s", newest)
    return str(newest)


def global_batch_size(per_device: int, trainer: L.Trainer) -> int:
    """Images per optimiser step over all devices and nodes, gradient accumulation included."""
    return per_device * trainer.num_devices * trainer.num_nodes * trainer.accumulate_grad_batches


def train(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate data, model, callbacks, loggers and trainer from `cfg`; fit, then test."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model = instantiate(cfg.model)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = build_trainer(cfg, instantiate_run_callbacks(cfg), loggers)

    batch = {
        "per_device_batch_size": cfg.data.batch_size,
        "global_batch_size": global_batch_size(cfg.data.batch_size, trainer),
        "world_size": trainer.world_size,
    }
    log.info("Batch: %(per_device_batch_size)d per device, %(global_batch_size)d per step", batch)
    for logger in loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **batch})

    output_dir = Path(cfg.paths.output_dir)
    if trainer.world_size > 1:
        make_ddp_ranks_rerun_this_job()
    if cfg.get("train"):
        log.info("Starting training")
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, not in_multirun_job())
        with expected_warnings_silenced():
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test"):
        log.info("Testing the final weights (no checkpoint selection on the test set)")
        with expected_warnings_silenced():
            trainer.test(model=model, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    if trainer.is_global_zero:
        write_job_metrics(metrics, output_dir)
    finish_loggers(loggers)
    return metrics


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    log_from_rank_zero()

    def job(config: DictConfig) -> float | None:
        return optimized_value(train(config), config.get("optimized_metric"))

    return run_or_exit(job, cfg, log)


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The metric a sweeper (Optuna) optimises; a clear error when the run never logged it."""
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name} was not logged by this run (logged: {', '.join(sorted(metrics))}); "
            "validation metrics need data.val_fraction > 0"
        )
    return metrics[name]


if __name__ == "__main__":
    main()
