"""What a onenip-pl checkpoint holds beside Lightning's own entries, and how older ones are read.

- ``state_dict``: ``net.*`` (the OneNIP weights and its ``fusion_scale`` buffer) and
  ``post_processor._extra_state`` (calibration: thresholds per category, pooled thresholds, the rule);
- ``net_config``: the keyword arguments that rebuild the plain OneNIP network;
- ``prompt_bank``: ``{category: {"images": uint8 K×3×S×S, "features": float32 K×C×h×w}}``;
- ``pose``: which categories turn their prompts to the query's pose, and why (onenip_pl.data.pose.PoseState;
  absent in checkpoints written before it: every category is then scored at a fixed pose);
- ``hyper_parameters``: the LightningModule's, in plain lists and dicts (so ``weights_only`` loading works).

Checkpoints of onenip-pl 0.1 (no ``format_version``) kept one pooled threshold as top-level buffers and
the optimiser settings among the hyper-parameters; :func:`upgrade_checkpoint` rewrites them in place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import Container, OmegaConf

from onenip_pl.calibration.rules import RULE_SETTINGS
from onenip_pl.errors import CheckpointError, ConfigError

FORMAT_VERSION = 2
NO_BACKBONE_WEIGHTS = {"pretrained": False, "backbone_weights": None}
# LightningModule arguments of format 1 that are not OneNIP's
_LEGACY_MODULE_KEYS = (
    "lr",
    "betas",
    "weight_decay",
    "lr_step_size",
    "lr_gamma",
    "dice_weight",
    "fusion",
    "threshold_quantile",
    "binned_metrics",
    "compile",
    "feature_cache",
    "feature_cache_dir",
)
_LEGACY_OPTIMISER_KEYS = ("lr", "betas", "weight_decay", "lr_step_size", "lr_gamma")
_LEGACY_THRESHOLDS = ("image_threshold", "pixel_threshold")


def plain_containers(values: Mapping[str, Any]) -> dict[str, Any]:
    """OmegaConf lists/dicts (and tuples) turned into builtin ones: loadable with ``weights_only=True``."""
    plain = {}
    for name, value in values.items():
        if isinstance(value, Container):
            value = OmegaConf.to_container(value, resolve=True)
        plain[name] = list(value) if isinstance(value, tuple) else value
    return plain


def require_onenip_checkpoint(checkpoint: Mapping[str, Any], path: object) -> None:
    missing = [key for key in ("state_dict", "hyper_parameters") if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} has no {' or '.join(missing)}: it is not a onenip-pl checkpoint. For the "
            "authors' files run `python -m onenip_pl.convert official_ckpt=PATH out=NEW.ckpt` first."
        )


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a format-1 checkpoint in place into the current format (a current one is left as it is)."""
    if checkpoint.get("format_version", 1) >= FORMAT_VERSION or "state_dict" not in checkpoint:
        return checkpoint
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    checkpoint.setdefault("net_config", {k: v for k, v in hparams.items() if k not in _LEGACY_MODULE_KEYS})
    checkpoint["hyper_parameters"] = {k: v for k, v in hparams.items() if k not in _LEGACY_OPTIMISER_KEYS}
    state = checkpoint["state_dict"]
    calibrated = bool(state.pop("fusion_calibrated", torch.tensor(False)))
    image, pixel = (float(state.pop(name, torch.tensor(math.nan))) for name in _LEGACY_THRESHOLDS)
    state["post_processor._extra_state"] = {
        "version": 1,
        "calibrated": calibrated and math.isfinite(image),
        "rule": "quantile",
        "quantile": {"image": float(hparams.get("threshold_quantile", 0.99)), "pixel": None},
        "pooled": {"image": image, "pixel": pixel},
        "per_category": {},
        "prompt_setting": checkpoint.pop("calibration_prompt", None),
    }
    checkpoint["format_version"] = FORMAT_VERSION
    return checkpoint


def load_state(module: torch.nn.Module, state_dict: Mapping[str, Any], path: object) -> None:
    """Strict ``module.load_state_dict``; a mismatch is a CheckpointError naming the file."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        summary = str(error).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit its own settings: {summary}") from error


def sub_state(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state_dict`` under ``prefix.``, with the prefix removed."""
    start = f"{prefix}."
    return {key[len(start) :]: value for key, value in state_dict.items() if key.startswith(start)}


def updated_checkpoint(
    checkpoint: Mapping[str, Any],
    post_processor: torch.nn.Module,
    fusion_scale: torch.Tensor,
    prompt_bank: Mapping[str, Any] | None = None,
    note: Mapping[str, Any] | None = None,
    pose: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A copy of ``checkpoint`` with a new calibration (post-processor state, fusion scale, its threshold
    rule among the hyper-parameters), optionally a new prompt bank and pose state, and ``note`` appended to
    its history."""
    updated = dict(checkpoint)
    state = dict(checkpoint["state_dict"])
    state["post_processor._extra_state"] = post_processor.get_extra_state()
    state["net.fusion_scale"] = fusion_scale.detach().cpu().clone()
    updated["state_dict"] = state
    updated["hyper_parameters"] = {
        **checkpoint["hyper_parameters"],
        **{name: getattr(post_processor, name) for name in RULE_SETTINGS},
    }
    if prompt_bank is not None:
        updated["prompt_bank"] = dict(prompt_bank)
    if pose is not None:
        updated["pose"] = dict(pose)
    updated["history"] = [*checkpoint.get("history", []), *([dict(note)] if note else [])]
    return updated


def module_checkpoint(module: Any) -> dict[str, Any]:
    """A checkpoint of a OneNIPModule as training writes one (its on_save_checkpoint adds the prompt bank,
    the network settings and plain containers, so that weights_only loading accepts it)."""
    import lightning

    checkpoint = {
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "state_dict": module.state_dict(),
        "hparams_name": "kwargs",
        "hyper_parameters": dict(module.hparams),
    }
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def new_checkpoint_path(source: str | os.PathLike, suffix: str, out: str | os.PathLike | None = None) -> Path:
    """``out``, or ``<source stem>_<suffix>.ckpt`` beside the source (``..._2``, ``..._3`` if taken): a
    changed checkpoint never replaces the one it came from."""
    if out is not None:
        return Path(out).expanduser()
    source = Path(source).expanduser()
    candidate, number = source.with_name(f"{source.stem}_{suffix}.ckpt"), 2
    while candidate.exists():
        candidate, number = source.with_name(f"{source.stem}_{suffix}_{number}.ckpt"), number + 1
    return candidate


def save_new_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically; never over an existing file (ConfigError names it)."""
    path = Path(path).expanduser()
    if path.exists():
        raise ConfigError(f"out={path} exists; a new checkpoint never overwrites a file: choose another out=")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(checkpoint), temporary)
    os.replace(temporary, path)
    return path
