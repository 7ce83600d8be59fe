"""Recalibrate a checkpoint on normal images, no training: `python -m onenip_pl.calibrate ckpt_path=PATH
data.root=DIR [data.categories=[...]]`.

For when the camera, the light or the product batch changes: the per-category thresholds (and, for a
checkpoint that has none, such as a converted authors' one, the fusion scale) are fixed again on the
normal images under ``data.root``, each prompted by the others as at test time, with the rule of
``model.threshold_rule``. The result is a new checkpoint beside the old one; the old one is never
touched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from onenip_pl.calibration.rules import RULE_SETTINGS
from onenip_pl.checkpoint_file import read_checkpoint
from onenip_pl.checkpoint_format import (
    new_checkpoint_path,
    save_new_checkpoint,
    updated_checkpoint,
    upgrade_checkpoint,
)
from onenip_pl.config import config_dir
from onenip_pl.errors import check_choice, run_or_exit
from onenip_pl.eval import command_line_model_keys, refuse_fixed_settings
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.utils.instantiate import instantiate
from onenip_pl.utils.run import log_from_rank_zero

log = logging.getLogger(__name__)

IMAGE_CHOICES = ("all", "held_out")


def calibrate(cfg: DictConfig) -> Path:
    """Calibrate ``cfg.ckpt_path`` on ``cfg.data``'s normal images and write the new checkpoint."""
    check_choice("images", cfg.images, IMAGE_CHOICES)
    L.seed_everything(cfg.seed, workers=True)
    source = Path(cfg.ckpt_path).expanduser()
    module = OneNIPModule.load(source, **{name: cfg.model[name] for name in RULE_SETTINGS})
    refuse_fixed_settings(cfg.model, module, command_line_model_keys())
    module.to(cfg.device)
    datamodule = instantiate(cfg.data, image_size=module.net.image_size)
    datamodule.setup()
    all_normals = cfg.images == "all"
    loader = datamodule.calibration_dataloader(module.post_processor.needs_anomalies, all_normals)
    sources = (
        {c: "calibrate" for c in datamodule.category_names} if all_normals else datamodule.calibration_sources
    )
    refit = not module.post_processor.calibrated if cfg.refit_scale is None else bool(cfg.refit_scale)
    scale = module.calibrate(loader, sources, fit_scale=refit)
    note = {"calibrated_on": str(cfg.data.root), "images": cfg.images, "fusion_scale_refit": refit}
    checkpoint = updated_checkpoint(
        upgrade_checkpoint(read_checkpoint(source)), module.post_processor, module.net.fusion_scale, note=note
    )
    out = save_new_checkpoint(checkpoint, new_checkpoint_path(source, "calibrated", cfg.out))
    for category in sorted(module.post_processor.per_category):
        log.info("  %s: %s", category, module.post_processor.describe_thresholds(category))
    log.info(
        "Wrote %s (fusion scale %.6g%s); %s is unchanged", out, scale, ", refit" if refit else "", source
    )
    return out


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="calibrate")
def main(cfg: DictConfig) -> None:
    log_from_rank_zero()
    run_or_exit(calibrate, cfg, log)


if __name__ == "__main__":
    main()
