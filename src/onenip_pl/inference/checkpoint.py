"""Read a training or converted checkpoint for inference, never running code from the file.

Checkpoints are pickles. They are read with torch.load(weights_only=True); checkpoints written before
hyper-parameters were saved as plain containers hold OmegaConf lists, and only those OmegaConf classes are
additionally allowed (they carry values, not code).
"""

from __future__ import annotations

import collections
import os
import pickle
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

from onenip_pl.errors import CheckpointError
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.models.official import load_checkpoint_safely

_OMEGACONF_GLOBALS = [
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    AnyNode,
    BooleanNode,
    FloatNode,
    IntegerNode,
    StringNode,
    typing.Any,
    collections.defaultdict,
    dict,
    list,
    int,
]
# the weights come from the checkpoint: never download or read backbone weights when rebuilding
_NO_BACKBONE_WEIGHTS = {"pretrained": False, "backbone_weights": None}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, loaded without arbitrary unpickling (CheckpointError says why if refused)."""
    path = Path(path).expanduser()
    try:
        return load_checkpoint_safely(path)
    except CheckpointError as error:
        if not isinstance(error.__cause__, pickle.UnpicklingError):
            raise
    with torch.serialization.safe_globals(_OMEGACONF_GLOBALS):
        return load_checkpoint_safely(path)


@dataclass
class LoadedCheckpoint:
    """The rebuilt module and the checkpoint's prompt bank ({category: {"images", "features"}})."""

    module: OneNIPModule
    prompt_bank: dict[str, dict[str, torch.Tensor]]
    path: Path


def load_for_inference(path: str | os.PathLike) -> LoadedCheckpoint:
    """Rebuild OneNIPModule from its saved hyper-parameters and load every tensor (strictly), in eval mode."""
    checkpoint = read_checkpoint(path)
    missing = [key for key in ("state_dict", "hyper_parameters") if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {' or '.join(missing)}: it is not a onenip-pl checkpoint. For the "
            "authors' files run `python -m onenip_pl.convert official_ckpt=PATH out=NEW.ckpt` first."
        )
    module = OneNIPModule(**{**checkpoint["hyper_parameters"], **_NO_BACKBONE_WEIGHTS})
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit its own hyper-parameters: {error}") from error
    bank = checkpoint.get("prompt_bank") or {}
    return LoadedCheckpoint(module.eval(), dict(bank), Path(path))
