"""Evaluate a checkpoint per category: `python -m onenip_pl.eval ckpt_path=PATH [experiment=NAME]`.

The checkpoint decides the network and its calibration. Of the ``model.*`` settings only those that
change how the test is scored apply (EVAL_SETTINGS); any other ``model.*`` override given on the command
line that differs from the checkpoint's value is refused, naming it, instead of being silently ignored.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from onenip_pl.calibration.rules import RULE_SETTINGS
from onenip_pl.config import config_dir
from onenip_pl.errors import ConfigError, run_or_exit
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.utils.instantiate import (
    build_trainer,
    instantiate,
    instantiate_loggers,
    instantiate_run_callbacks,
)
from onenip_pl.utils.run import expected_warnings_silenced, finish_loggers, log_from_rank_zero

log = logging.getLogger(__name__)

# how the test is scored: fusion mode, exact or binned metrics, and the threshold rule, which applies when
# a checkpoint without calibration is calibrated at its first test
EVAL_SETTINGS = ("fusion", "binned_metrics", *RULE_SETTINGS)


def command_line_model_keys() -> list[str]:
    """The ``model.*`` keys set on this command line (none outside a Hydra app)."""
    if not HydraConfig.initialized():
        return []
    keys = [override.split("=", 1)[0].lstrip("+~") for override in HydraConfig.get().overrides.task]
    return [key.removeprefix("model.") for key in keys if key.startswith("model.")]


def refuse_fixed_settings(cfg_model: DictConfig, module: OneNIPModule, requested: list[str]) -> None:
    """ConfigError for a requested ``model.*`` key that is not an evaluation setting and differs from the
    checkpoint's value (the network, its training, and the calibration come from the checkpoint)."""
    saved = {**module.hparams, **module.net_config}
    for key in requested:
        top = key.split(".", 1)[0]
        if top in EVAL_SETTINGS:
            continue
        value = OmegaConf.select(cfg_model, key)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if top not in saved or saved.get(key) != value:
            was = (
                f"the checkpoint has {key}={saved[key]!r}" if key in saved else "it is no evaluation setting"
            )
            raise ConfigError(
                f"model.{key}={value!r} cannot change at eval: {was}. Eval applies only "
                f"{', '.join('model.' + name for name in EVAL_SETTINGS)}; drop the override."
            )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test a checkpoint on the configured data; the TestReport callback writes the per-category report."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    settings = {name: cfg.model[name] for name in EVAL_SETTINGS if name in cfg.model}
    model = OneNIPModule.load(cfg.ckpt_path, **settings)
    refuse_fixed_settings(cfg.model, model, command_line_model_keys())
    if model.net.image_size != cfg.data.image_size:
        log.warning(
            "The checkpoint was trained at %d px; evaluating at %d px instead of data.image_size=%d",
            model.net.image_size,
            model.net.image_size,
            cfg.data.image_size,
        )
    datamodule = instantiate(cfg.data, image_size=model.net.image_size)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = build_trainer(cfg, instantiate_run_callbacks(cfg), loggers)
    with expected_warnings_silenced():
        trainer.test(model=model, datamodule=datamodule)
    finish_loggers(loggers)
    return model.test_results


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def main(cfg: DictConfig) -> None:
    log_from_rank_zero()
    run_or_exit(evaluate, cfg, log)


if __name__ == "__main__":
    main()
