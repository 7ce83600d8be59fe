"""Evaluate a checkpoint per category: `python -m onenip_pl.eval ckpt_path=PATH [experiment=NAME]`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from onenip_pl.config import config_dir
from onenip_pl.errors import ConfigError, run_or_exit
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.utils.instantiate import instantiate, instantiate_callbacks, instantiate_loggers
from onenip_pl.utils.run import finish_loggers, report_results, report_settings

log = logging.getLogger(__name__)


def load_module(ckpt_path: str | Path, **evaluation_settings: Any) -> OneNIPModule:
    """Rebuild the module from a checkpoint (its own hyper-parameters; no pretrained download).

    ``evaluation_settings`` override hyper-parameters that only change how the test is scored
    (``fusion``, ``binned_metrics``); the weights, fusion scale and thresholds come from the file.
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist; pass the .ckpt written by training or convert")
    return OneNIPModule.load_from_checkpoint(
        path, map_location="cpu", pretrained=False, weights_only=False, **evaluation_settings
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test a checkpoint on the configured data and write the per-category report."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    model = load_module(
        cfg.ckpt_path, fusion=cfg.model.fusion, binned_metrics=cfg.model.binned_metrics
    )
    if model.net.image_size != cfg.data.image_size:
        log.warning(
            "The checkpoint was trained at %d px; evaluating at %d px instead of data.image_size=%d",
            model.net.image_size,
            model.net.image_size,
            cfg.data.image_size,
        )
    datamodule = instantiate(cfg.data, image_size=model.net.image_size)
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    output_dir = Path(cfg.paths.output_dir)
    model.configure_reports(output_dir, **report_settings(cfg))
    trainer.test(model=model, datamodule=datamodule)
    report_results(model.test_results, output_dir, loggers, model.report_files)
    finish_loggers(loggers)
    return model.test_results


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def main(cfg: DictConfig) -> None:
    run_or_exit(evaluate, cfg, log)


if __name__ == "__main__":
    main()
