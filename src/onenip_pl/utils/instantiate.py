"""Build callbacks and loggers from their config groups (one entry per key)."""

from __future__ import annotations

import logging

import hydra
from hydra.errors import InstantiationException
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from onenip_pl.errors import OneNIPError
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


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    loggers = []
    for name, conf in _entries(logger_cfg):
        if conf._target_.endswith("WandbLogger"):
            conf = prepare_wandb_config(conf)
        log.info("Instantiating logger %s <%s>", name, conf._target_)
        loggers.append(instantiate(conf))
    return loggers
