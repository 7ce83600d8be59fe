"""OneNIPDetector: a checkpoint in, scores, decisions and full-resolution anomaly maps out.

Everything inference needs travels in the checkpoint (weights, fusion scale, thresholds and the prompt bank
of normal images per category), so predicting needs no training data.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from onenip_pl.errors import ConfigError
from onenip_pl.inference.checkpoint import load_for_inference
from onenip_pl.inference.graph import PromptedScorer
from onenip_pl.inference.images import (
    ImageLike,
    as_image_list,
    batch_tensor,
    describe,
    resize_for_model,
    resize_map,
    to_rgb,
)
from onenip_pl.inference.retrieval import global_descriptor
from onenip_pl.models import OneNIP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    """The prediction for one image.

    ``decision`` is ``score > image_threshold`` (None when the checkpoint has no calibrated threshold);
    ``anomaly_map`` is H×W float32 at the image's own resolution; ``category`` is the prompt bank category
    used (None for a user-given prompt) and ``similarity`` the cosine similarity that retrieval chose it by.
    """

    source: str
    score: float
    decision: bool | None
    anomaly_map: np.ndarray
    category: str | None
    similarity: float | None = None

    @property
    def verdict(self) -> str:
        """'anomalous', 'normal', or 'undecided' without a threshold."""
        if self.decision is None:
            return "undecided"
        return "anomalous" if self.decision else "normal"


class OneNIPDetector:
    """Scores images against normal prompts: the checkpoint's per-category bank, or a prompt you give.

    Without a category or prompt, each image gets the category whose bank prompt is nearest to it (cosine
    similarity of mean-pooled neck features), so mixed batches from several products work unlabelled.
    """

    def __init__(
        self,
        net: OneNIP,
        prompt_bank: Mapping[str, Mapping[str, Tensor]],
        image_threshold: float = math.nan,
        pixel_threshold: float = math.nan,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.scorer = PromptedScorer(self.net)
        self.image_threshold = float(image_threshold)
        self.pixel_threshold = float(pixel_threshold)
        self.prompt_features = {
            category: entry["features"].float().to(self.device)
            for category, entry in sorted(prompt_bank.items())
        }
        self.prompt_images = {category: entry["images"] for category, entry in sorted(prompt_bank.items())}
        self._bank_owner = [c for c, features in self.prompt_features.items() for _ in range(len(features))]
        self._bank_descriptors = (
            global_descriptor(torch.cat(list(self.prompt_features.values())))
            if self.prompt_features
            else None
        )

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> OneNIPDetector:
        """Load a training or converted checkpoint (weights_only; nothing in it is executed)."""
        loaded = load_for_inference(path)
        module = loaded.module
        if not bool(module.fusion_calibrated):
            log.warning(
                "Checkpoint %s has no calibrated fusion scale or thresholds: scores use fusion scale %.4g "
                "and no decision is made. Evaluate it once with model.fusion=calibrated on its training data "
                "to calibrate.",
                path,
                float(module.net.fusion_scale),
            )
        return cls(
            module.net,
            loaded.prompt_bank,
            float(module.image_threshold),
            float(module.pixel_threshold),
            device,
        )

    @property
    def categories(self) -> list[str]:
        return list(self.prompt_features)

    @property
    def image_size(self) -> int:
        return self.net.image_size

    @property
    def calibrated(self) -> bool:
        return math.isfinite(self.image_threshold)

    # ---- prompts --------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Neck features (K×C×h×w) of images, e.g. to serve as prompts."""
        items = as_image_list(images)
        rgbs = [to_rgb(item, describe(item, i)) for i, item in enumerate(items)]
        return self._features([resize_for_model(rgb, self.image_size) for rgb in rgbs])

    def _features(self, resized: Sequence[np.ndarray]) -> Tensor:
        return self.net.extract_features(batch_tensor(resized).to(self.device))

    def bank_prompts(self, category: str) -> Tensor:
        """The K stored prompt features of a category (ConfigError lists the known ones)."""
        if category not in self.prompt_features:
            known = ", ".join(self.categories) or "none (pass prompt=IMAGE, a normal image of the product)"
            raise ConfigError(f"category={category!r} is not in the checkpoint's prompt bank; known: {known}")
        return self.prompt_features[category]

    @torch.inference_mode()
    def retrieve(self, query_features: Tensor) -> list[tuple[str, float]]:
        """For each image (neck features), the category of the nearest bank prompt and its similarity."""
        if self._bank_descriptors is None:
            raise ConfigError(
                "the checkpoint has no prompt bank to pick a category from: pass prompt=IMAGE (a normal "
                "image of the product), or convert/train with a prompt bank."
            )
        similarity = global_descriptor(query_features) @ self._bank_descriptors.T
        best = similarity.max(dim=1)
        return [
            (self._bank_owner[int(index)], float(value))
            for value, index in zip(best.values, best.indices, strict=True)
        ]

    # ---- prediction -----------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        category: str | None = None,
        prompt: ImageLike | Sequence[ImageLike] | None = None,
        batch_size: int = 8,
        names: Sequence[str] | None = None,
    ) -> list[Detection]:
        """Detections for one image or many (paths, PIL images, H×W[×C] arrays of uint8/uint16/float).

        ``category`` uses that category's bank prompts, ``prompt`` your own normal image(s); with neither,
        each image's category is retrieved from the bank. K prompts give the mean of the K maps.
        ``names`` label the results (default: the path, or the input's position).
        """
        if category is not None and prompt is not None:
            raise ConfigError("give either category=NAME or prompt=IMAGE, not both.")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1.")
        items = as_image_list(images)
        if names is not None and len(names) != len(items):
            raise ConfigError(f"{len(names)} names for {len(items)} images.")
        labels = list(names) if names is not None else [describe(item, i) for i, item in enumerate(items)]
        fixed = self.encode(prompt) if prompt is not None else None
        if category is not None:
            fixed = self.bank_prompts(category)
        detections: list[Detection] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            rgbs = [to_rgb(item, labels[start + i]) for i, item in enumerate(chunk)]
            detections.extend(self._predict_batch(rgbs, labels[start : start + len(chunk)], category, fixed))
        return detections

    def _predict_batch(
        self,
        rgbs: list[np.ndarray],
        labels: list[str],
        category: str | None,
        fixed_prompts: Tensor | None,
    ) -> list[Detection]:
        query_features = self._features([resize_for_model(rgb, self.image_size) for rgb in rgbs])
        if fixed_prompts is not None:
            groups = {category: (list(range(len(rgbs))), fixed_prompts)}
            retrieved: list[tuple[Any, float | None]] = [(category, None)] * len(rgbs)
        else:
            retrieved = self.retrieve(query_features)
            groups = {}
            for index, (name, _) in enumerate(retrieved):
                groups.setdefault(name, ([], self.prompt_features[name]))[0].append(index)
        maps: list[np.ndarray | None] = [None] * len(rgbs)
        scores = [0.0] * len(rgbs)
        for indices, prompts in groups.values():
            anomaly_map, score = self.scorer.score_features(query_features[indices], prompts)
            for position, index in enumerate(indices):
                maps[index] = anomaly_map[position, 0].float().cpu().numpy()
                scores[index] = float(score[position])
        return [
            Detection(
                source=label,
                score=score,
                decision=(score > self.image_threshold) if self.calibrated else None,
                anomaly_map=resize_map(anomaly_map, *rgb.shape[:2]),
                category=name,
                similarity=similarity,
            )
            for label, rgb, anomaly_map, score, (name, similarity) in zip(
                labels, rgbs, maps, scores, retrieved, strict=True
            )
        ]
