"""Build callbacks and loggers from their config groups (one entry per key)."""

from __future__ import annotations

import logging

import hydra
from hydra.errors import InstantiationException
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from onenip_pl.errors import OneNIPError
from onenip_pl.lightning.checkpoint_io import SafeCheckpointIO
from onenip_pl.utils.wandb_setup import prepare_wandb_config

log = logging.getLogger(__name__)


def instantiate(conf: DictConfig, **kwargs):
    """hydra.utils.instantiate, but a OneNIPError raised by the target surfaces as itself.

    Hydra wraps every exception of a constructor in InstantiationException;
    a bad setting should reach the user as the package's own clear message.
    """
    try:
        return hydra.utils.instantiate(conf, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, OneNIPError):
            raise err.__cause__ from None
        raise


def _entries(group: DictConfig | None) -> list[tuple[str, DictConfig]]:
    if not group:
        return []
    return [
        (name, conf) for name, conf in group.items() if isinstance(conf, DictConfig) and "_target_" in conf
    ]


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    callbacks = []
    for name, conf in _entries(callbacks_cfg):
        log.info("Instantiating callback %s <%s>", name, conf._target_)
        callbacks.append(instantiate(conf))
    return callbacks


def instantiate_run_callbacks(cfg: DictConfig) -> list[Callback]:
    """The ``callbacks`` group's callbacks and the ``progress`` reporter (none when progress=none)."""
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    progress = cfg.get("progress")
    if progress and "_target_" in progress:
        callbacks.append(instantiate(progress))
    return callbacks


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> Trainer:
    """The run's Trainer: checkpoints read through the package's safe reader, and a progress bar only
    when the progress group gives one (Lightning would add its own otherwise)."""
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[SafeCheckpointIO()],
        enable_progress_bar=any(isinstance(callback, ProgressBar) for callback in callbacks),
    )


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    loggers = []
    for name, conf in _entries(logger_cfg):
        if conf._target_.endswith("WandbLogger"):
            conf = prepare_wandb_config(conf)
        log.info("Instantiating logger %s <%s>", name, conf._target_)
        loggers.append(instantiate(conf))
    return loggers
