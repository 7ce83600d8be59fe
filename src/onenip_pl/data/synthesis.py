"""Synthetic anomalies for training (spec §8): CutPaste and DRAEM-style Perlin + texture.

OneNIP never sees a real defect while training; the refiner learns from these
synthetic ones instead. Each call picks one of two recipes (50/50 by default):

* CutPaste: a patch of the image itself, colour-jittered, pasted elsewhere.
  Half the time a large patch (2-15 % of the image area), half the time a thin
  rotated "scar" (2-16 x 10-25 px, the authors' absolute sizes).
* Perlin + texture: a thresholded, slightly rotated Perlin noise field is the
  mask; a texture (DTD by default), altered by 3 random photometric
  albumentations ops, is blended into it with a random opacity.

Randomness comes only from the ``numpy.random.Generator`` passed to each call
(albumentations ops are re-seeded from it), so a data-loader worker that owns
its generator produces reproducible samples and no global RNG is touched.
Objects are picklable; re-seeding the shared ops makes one instance unsafe to
use from several threads at once (worker processes are fine).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import albumentations as A
import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from onenip_pl.data.perlin import perlin_noise, value_noise
from onenip_pl.errors import ConfigError, DataError

TEXTURE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Spec §8 constants (sizes in px are the authors' absolute values).
PATCH_AREA_RANGE = (0.02, 0.15)
PATCH_ASPECT_RANGES = ((0.3, 1.0), (1.0, 3.3))
SCAR_WIDTH_RANGE = (2, 16)
SCAR_LENGTH_RANGE = (10, 25)
SCAR_MAX_ROTATION_DEG = 45.0
PERLIN_EXPONENT_RANGE = (1, 5)
PERLIN_MAX_ROTATION_DEG = 5.0
PERLIN_THRESHOLD = 0.5
TEXTURE_OPS_PER_SAMPLE = 3
MIN_IMAGE_SIZE = 64
_MAX_MASK_ATTEMPTS = 100
_SEED_BOUND = 2**31 - 1


def find_textures(texture_dir: str | Path) -> list[Path]:
    """All texture images of a DTD-style folder, sorted.

    Accepts the DTD root (``<dir>/images/<class>/*.jpg``) or its ``images``
    folder itself. Raises DataError when nothing is found, since training
    would otherwise silently fall back to another texture source.
    """
    root = Path(texture_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"texture directory {root} does not exist; set it to the DTD root (holding images/)")
    images_dir = root / "images" if (root / "images").is_dir() else root
    paths = sorted(
        path
        for path in images_dir.glob("*/*")
        if path.is_file() and path.suffix.lower() in TEXTURE_EXTENSIONS
    )
    if not paths:
        raise DataError(
            f"no texture images found in {root}: expected the DTD layout {root}/images/<class>/*.jpg "
            "(or <class>/*.jpg directly). Download DTD or leave the texture directory unset."
        )
    return paths


def describe_texture_source(
    texture_paths: Sequence[Path] | None,
    fallback_textures: Sequence[np.ndarray] | None = None,
    texture_dir: str | Path | None = None,
) -> str:
    """One log line naming where the Perlin branch takes its textures from (synthesizer priority)."""
    if texture_paths:
        folder = (
            texture_dir
            if texture_dir is not None
            else os.path.commonpath([str(p.parent) for p in texture_paths])
        )
        return f"{len(texture_paths)} texture images from {folder}"
    if fallback_textures:
        return f"no texture directory; {len(fallback_textures)} normal training images used as textures"
    return "no texture directory; procedural noise textures"


