"""Enroll a new product without retraining: `python -m onenip_pl.enroll ckpt_path=PATH category=NAME
normal_images=DIR [prompts=K | prompt=FILE] [overwrite=true]`.

The product's most typical normal images become its prompts, the others fix its thresholds (see
onenip_pl.inference.enrollment). The result is a new checkpoint beside the old one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from onenip_pl.checkpoint_file import read_checkpoint
from onenip_pl.checkpoint_format import (
    new_checkpoint_path,
    save_new_checkpoint,
    updated_checkpoint,
    upgrade_checkpoint,
)
from onenip_pl.config import config_dir
from onenip_pl.data.image_io import read_rgb
from onenip_pl.data.readers._tree import TreeScan, list_images
from onenip_pl.errors import ConfigError, run_or_exit
from onenip_pl.inference import OneNIPDetector

log = logging.getLogger(__name__)


def normal_image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (sorted); other files and sub-folders are passed over and listed."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"normal_images={folder} is not a folder; give the folder of the product's normal images"
        )
    scan = TreeScan()
    files = list_images(folder, scan)
    scan.finish([], f"normal_images={folder}")
    if not files:
        raise ConfigError(f"normal_images={folder} holds no image file (png, jpg, jpeg, bmp, tif, tiff)")
    return files


def enroll(cfg: DictConfig) -> Path:
    source = Path(cfg.ckpt_path).expanduser()
    detector = OneNIPDetector.from_checkpoint(source, device=cfg.device)
    files = normal_image_files(cfg.normal_images)
    prompt_index = None
    if cfg.prompt is not None:
        names = [path.name for path in files]
        if Path(cfg.prompt).name not in names:
            raise ConfigError(f"prompt={cfg.prompt} is not an image of normal_images={cfg.normal_images}")
        prompt_index = names.index(Path(cfg.prompt).name)
    per_category = [len(detector.bank.rows_of(c)) for c in detector.categories]
    prompts = int(cfg.prompts) if cfg.prompts is not None else max(per_category, default=1)
    rgbs = [read_rgb(path) for path in files]
    done = detector.enroll(str(cfg.category), rgbs, prompts, prompt_index, bool(cfg.overwrite))
    note = {"enrolled": done.category, "normal_images": str(cfg.normal_images), "images": len(files)}
    checkpoint = updated_checkpoint(
        upgrade_checkpoint(read_checkpoint(source)),
        detector.post_processor,
        detector.net.fusion_scale,
        prompt_bank=detector.bank.to_state(),
        note=note,
        pose=detector.pose.to_state(),
    )
    out = save_new_checkpoint(checkpoint, new_checkpoint_path(source, "enrolled", cfg.out))
    log.info(
        "Enrolled %s: prompt(s) %s; thresholds from %d spare image(s) (%s): image %.4g, pixel %.4g",
        done.category,
        ", ".join(files[i].name for i in done.prompts),
        done.spare_images,
        done.source,
        done.image_threshold,
        done.pixel_threshold,
    )
    log.info("Wrote %s; %s is unchanged", out, source)
    return out


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="enroll")
def main(cfg: DictConfig) -> None:
    run_or_exit(enroll, cfg, log)


if __name__ == "__main__":
    main()
