"""Decode images and masks the same way everywhere (gray, RGBA, palette, 16 bit)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from onenip_pl.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as err:
        raise DataError(f"image file not found: {path}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"cannot read image {path}: {err}. The file is corrupt, truncated or not an image; "
            "replace or remove it."
        ) from err
    return image


def scale_to_uint8(array: np.ndarray, name: str = "image") -> np.ndarray:
    """uint8 as is; integers on a 16-bit scale if any value exceeds 255; floats in [0, 1] or [0, 255].

    The one conversion used for files (16-bit PNG/TIFF) and for arrays handed to the detector.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{name} holds NaN or infinite values; pass finite pixel values.")
        top = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
    else:
        raise DataError(f"{name} has dtype {array.dtype}; pass uint8, uint16 or float pixels.")
    return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read any supported image as an H×W×3 uint8 RGB array.

    Grayscale is replicated to three channels, alpha is dropped, palettes are
    expanded, and 16-bit or float images are scaled to 8 bit.
    """
    path = Path(path)
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = scale_to_uint8(np.asarray(image), str(path))
        return np.repeat(gray[..., None], 3, axis=2)
    array = np.asarray(image.convert("RGB"))
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"cannot convert image {path} (mode {image.mode}) to RGB")
    return np.ascontiguousarray(array)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as an H×W bool array: anomalous where the value is > 0."""
    path = Path(path)
    image = _open(path)
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.max(axis=2)
    return array > 0


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file without decoding its pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return height, width


def resize_rgb(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """Bilinear resize to the model's square input: how training, test and deployment images are resized."""
    if rgb.shape[:2] == (image_size, image_size):
        return rgb
    return cv2.resize(rgb, (image_size, image_size), interpolation=cv2.INTER_LINEAR)


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode an image and resize it bilinearly to image_size × image_size (uint8 RGB)."""
    return resize_rgb(read_rgb(path), image_size)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 3×H×W float in [0, 1] (the model normalises itself)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
