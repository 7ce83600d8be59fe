"""Convert an authors' checkpoint: `python -m onenip_pl.convert official_ckpt=PATH image_size=224 out=PATH`.

The authors' file is read with torch.load(weights_only=True) (a file needing arbitrary unpickling is refused)
and mapped key by key (onenip_pl.models.official); unknown, missing or mis-shaped keys stop the conversion.
The result is a Lightning checkpoint of OneNIPModule that `onenip_pl.eval` loads like a trained one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from onenip_pl.checkpoint_file import file_sha256, read_checkpoint, state_dict_of
from onenip_pl.checkpoint_format import module_checkpoint
from onenip_pl.config import config_dir
from onenip_pl.data.datasets import normal_train_index
from onenip_pl.data.image_io import load_image
from onenip_pl.data.prompts import PromptBank
from onenip_pl.data.readers import read_dataset
from onenip_pl.errors import CheckpointError, ConfigError, run_or_exit
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.models.backbone import OFFICIAL_BACKBONE
from onenip_pl.models.official import load_official_state_dict

log = logging.getLogger(__name__)


def _prompt_images(root: str, dataset: str, image_size: int, per_category: int) -> dict[str, torch.Tensor]:
    """The first `per_category` normal training images of each category of a data set (K×3×S×S uint8)."""
    if per_category < 1:
        raise ConfigError(f"prompts_per_category={per_category} must be at least 1.")
    records = read_dataset(dataset, root)
    pool = normal_train_index(records)
    return {
        category: torch.stack(
            [
                torch.from_numpy(load_image(records[i].path, image_size)).permute(2, 0, 1)
                for i in indices[:per_category]
            ]
        )
        for category, indices in sorted(pool.items())
    }


def convert_checkpoint(
    official_ckpt: str | os.PathLike,
    out: str | os.PathLike,
    image_size: int = 224,
    fusion: str = "official",
    prompt_root: str | None = None,
    prompt_dataset: str = "mvtec",
    prompts_per_category: int = 1,
) -> Path:
    """Write `out`: OneNIPModule hyper-parameters (authors' B4, its padding quirk) and the mapped weights."""
    source = Path(official_ckpt).expanduser()
    checkpoint = read_checkpoint(source)
    module = OneNIPModule(
        fusion=fusion,
        backbone=OFFICIAL_BACKBONE,
        image_size=image_size,
        pretrained=False,
        official_padding=True,
    )
    try:
        load_official_state_dict(module.net, state_dict_of(checkpoint))
    except CheckpointError as error:
        raise CheckpointError(
            f"{source}: {error} If only pos_embed differs in shape, image_size={image_size} is not the size "
            "this checkpoint was trained at (the authors released 224, 256 and 320 px)."
        ) from error
    if prompt_root is not None:
        images = _prompt_images(prompt_root, prompt_dataset, image_size, prompts_per_category)
        module.prompt_bank = PromptBank.from_images(module.net.extract_features, images, "cpu")
    destination = Path(out).expanduser()
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_lightning_checkpoint(module, source), destination)
    log.info("Wrote %s (from %s, %d px, fusion=%s)", destination, source, image_size, fusion)
    return destination


def _lightning_checkpoint(module: OneNIPModule, source: Path) -> dict[str, Any]:
    """A Lightning checkpoint of the module, written as training writes one, that names its source."""
    source_identity = {"path": str(source), "sha256": file_sha256(source)}
    return {**module_checkpoint(module), "converted_from": source_identity}


def convert(cfg: DictConfig) -> Path:
    """The CLI's work: convert `cfg.official_ckpt` into `cfg.out` and say how to evaluate it."""
    out = convert_checkpoint(
        cfg.official_ckpt,
        cfg.out,
        int(cfg.image_size),
        cfg.fusion,
        cfg.prompt_root,
        cfg.prompt_dataset,
        int(cfg.prompts_per_category),
    )
    log.info(
        "Evaluate it: python -m onenip_pl.eval ckpt_path=%s experiment=mvtec data.root=/path/to/mvtec", out
    )
    return out


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="convert")
def main(cfg: DictConfig) -> None:
    run_or_exit(convert, cfg, log)


if __name__ == "__main__":
    main()
