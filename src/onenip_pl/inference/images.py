"""Turn whatever a user hands the detector (path, PIL image, numpy array) into H×W×3 uint8 RGB.

Files go through onenip_pl.data.image_io.read_rgb, so a PNG predicts exactly as it evaluates; arrays and
PIL images follow the same rules: gray is replicated, alpha dropped, 16-bit and float scaled to 8 bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from onenip_pl.data.image_io import read_rgb, scale_to_uint8
from onenip_pl.errors import DataError

ImageLike = str | os.PathLike | Image.Image | np.ndarray
_CHANNEL_COUNTS = (1, 3, 4)
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def array_to_rgb(array: np.ndarray, name: str = "image array") -> np.ndarray:
    """H×W, H×W×1, H×W×3 or H×W×4 array of any supported dtype -> H×W×3 uint8."""
    if array.ndim == 3 and array.shape[2] in _CHANNEL_COUNTS:
        channels = array.shape[2]
    elif array.ndim == 2:
        channels, array = 1, array[..., None]
    else:
        raise DataError(
            f"{name} has shape {array.shape}; pass H×W (gray), H×W×3 (RGB) or H×W×4 (RGBA) arrays, "
            "one per image (stack several in a list)."
        )
    if min(array.shape[:2]) < 1:
        raise DataError(f"{name} is empty (shape {array.shape}).")
    rgb = scale_to_uint8(array, name)
    if channels == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return np.ascontiguousarray(rgb[..., :3])


def pil_to_rgb(image: Image.Image, name: str = "PIL image") -> np.ndarray:
    """A PIL image of any mode -> H×W×3 uint8 (16-bit and float gray are scaled, not clipped)."""
    if image.mode in _HIGH_BIT_MODES:
        return array_to_rgb(np.asarray(image), name)
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def to_rgb(image: ImageLike, name: str | None = None) -> np.ndarray:
    """Any supported input -> H×W×3 uint8 RGB; a DataError names what could not be read."""
    if isinstance(image, str | os.PathLike):
        return read_rgb(Path(image))
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, name or "PIL image")
    if isinstance(image, np.ndarray):
        return array_to_rgb(image, name or "image array")
    if isinstance(image, torch.Tensor):
        raise DataError(
            "torch tensors are not accepted as images here; pass image.permute(1, 2, 0).cpu().numpy() "
            "(H×W×C), a PIL image or a path."
        )
    raise DataError(f"cannot use an object of type {type(image).__name__} as an image.")


def describe(image: ImageLike, index: int) -> str:
    """The name reported for an input: its path, or its position in the call."""
    if isinstance(image, str | os.PathLike):
        return str(image)
    return f"<{type(image).__name__} #{index}>"


def as_image_list(images: Any) -> list[ImageLike]:
    """One image or a sequence of images -> a list; a 4-D array is a batch of H×W×C images."""
    if isinstance(images, str | os.PathLike | Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Sequence):
        return list(images)
    return [images]


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an S×S float map back to an image's original H×W."""
    if anomaly_map.shape == (height, width):
        return anomaly_map.astype(np.float32, copy=False)
    resized = cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return resized.astype(np.float32, copy=False)