def _texture_ops() -> list[A.BasicTransform]:
    """The ten photometric ops of DRAEM's texture augmentation (each always applied when chosen)."""
    return [
        A.RandomGamma(gamma_limit=(50, 200), p=1.0),
        # alpha * img + beta with alpha in 0.8..1.2 and beta in -30..30 grey levels.
        A.RandomBrightnessContrast(brightness_limit=(-30 / 255, 30 / 255), contrast_limit=(-0.2, 0.2), p=1.0),
        A.Sharpen(alpha=(0.2, 0.8), lightness=(0.8, 1.2), p=1.0),
        A.HueSaturationValue(hue_shift_limit=(-50, 50), sat_shift_limit=(-50, 50), val_shift_limit=0, p=1.0),
        A.Solarize(threshold_range=(32 / 255, 128 / 255), p=1.0),
        A.Posterize(num_bits=(2, 6), p=1.0),
        A.HorizontalFlip(p=1.0),
        A.InvertImg(p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
    ]


def _apply_seeded(transform: A.BasicTransform, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Run one albumentations op with its private RNG seeded from ``rng``."""
    transform.set_random_seed(int(rng.integers(_SEED_BOUND)))
    return transform(image=image)["image"]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    shrinking = image.shape[0] > size or image.shape[1] > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def _rotate(array: np.ndarray, angle_deg: float, interpolation: int) -> np.ndarray:
    """Rotate about the centre, same size, mirrored borders (no empty corners)."""
    height, width = array.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle_deg, 1.0)
    return cv2.warpAffine(
        array, matrix, (width, height), flags=interpolation, borderMode=cv2.BORDER_REFLECT_101
    )


def procedural_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random coloured texture (clouds or warped stripes) for runs without DTD or fallback images."""
    octaves = [value_noise((size, size), (2 ** (k + 2),) * 2, 1, rng)[..., 0] * 0.5**k for k in range(4)]
    clouds = sum(octaves) / sum(0.5**k for k in range(4))
    if rng.random() < 0.5:
        field = clouds
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        angle = rng.uniform(0.0, math.pi)
        period = rng.uniform(6.0, 24.0)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period + 3.0 * clouds
        field = 0.5 + 0.5 * np.sin(2.0 * math.pi * phase)
    colours = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    texture = colours[0] + (colours[1] - colours[0]) * field[..., None]
    texture += 40.0 * (value_noise((size, size), (16, 16), 3, rng) - 0.5)
    return np.clip(texture, 0, 255).astype(np.uint8)


def blend_texture(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """``img·(1−m) + (1−β)·tex·m + β·img·m`` for a binary mask; pixels outside the mask are untouched."""
    out = image.copy()
    inside = mask.astype(bool)
    mixed = (1.0 - beta) * texture[inside].astype(np.float32) + beta * image[inside].astype(np.float32)
    out[inside] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


class SyntheticAnomaly(NamedTuple):
    """One synthetic sample; ``recipe`` is "cutpaste_patch", "cutpaste_scar" or "perlin_texture"."""

    image: np.ndarray
    mask: np.ndarray
    recipe: str


class AnomalySynthesizer:
    """Turns a normal S×S RGB image into (synthetic anomaly, binary mask).

    Args:
        image_size: S; inputs must already be S×S×3 uint8. At least 64 so the
            authors' absolute scar sizes fit.
        texture_paths: texture files (see :func:`find_textures`); None to use
            ``fallback_textures`` given per call, or procedural textures.
        cutpaste_prob: chance of the CutPaste recipe (else Perlin + texture).
        scar_prob: within CutPaste, chance of a thin scar (else a large patch).
        max_beta: β ~ U(0, max_beta) is the share of the original image kept
            inside the Perlin mask.
        texture_cache_size: decoded, resized texture files kept per process.
    """

    def __init__(
        self,
        image_size: int,
        texture_paths: Sequence[Path] | None = None,
        cutpaste_prob: float = 0.5,
        scar_prob: float = 0.5,
        max_beta: float = 0.8,
        texture_cache_size: int = 64,
    ) -> None:
        if image_size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"image_size={image_size}: anomaly synthesis needs at least {MIN_IMAGE_SIZE} px"
            )
        for name, value in (
            ("cutpaste_prob", cutpaste_prob),
            ("scar_prob", scar_prob),
            ("max_beta", max_beta),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} must lie in [0, 1]")
        if texture_paths is not None and len(texture_paths) == 0:
            raise DataError("texture_paths is empty; pass None to use fallback or procedural textures")
        self.image_size = image_size
        self.texture_paths = [Path(path) for path in texture_paths] if texture_paths is not None else None
        self.cutpaste_prob = cutpaste_prob
        self.scar_prob = scar_prob
        self.max_beta = max_beta
        self.texture_cache_size = texture_cache_size
        self._colour_jitter = A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=1.0)
        self._texture_ops = _texture_ops()
        self._texture_cache: OrderedDict[Path, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        """Leave the texture cache behind so pickles sent to workers stay small."""
        state = self.__dict__.copy()
        state["_texture_cache"] = OrderedDict()
        return state

    def describe_texture_source(self, fallback_textures: Sequence[np.ndarray] | None = None) -> str:
        """One log line naming the texture source the Perlin branch will use."""
        return describe_texture_source(self.texture_paths, fallback_textures)

    def __call__(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        fallback_textures: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (anomalous image S×S×3 uint8, mask S×S float32 in {0, 1}); the mask is never empty."""
        anomaly = self.synthesize(image, rng, fallback_textures)
        return anomaly.image, anomaly.mask

    def synthesize(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        fallback_textures: Sequence[np.ndarray] | None = None,
    ) -> SyntheticAnomaly:
        """Like calling the synthesizer, but also names the recipe that was drawn."""
        self._check_image(image)
        if rng.random() < self.cutpaste_prob:
            if rng.random() < self.scar_prob:
                return SyntheticAnomaly(*self.cutpaste_scar(image, rng), recipe="cutpaste_scar")
            return SyntheticAnomaly(*self.cutpaste_patch(image, rng), recipe="cutpaste_patch")
        return SyntheticAnomaly(*self.perlin_texture(image, rng, fallback_textures), recipe="perlin_texture")

    def _check_image(self, image: np.ndarray) -> None:
        expected = (self.image_size, self.image_size, 3)
        if image.dtype != np.uint8 or image.shape != expected:
            raise DataError(
                f"anomaly synthesis expects a {expected} uint8 image (resize first), "
                f"got shape {image.shape} dtype {image.dtype}"
            )

    # CutPaste -----------------------------------------------------------------------------------------

    def cutpaste_patch(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A rectangle of 2-15 % of the area, aspect in [0.3, 1] or [1, 3.3], jittered and moved."""
        self._check_image(image)
        size = self.image_size
        area = rng.uniform(*PATCH_AREA_RANGE) * size * size
        aspect = rng.uniform(*PATCH_ASPECT_RANGES[int(rng.integers(2))])
        width = int(np.clip(round(math.sqrt(area * aspect)), 1, size))
        height = int(np.clip(round(math.sqrt(area / aspect)), 1, size))
        src_y, src_x = (int(v) for v in rng.integers(0, [size - height + 1, size - width + 1]))
        dst_y, dst_x = (int(v) for v in rng.integers(0, [size - height + 1, size - width + 1]))
        patch = image[src_y : src_y + height, src_x : src_x + width]
        patch = _apply_seeded(self._colour_jitter, np.ascontiguousarray(patch), rng)
        out = image.copy()
        out[dst_y : dst_y + height, dst_x : dst_x + width] = patch
        mask = np.zeros((size, size), dtype=np.float32)
        mask[dst_y : dst_y + height, dst_x : dst_x + width] = 1.0
        return out, mask

    def cutpaste_scar(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A 2-16 px wide, 10-25 px long strip, jittered, rotated by ±45° and pasted elsewhere."""
        self._check_image(image)
        size = self.image_size
        width = int(rng.integers(SCAR_WIDTH_RANGE[0], SCAR_WIDTH_RANGE[1] + 1))
        length = int(rng.integers(SCAR_LENGTH_RANGE[0], SCAR_LENGTH_RANGE[1] + 1))
        src_y, src_x = (int(v) for v in rng.integers(0, [size - length + 1, size - width + 1]))
        strip = np.ascontiguousarray(image[src_y : src_y + length, src_x : src_x + width])
        strip = _apply_seeded(self._colour_jitter, strip, rng)
        angle = rng.uniform(-SCAR_MAX_ROTATION_DEG, SCAR_MAX_ROTATION_DEG)
        rotated, footprint = _rotate_expanded(strip, angle)
        box_h, box_w = footprint.shape
        dst_y, dst_x = (int(v) for v in rng.integers(0, [size - box_h + 1, size - box_w + 1]))
        out = image.copy()
        region = out[dst_y : dst_y + box_h, dst_x : dst_x + box_w]
        region[footprint] = rotated[footprint]
        mask = np.zeros((size, size), dtype=np.float32)
        mask[dst_y : dst_y + box_h, dst_x : dst_x + box_w] = footprint
        return out, mask

    # Perlin + texture ---------------------------------------------------------------------------------

    def perlin_mask(self, rng: np.random.Generator) -> np.ndarray:
        """Binary S×S mask: Perlin noise (2^k cells per axis, k in 1..5), rotated ±5°, > 0.5.

        The threshold leaves the mask empty for about 0.5 % of draws; those are
        redrawn (new scales, noise and angle) so every synthetic sample is a
        real anomaly.
        """
        size = self.image_size
        low, high = PERLIN_EXPONENT_RANGE
        for _ in range(_MAX_MASK_ATTEMPTS):
            exponent_y, exponent_x = (int(k) for k in rng.integers(low, high + 1, size=2))
            noise = perlin_noise((size, size), (2**exponent_y, 2**exponent_x), rng)
            noise = _rotate(
                noise, rng.uniform(-PERLIN_MAX_ROTATION_DEG, PERLIN_MAX_ROTATION_DEG), cv2.INTER_LINEAR
            )
            mask = noise > PERLIN_THRESHOLD
            if mask.any():
                return mask.astype(np.float32)
        raise RuntimeError(f"Perlin threshold gave an empty mask {_MAX_MASK_ATTEMPTS} times in a row")

    def perlin_texture(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        fallback_textures: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """DRAEM recipe: Perlin mask, augmented texture, ``out = img(1−m) + (1−β)tex·m + β·img·m``."""
        self._check_image(image)
        mask = self.perlin_mask(rng)
        texture = self._augment_texture(self._pick_texture(rng, fallback_textures), rng)
        beta = rng.uniform(0.0, self.max_beta)
        return blend_texture(image, texture, mask, beta), mask

    def _pick_texture(
        self, rng: np.random.Generator, fallback_textures: Sequence[np.ndarray] | None
    ) -> np.ndarray:
        """Texture file if configured, else a fallback image, else a procedural texture."""
        if self.texture_paths:
            return self._load_texture(self.texture_paths[int(rng.integers(len(self.texture_paths)))])
        if fallback_textures:
            chosen = fallback_textures[int(rng.integers(len(fallback_textures)))]
            if chosen.ndim != 3 or chosen.shape[2] != 3 or chosen.dtype != np.uint8:
                raise DataError(
                    f"fallback textures must be H×W×3 uint8 arrays, got {chosen.shape} {chosen.dtype}"
                )
            return _resize(chosen, self.image_size)
        return procedural_texture(self.image_size, rng)

    def _augment_texture(self, texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply 3 distinct ops, chosen and ordered at random, out of the ten DRAEM ops."""
        chosen = rng.choice(len(self._texture_ops), size=TEXTURE_OPS_PER_SAMPLE, replace=False)
        for index in chosen:
            texture = _apply_seeded(self._texture_ops[int(index)], texture, rng)
        return texture

    def _load_texture(self, path: Path) -> np.ndarray:
        """Decode (at reduced JPEG scale when possible) and resize to S×S, with a small LRU cache."""
        cached = self._texture_cache.get(path)
        if cached is not None:
            self._texture_cache.move_to_end(path)
            return cached
        size = self.image_size
        try:
            with Image.open(path) as handle:
                handle.draft("RGB", (size, size))
                texture = np.asarray(handle.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise DataError(f"cannot read texture image {path}: {err}; replace or remove the file") from err
        texture = _resize(texture, size)
        self._texture_cache[path] = texture
        if len(self._texture_cache) > self.texture_cache_size:
            self._texture_cache.popitem(last=False)
        return texture


def _rotate_expanded(strip: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a small patch onto a canvas that holds all of it; returns (pixels, bool footprint)."""
    height, width = strip.shape[:2]
    radians = math.radians(angle_deg)
    cos, sin = abs(math.cos(radians)), abs(math.sin(radians))
    box_w = max(1, math.ceil(width * cos + height * sin))
    box_h = max(1, math.ceil(width * sin + height * cos))
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle_deg, 1.0)
    matrix[0, 2] += box_w / 2.0 - width / 2.0
    matrix[1, 2] += box_h / 2.0 - height / 2.0
    rotated = cv2.warpAffine(
        strip, matrix, (box_w, box_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    ones = np.ones((height, width), dtype=np.uint8)
    footprint = cv2.warpAffine(ones, matrix, (box_w, box_h), flags=cv2.INTER_NEAREST, borderValue=0) > 0
    return rotated, footprint
