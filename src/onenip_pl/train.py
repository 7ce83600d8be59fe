"""Train OneNIP and test the final weights: `python -m onenip_pl.train [experiment=NAME] [key=value ...]`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from onenip_pl.config import config_dir
from onenip_pl.errors import OneNIPError
from onenip_pl.utils.instantiate import instantiate, instantiate_callbacks, instantiate_loggers
from onenip_pl.utils.run import finish_loggers, report_results
from onenip_pl.utils.sweep import write_job_metrics

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """'last' resumes from the newest last.ckpt of this task's runs; other values pass through."""
    if ckpt_path != "last":
        return ckpt_path
    candidates = sorted(output_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise OneNIPError(f"ckpt_path=last: no last.ckpt found under {output_dir.parent}/*/checkpoints")
    return str(candidates[-1])


def train(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate data, model, callbacks, loggers and trainer from `cfg`; fit, then test."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model = instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("train"):
        log.info("Starting training")
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test"):
        log.info("Testing the final weights (no checkpoint selection on the test set)")
        trainer.test(model=model, datamodule=datamodule)
        if model.test_results is not None:
            report_results(model.test_results, output_dir, loggers)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    if trainer.is_global_zero:
        write_job_metrics(metrics, output_dir)
    finish_loggers(loggers)
    return metrics


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except OneNIPError as err:
        log.error("%s", err)
        sys.exit(1)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
