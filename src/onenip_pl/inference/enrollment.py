"""Adding a product to a trained model from a few normal images, without retraining.

OneNIP's premise is that one normal image tells the model what normal looks like. Enrolling a product
puts its most typical normal images into the prompt bank (what ``predict`` compares with, and what
retrieval recognises the product by), and fixes its thresholds on the remaining normal images scored
against those prompts, by the checkpoint's own rule (for the F1 rule, with synthetic anomalies of them,
made as training makes them). The fusion scale is the model's and stays as it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from onenip_pl.calibration import MapBatches
from onenip_pl.data.image_io import resize_rgb, to_tensor
from onenip_pl.data.pose import align_prompts
from onenip_pl.data.prompts import representative_rows
from onenip_pl.data.synthesis import AnomalySynthesizer
from onenip_pl.errors import ConfigError

log = logging.getLogger(__name__)

ENROLLED = "enrolled"
POOLED_STAND_IN = "pooled (no spare normal image)"
FEW_SPARE_IMAGES = 3


@dataclass
class Enrollment:
    """What enrolling a product did: the prompts chosen (positions in the given images), how many spare
    images fixed its thresholds, the thresholds and where they come from."""

    category: str
    prompts: list[int]
    spare_images: int
    image_threshold: float
    pixel_threshold: float
    source: str
    resized_from: list[tuple[int, int]] = field(default_factory=list)


def enroll_product(
    detector,
    category: str,
    rgbs: list[np.ndarray],
    prompts: int = 1,
    prompt_index: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> Enrollment:
    """Enroll ``category`` into ``detector`` (its bank and post-processor, in place) from normal RGB
    images; ``prompts`` typical ones become its prompts, or the one at ``prompt_index``."""
    if not category or not str(category).strip():
        raise ConfigError("category= must name the new product")
    if category in detector.categories and not overwrite:
        raise ConfigError(
            f"category={category!r} is already in the checkpoint ({', '.join(detector.categories)}); pass "
            "overwrite=true to replace its prompts and thresholds, or choose another name"
        )
    if not rgbs:
        raise ConfigError(f"no normal image to enroll {category!r} with")
    if prompts < 1:
        raise ConfigError(f"prompts={prompts} must be at least 1")
    size = detector.image_size
    resized_from = sorted({rgb.shape[:2] for rgb in rgbs if rgb.shape[:2] != (size, size)})
    if resized_from:
        log.info(
            "Images of %s resized to the model's %dx%d (bilinear): %s", category, size, size, resized_from
        )
    images = [resize_rgb(rgb, size) for rgb in rgbs]
    features = detector.encode(images)
    if prompt_index is not None:
        if not 0 <= prompt_index < len(images):
            raise ConfigError(f"prompt index {prompt_index} is not among the {len(images)} images")
        chosen = [prompt_index]
    else:
        chosen = representative_rows(features, prompts)
    prompt_images = torch.stack([torch.from_numpy(images[i]).permute(2, 0, 1) for i in chosen])
    detector.bank.add(category, prompt_images, features[chosen])
    # whether its prompts turn to the query's pose, by the checkpoint's data.pose setting
    detector.forget_posed(category)
    log.info("Pose of %s: %s", category, detector.pose.decide(category, images, seed).reason)
    spare = [i for i in range(len(images)) if i not in chosen]
    post = detector.post_processor
    if spare:
        maps = _spare_maps(detector, category, [images[i] for i in spare], features[spare], seed)
        post.calibrate(
            detector.net, maps, sources={category: ENROLLED}, fit_scale=False, categories_only=True
        )
        if len(spare) < FEW_SPARE_IMAGES:
            log.warning(
                "The thresholds of %s rest on %d spare normal image(s): give more normal images (or run "
                "python -m onenip_pl.calibrate on them later) for decisions you can trust.",
                category,
                len(spare),
            )
    else:
        image, pixel = post.thresholds(None)
        post.per_category[category] = {"image": image, "pixel": pixel, "source": POOLED_STAND_IN}
        log.warning(
            "No normal image of %s was left after its prompt: its decisions use the pooled thresholds of the "
            "other products (image %.4g, pixel %.4g) until it is calibrated on more normal images.",
            category,
            image,
            pixel,
        )
    image, pixel = post.thresholds(category)
    source = post.per_category[category]["source"]
    return Enrollment(category, chosen, len(spare), image, pixel, source, [tuple(s) for s in resized_from])


def _spare_maps(detector, category: str, images: list[np.ndarray], features, seed: int) -> MapBatches:
    """The spare images' maps against the new prompts (and, for the F1 rule, their synthetic anomalies')."""
    posed = detector.posed_prompt_features(category)
    maps = MapBatches()

    def add(query_features, label: int, masks) -> None:
        prompts, _ = align_prompts(query_features, posed)
        rec_map, refiner_map = detector.net.prompted_maps(query_features, prompts)
        labels = torch.full((len(images),), label, dtype=torch.long)
        maps.add(rec_map, refiner_map, {"category": [category] * len(images), "label": labels, "mask": masks})

    with torch.inference_mode():
        add(features, 0, torch.zeros(len(images), 1, detector.image_size, detector.image_size))
        if detector.post_processor.needs_anomalies:
            synthesizer = AnomalySynthesizer(detector.image_size)
            made = [synthesizer(image, np.random.default_rng([seed, i])) for i, image in enumerate(images)]
            batch = torch.stack([to_tensor(image) for image, _ in made]).to(detector.device)
            masks = torch.stack(
                [torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None] for _, m in made]
            )
            add(detector.net.extract_features(batch), 1, masks)
    return maps


__all__ = ["ENROLLED", "POOLED_STAND_IN", "Enrollment", "enroll_product"]
