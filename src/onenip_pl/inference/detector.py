"""OneNIPDetector: a checkpoint in, scores, decisions and full-resolution anomaly maps out.

Everything inference needs travels in the checkpoint (weights, fusion scale, thresholds and the prompt bank
of normal images per category), so predicting needs no training data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from onenip_pl.calibration import PostProcessor
from onenip_pl.calibration.decision import decide
from onenip_pl.checkpoint_file import read_checkpoint
from onenip_pl.checkpoint_format import (
    NO_BACKBONE_WEIGHTS,
    load_state,
    require_onenip_checkpoint,
    sub_state,
    upgrade_checkpoint,
)
from onenip_pl.data.image_io import resize_rgb
from onenip_pl.data.pose import PoseState
from onenip_pl.data.prompts import PromptBank
from onenip_pl.errors import ConfigError
from onenip_pl.inference.enrollment import Enrollment, enroll_product
from onenip_pl.inference.images import ImageLike, as_image_list, describe, resize_map, to_rgb
from onenip_pl.inference.runtimes import build_runtime
from onenip_pl.models import OneNIP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    """The prediction for one image.

    ``decision`` is the one decision rule (``score >= image threshold``) of the image's category (None
    when the checkpoint has no calibrated threshold); ``anomaly_map`` is H×W float32 at the image's own
    resolution; ``category`` is the prompt bank category used (None for a user-given prompt) and
    ``similarity`` the cosine similarity that retrieval chose it by.
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

    ``runtime`` runs the two graphs (prompt encoder, scoring) in PyTorch ("torch", on ``device``) or
    compiled for the CPU by "onnxruntime" or "openvino" (see onenip_pl.inference.runtimes); the compiled
    ones bake in the net's weights and fusion scale when the detector is made.
    """

    def __init__(
        self,
        net: OneNIP,
        prompt_bank: PromptBank | None = None,
        post_processor: PostProcessor | None = None,
        device: str | torch.device = "cpu",
        runtime: str = "torch",
        pose: PoseState | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.bank = prompt_bank if prompt_bank is not None else PromptBank()
        self.post_processor = post_processor if post_processor is not None else PostProcessor()
        self.runtime = build_runtime(runtime, self.net, self.device)
        # which categories turn their prompts to the query's pose (the checkpoint's decisions)
        self.pose = pose if pose is not None else PoseState()
        self._posed: dict[str, Tensor] = {}

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", runtime: str = "torch"
    ) -> OneNIPDetector:
        """Load a training, calibrated or converted checkpoint (weights_only; nothing in it is executed)
        to run on ``runtime`` (torch | onnxruntime | openvino)."""
        checkpoint = upgrade_checkpoint(read_checkpoint(path))
        require_onenip_checkpoint(checkpoint, path)
        net = OneNIP(**{**checkpoint["net_config"], **NO_BACKBONE_WEIGHTS})
        post_processor = PostProcessor()
        load_state(net, sub_state(checkpoint["state_dict"], "net"), path)
        load_state(post_processor, sub_state(checkpoint["state_dict"], "post_processor"), path)
        if not post_processor.calibrated:
            log.warning(
                "Checkpoint %s has no calibrated fusion scale or thresholds: scores use fusion scale %.4g "
                "and no decision is made. Calibrate it: python -m onenip_pl.calibrate ckpt_path=%s "
                "data.root=<normal images>",
                path,
                float(net.fusion_scale),
                path,
            )
        bank = PromptBank.from_state(checkpoint.get("prompt_bank"))
        pose = PoseState.from_checkpoint(checkpoint, path)
        return cls(net, bank, post_processor, device, runtime, pose)

    @property
    def categories(self) -> list[str]:
        return self.bank.category_names

    @property
    def image_size(self) -> int:
        return self.net.image_size

    @property
    def calibrated(self) -> bool:
        return self.post_processor.calibrated

    def thresholds(self, category: str | None) -> tuple[float, float]:
        """(image, pixel) thresholds that decide an image of ``category``: its own where calibrated, the
        pooled ones for another category or a prompt of your own (None); NaN when uncalibrated."""
        return self.post_processor.thresholds(category)

    @property
    def image_threshold(self) -> float:
        """The pooled image threshold (over every category), NaN when uncalibrated."""
        return self.post_processor.thresholds(None)[0]

    @property
    def pixel_threshold(self) -> float:
        """The pooled pixel threshold (over every category), NaN when uncalibrated."""
        return self.post_processor.thresholds(None)[1]

    @property
    def prompt_features(self) -> dict[str, Tensor]:
        return {category: self.bank.features_of(category) for category in self.categories}

    def posed_prompt_features(self, category: str) -> Tensor:
        """K×R×C×h×w, what the scoring graph takes: a category's K bank prompts at each of the R turns it
        is tried at (R = 1 for a fixed-pose category), turned and encoded once from the bank's images."""
        features = self.bank.features_of(category).to(self.device)
        if not self.pose.rotating(category):
            return features[:, None]
        if category not in self._posed:
            images = self.bank.images_of(category)
            self._posed[category] = self.pose.posed(self.net.extract_features, category, images, features)
        return self._posed[category]

    def forget_posed(self, category: str) -> None:
        """Drop a category's turned prompt features (its prompts were replaced)."""
        self._posed.pop(category, None)

    @property
    def prompt_images(self) -> dict[str, Tensor]:
        return {category: self.bank.images_of(category) for category in self.categories}

    # ---- prompts --------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Neck features (K×C×h×w) of images, e.g. to serve as prompts."""
        items = as_image_list(images)
        return self._features([to_rgb(item, describe(item, i)) for i, item in enumerate(items)])

    def _features(self, rgbs: Sequence[np.ndarray]) -> Tensor:
        return self.runtime.encode(self._resized(rgbs))

    def _resized(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        """N×S×S×3 uint8: what both graphs take."""
        return np.stack([resize_rgb(rgb, self.image_size) for rgb in rgbs])

    def enroll(
        self,
        category: str,
        images: ImageLike | Sequence[ImageLike],
        prompts: int = 1,
        prompt: int | None = None,
        overwrite: bool = False,
    ) -> Enrollment:
        """Add a product from its normal images, without retraining: the ``prompts`` most typical become
        its prompts (or the image at position ``prompt``), the others fix its thresholds. See
        onenip_pl.inference.enrollment; ``save`` puts the result into a new checkpoint."""
        items = as_image_list(images)
        rgbs = [to_rgb(item, describe(item, i)) for i, item in enumerate(items)]
        return enroll_product(self, category, rgbs, prompts, prompt, overwrite)

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
        # a prompt of your own is used as it is given (R = 1)
        fixed = self.encode(prompt)[:, None] if prompt is not None else None
        if category is not None:
            fixed = self.posed_prompt_features(category)
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
        images = self._resized(rgbs)
        query_features = None
        if fixed_prompts is not None:
            groups = {category: (list(range(len(rgbs))), fixed_prompts)}
            retrieved: list[tuple[Any, float | None]] = [(category, None)] * len(rgbs)
        else:
            query_features = self.runtime.encode(images)
            names, similarity = self.bank.nearest(query_features)
            retrieved = list(zip(names, similarity.tolist(), strict=True))
            groups = {}
            for index, name in enumerate(names):
                groups.setdefault(name, ([], self.posed_prompt_features(name)))[0].append(index)
        maps: list[np.ndarray | None] = [None] * len(rgbs)
        scores = [0.0] * len(rgbs)
        for indices, prompts in groups.values():
            features = None if query_features is None else query_features[indices]
            anomaly_map, score = self.runtime.score(images[indices], prompts, features)
            for position, index in enumerate(indices):
                maps[index] = anomaly_map[position, 0].float().cpu().numpy()
                scores[index] = float(score[position])
        return [
            Detection(
                source=label,
                score=score,
                decision=self._decide(score, name),
                anomaly_map=resize_map(anomaly_map, *rgb.shape[:2]),
                category=name,
                similarity=similarity,
            )
            for label, rgb, anomaly_map, score, (name, similarity) in zip(
                labels, rgbs, maps, scores, retrieved, strict=True
            )
        ]

    def _decide(self, score: float, category: str | None) -> bool | None:
        return decide(score, self.thresholds(category)[0])
