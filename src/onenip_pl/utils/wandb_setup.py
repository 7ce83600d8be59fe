"""Make W&B safe on any machine: online with credentials, offline (never a prompt) without."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

_QUIET_MODES = ("offline", "dryrun", "disabled")


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (where `wandb login` puts it).

    Looked up without calling W&B: its API client prompts or raises when no key exists.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def sweep_identity() -> tuple[str, str] | None:
    """(group, run name) for a job of a Hydra multirun: one W&B group per sweep, one run per job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    group = f"{hydra_cfg.job.name}-{Path(hydra_cfg.sweep.dir).name}"
    name = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
    return group, f"{hydra_cfg.job.num}:{name}"


def prepare_wandb_config(conf: DictConfig) -> DictConfig:
    """Switch the WandbLogger config to offline when W&B could otherwise prompt or fail,
    and name sweep jobs after their sweep."""
    os.environ.setdefault("WANDB_SILENT", "true")
    mode = os.environ.get("WANDB_MODE", "").lower()
    offline = conf.get("offline", False) or mode in _QUIET_MODES or not wandb_has_credentials()
    if offline and not conf.get("offline", False):
        log.warning(
            "W&B: no credentials found (WANDB_API_KEY or `wandb login`): logging OFFLINE under %s. "
            "Upload later with `wandb sync %s/wandb/offline-run-*`.",
            conf.get("save_dir"),
            conf.get("save_dir"),
        )
    conf = conf.copy()
    identity = sweep_identity()
    with open_dict(conf):
        conf.offline = bool(offline)
        if identity is not None:
            conf.group = conf.get("group") or identity[0]
            conf.name = conf.get("name") or identity[1]
    if offline:
        # W&B's own switch as well: wandb.init must not try to log in, whatever else is configured
        os.environ["WANDB_MODE"] = "offline" if mode not in _QUIET_MODES else mode
        Path(conf.save_dir).mkdir(parents=True, exist_ok=True)
    return conf
