"""Torch datasets that turn records into training triplets and test samples."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from onenip_pl.data.image_io import load_image, read_mask, to_tensor
from onenip_pl.data.prompts import PROMPT_MODES, choose_prompt_indices, thumbnail_descriptor
from onenip_pl.data.records import ImageRecord
from onenip_pl.data.synthesis import AnomalySynthesizer
from onenip_pl.errors import ConfigError, DataError, check_choice

log = logging.getLogger(__name__)


def load_mask(path, image_size: int) -> np.ndarray:
    """Decode a mask, resize it with nearest neighbour and binarise it (float32 0/1)."""
    mask = read_mask(path).astype(np.uint8)
    if mask.shape[0] != image_size or mask.shape[1] != image_size:
        mask = cv2.resize(mask, (image_size, image_size), interpolation=cv2.INTER_NEAREST)
    return (mask > 0).astype(np.float32)


def normal_train_index(records: Sequence[ImageRecord]) -> dict[str, list[int]]:
    """Indices of the normal training images of each category: the prompt pool."""
    pool: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if record.split == "train" and record.is_normal:
            pool[record.category].append(index)
    return dict(pool)


IMAGE_CACHE_MODES = ("none", "memory", "disk")
TRAIN_PROMPT_CHOICES = ("random", "nearest")
# a query's prompt is drawn among this many nearest images of its category (data.train_prompt=nearest)
NEAREST_CANDIDATES = 5


class ImageSource:
    """Loads resized training images by record index, optionally decoding each file only once.

    ``cache="memory"`` decodes and resizes every image up front (threads), so
    dataloader workers share the arrays instead of re-decoding full-size
    PNG/JPEG/BMP files each epoch. ``cache="disk"`` writes each resized image
    as ``.npy`` under ``cache_dir`` the first time it is read, keyed by the
    file's path, size and modification time, so the cache survives runs and
    never serves a stale image.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        cache: str = "none",
        cache_dir: str | Path | None = None,
    ) -> None:
        if cache not in IMAGE_CACHE_MODES:
            raise ConfigError(f"data.cache_images={cache!r} is unknown; use one of {IMAGE_CACHE_MODES}")
        if cache == "disk" and cache_dir is None:
            raise ConfigError("data.cache_images=disk needs data.cache_dir")
        self.records = list(records)
        self.image_size = image_size
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() / f"{image_size}px" if cache == "disk" else None
        self._memory: list[np.ndarray] | None = None
        self._thumbnails: np.ndarray | None = None
        if cache == "memory":
            self._memory = self._decode_all()

    def _decode_all(self) -> list[np.ndarray]:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(lambda r: load_image(r.path, self.image_size), self.records))
        megabytes = sum(image.nbytes for image in images) / 2**20
        log.info(
            "Image cache: %d training images decoded once in %.1f s (%.0f MB in memory)",
            len(images),
            time.perf_counter() - start,
            megabytes,
        )
        return images

    def _disk_path(self, record: ImageRecord) -> Path:
        source = Path(record.path).resolve()
        stat = source.stat()
        key = hashlib.sha1(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npy"

    def __len__(self) -> int:
        return len(self.records)

    def thumbnails(self) -> np.ndarray:
        """Every image's thumbnail descriptor (onenip_pl.data.prompts), computed once."""
        if self._thumbnails is None:
            self._thumbnails = np.stack([thumbnail_descriptor(self.image(i)) for i in range(len(self))])
        return self._thumbnails

    def image(self, index: int) -> np.ndarray:
        if self._memory is not None:
            return self._memory[index]
        record = self.records[index]
        if self.cache_dir is None:
            return load_image(record.path, self.image_size)
        path = self._disk_path(record)
        if path.is_file():
            return np.load(path)
        image = load_image(record.path, self.image_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        with partial.open("wb") as handle:
            np.save(handle, image)
        partial.replace(path)
        return image


class TrainTripletDataset(Dataset):
    """Yields (query, prompt, synthetic anomaly, synthetic mask, category) for each normal training image.

    The prompt is another normal training image of the same category, drawn at
    random (it may be the query itself, as in the authors' code). An item is
    ``(index, epoch, position)`` as the training sampler yields it (a bare index
    means epoch 0 at that position): the prompt and the synthetic anomaly come
    from a generator seeded by (seed, epoch, position). Ranks hold different
    positions, so they synthesise differently, while a sample is the same on
    any worker and after a restart, which makes resumed runs exact.

    ``prompt_pools`` replaces the prompt candidates of the named categories (those whose prompts are turned
    to the query's pose, drawn from the images whose turned features are kept).
    ``categories`` restricts the queries to those categories (the others' images stay prompts only, for
    the unseen-product protocol). ``query_index`` and ``prompt_index`` (indices into ``source``) name the
    normal images: queries and prompts are served un-augmented, so a frozen
    backbone's features of each can be cached (onenip_pl.lightning.feature_cache).
    """

    # a promise the feature cache relies on: query and prompt tensors depend on their index only
    augments_normals = False

    def __init__(
        self,
        source: ImageSource,
        synthesizer: AnomalySynthesizer,
        seed: int = 0,
        fallback_textures: Sequence[np.ndarray] | None = None,
        categories: Sequence[str] | None = None,
        prompt_choice: str = "random",
        prompt_pools: dict[str, Sequence[int]] | None = None,
    ) -> None:
        check_choice("data.train_prompt", prompt_choice, TRAIN_PROMPT_CHOICES)
        self.source = source
        self.synthesizer = synthesizer
        self.seed = seed
        self.fallback_textures = fallback_textures
        self.prompt_pool = normal_train_index(source.records)
        trained = self.prompt_pool if categories is None else {c: self.prompt_pool[c] for c in categories}
        self.indices = [i for idx in trained.values() for i in idx]
        self.prompt_candidates: dict[int, list[int]] = {}
        if prompt_choice == "nearest":
            self.prompt_candidates = self._nearest_candidates(trained)
        # a category whose prompts are turned to the query's pose draws them from its own pool (the images
        # whose turned features the model keeps), not by the thumbnail's pose
        for category, pool in (prompt_pools or {}).items():
            for index in trained.get(category, []):
                self.prompt_candidates[index] = list(pool)
        if not self.indices:
            raise DataError("the training set holds no normal images; check data.root and data.categories")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int | tuple[int, int, int]) -> dict:
        item, epoch, position = item if isinstance(item, tuple) else (item, 0, item)
        index = self.indices[item]
        record = self.source.records[index]
        rng = np.random.default_rng([self.seed, epoch, position])
        candidates = self.prompt_candidates.get(index, self.prompt_pool[record.category])
        prompt_index = int(rng.choice(candidates))
        query = self.source.image(index)
        prompt = self.source.image(prompt_index)
        synthetic, mask = self.synthesizer(query, rng, fallback_textures=self.fallback_textures)
        return {
            "query": to_tensor(query),
            "prompt": to_tensor(prompt),
            "synthetic": to_tensor(synthetic),
            "synthetic_mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None],
            "category": record.category,
            "query_index": index,
            "prompt_index": prompt_index,
        }

    def _nearest_candidates(self, trained: dict[str, list[int]]) -> dict[int, list[int]]:
        """For each query, the NEAREST_CANDIDATES other images of its category whose thumbnails are most
        alike (the prompt is drawn among them): a prompt in nearly the query's pose."""
        thumbnails = self.source.thumbnails()
        candidates = {}
        for indices in trained.values():
            pool = np.asarray(self.prompt_pool[self.source.records[indices[0]].category])
            similarity = thumbnails[indices] @ thumbnails[pool].T
            for row, index in enumerate(indices):
                others = [
                    int(pool[i]) for i in np.argsort(-similarity[row], kind="stable") if pool[i] != index
                ]
                candidates[index] = others[:NEAREST_CANDIDATES] or [index]
        return candidates


class PromptedImageDataset(Dataset):
    """Yields (image, prompt, mask, label, category, path) for evaluation and calibration.

    Prompts are fixed per sample: for ``prompt_mode="random"`` a seeded draw of
    ``num_prompts`` distinct normal training images of the category (same seed,
    same prompts), for ``"first"`` the category's first ``num_prompts`` normal
    training images. ``prompt`` is 3×S×S for one prompt and K×3×S×S for K.
    ``"retrieval"`` yields no prompt, only ``num_prompts``: the model picks the
    prompts itself without the category label (onenip_pl.data.prompts).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        prompt_source: ImageSource,
        image_size: int,
        seed: int,
        prompt_mode: str = "random",
        num_prompts: int = 1,
    ) -> None:
        if prompt_mode not in PROMPT_MODES:
            raise ConfigError(f"data.test_prompt={prompt_mode!r} is unknown; use one of {PROMPT_MODES}")
        if num_prompts < 1:
            raise ConfigError(f"data.test_prompt_k={num_prompts} must be at least 1")
        self.records = list(records)
        self.prompt_source = prompt_source
        self.image_size = image_size
        self.prompt_mode = prompt_mode
        self.num_prompts = num_prompts
        self.prompt_indices: list[list[int]] = []
        if prompt_mode != "retrieval":
            pool = normal_train_index(prompt_source.records)
            thumbnails = None
            if prompt_mode == "nearest":
                own = np.stack([thumbnail_descriptor(load_image(r.path, image_size)) for r in self.records])
                thumbnails = (own, prompt_source.thumbnails())
            self.prompt_indices = choose_prompt_indices(
                self.records, pool, prompt_mode, num_prompts, seed, prompt_source.records, thumbnails
            )

    @property
    def prompt_setting(self) -> str:
        """How prompts are chosen, e.g. ``random, k=1``: calibration and test should agree on it."""
        return f"{self.prompt_mode}, k={self.num_prompts}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> dict:
        record = self.records[item]
        image = load_image(record.path, self.image_size)
        if record.mask_path is not None:
            mask = load_mask(record.mask_path, self.image_size)
        else:
            mask = np.zeros((self.image_size, self.image_size), dtype=np.float32)
        sample = {
            "image": to_tensor(image),
            "mask": torch.from_numpy(mask)[None],
            "label": torch.tensor(record.label, dtype=torch.long),
            "category": record.category,
            "path": str(record.path),
        }
        if self.prompt_mode == "retrieval":
            sample["num_prompts"] = self.num_prompts
            return sample
        prompts = [to_tensor(self.prompt_source.image(index)) for index in self.prompt_indices[item]]
        sample["prompt"] = prompts[0] if self.num_prompts == 1 else torch.stack(prompts)
        return sample


class NormalImageDataset(Dataset):
    """Normal training images by ImageSource index, e.g. the candidates of prompt retrieval."""

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict:
        record = self.source.records[self.indices[item]]
        return {
            "image": to_tensor(self.source.image(self.indices[item])),
            "category": record.category,
            "path": str(record.path),
        }


class SyntheticValidationDataset(Dataset):
    """Held-out normal images (label 0) followed by one fixed synthetic anomaly of each (label 1).

    A validation set that needs no real defect: it serves model selection,
    hyper-parameter search and calibration without touching the test set.
    Each synthetic anomaly is drawn from a generator seeded by (seed, index),
    so the set is the same at every epoch and on every device count.
    """

    def __init__(
        self,
        normal: PromptedImageDataset,
        synthesizer: AnomalySynthesizer,
        seed: int,
    ) -> None:
        self.normal = normal
        self.synthesizer = synthesizer
        self.seed = seed
        self.prompt_setting = normal.prompt_setting

    def __len__(self) -> int:
        return 2 * len(self.normal)

    def __getitem__(self, item: int) -> dict:
        count = len(self.normal)
        sample = self.normal[item % count]
        if item < count:
            return sample
        image = (sample["image"].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        rng = np.random.default_rng([self.seed, item])
        synthetic, mask = self.synthesizer(image, rng)
        return {
            **sample,
            "image": to_tensor(synthetic),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None],
            "label": torch.tensor(1, dtype=torch.long),
            "path": f"{sample['path']}#synthetic",
        }
