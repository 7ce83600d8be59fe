"""Where every prompt comes from: a category's normal training images chosen at random or first, K of them,
or retrieved without the label from a bank of normal images and their features.

The authors pick each test image's prompt from its own category, so their test uses the label. Retrieval
matches an image against the bank by the cosine similarity of one global descriptor per image (the mean of
the neck features, L2-normalised): the nearest bank image decides the category, and the ``k`` most similar
bank images of that category are the prompts. Training-time testing (``data.test_prompt``), calibration,
the checkpoint's prompt bank, the detector and enrolment of a new product all use this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from onenip_pl.data.records import ImageRecord
from onenip_pl.errors import ConfigError, DataError

PROMPT_MODES = ("random", "first", "nearest", "retrieval")
THUMBNAIL_SIZE = 16
FeatureExtractor = Callable[[Tensor], Tensor]


def thumbnail_descriptor(rgb: np.ndarray) -> np.ndarray:
    """A pose-aware descriptor of an image: its 16×16 gray thumbnail, centred and L2-normalised.

    Unlike the pooled features of :func:`global_descriptor` it changes when a part is turned or shifted,
    so the nearest normal image by it shows the part in the closest pose: the prompt a reconstruction from
    one normal image benefits from most when parts come at random rotations.
    """
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    small = cv2.resize(gray, (THUMBNAIL_SIZE, THUMBNAIL_SIZE), interpolation=cv2.INTER_AREA)
    vector = small.astype(np.float32).ravel()
    vector -= vector.mean()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def choose_prompt_indices(
    records: Sequence[ImageRecord],
    pool: Mapping[str, Sequence[int]],
    mode: str,
    k: int,
    seed: int,
    pool_records: Sequence[ImageRecord] = (),
    thumbnails: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[list[int]]:
    """For each record, ``k`` distinct prompt indices from ``pool[category]``: a seeded draw per record
    (``random``: the same seed gives the same prompts), the category's first ``k`` (``first``), or the
    ``k`` most similar by :func:`thumbnail_descriptor` (``nearest``; ``thumbnails`` holds the records' and
    the pool's descriptors). An image is not its own prompt (an index whose record is the image itself, in
    ``pool_records``, is left out) unless the category has no other."""
    if mode not in ("random", "first", "nearest"):
        raise ConfigError(f"data.test_prompt={mode!r} is unknown; use one of {PROMPT_MODES}")
    if mode == "nearest" and thumbnails is None:
        raise ConfigError("data.test_prompt=nearest needs the images' thumbnail descriptors")
    chosen = []
    for item, record in enumerate(records):
        candidates = list(pool.get(record.category, []))
        others = [i for i in candidates if not _is_itself(pool_records, i, record)]
        # a category of a single image can only prompt with that image
        candidates = others if len(others) >= k else candidates
        if len(candidates) < k:
            raise DataError(
                f"category {record.category!r} has test images but {len(candidates)} normal training "
                f"image(s) to use as prompts, fewer than data.test_prompt_k={k}; add train/good images "
                "for it or lower data.test_prompt_k"
            )
        if mode == "first":
            chosen.append(candidates[:k])
        elif mode == "nearest":
            query, pool_descriptors = thumbnails[0][item], thumbnails[1][candidates]
            order = np.argsort(-(pool_descriptors @ query), kind="stable")[:k]
            chosen.append([int(candidates[i]) for i in order])
        else:
            drawn = np.random.default_rng([seed, item]).choice(candidates, k, replace=False)
            chosen.append([int(i) for i in drawn])
    return chosen


def _is_itself(pool_records: Sequence[ImageRecord], index: int, record: ImageRecord) -> bool:
    return index < len(pool_records) and pool_records[index].path == record.path


def global_descriptor(features: Tensor) -> Tensor:
    """[B, C, H, W] features -> [B, C] unit vectors: spatial mean, then L2 normalisation.

    The spatial mean ignores where things are, so a shifted or rotated object of the same kind still
    matches; normalising makes the dot product a cosine similarity.
    """
    if features.dim() != 4:
        raise DataError(f"global_descriptor expects [B, C, H, W] features, got {tuple(features.shape)}")
    return F.normalize(features.float().mean(dim=(2, 3)), dim=1)


def retrieve_prompts(
    query_descriptors: Tensor,
    bank_descriptors: Tensor,
    bank_categories: Sequence[str],
    k: int = 1,
    exclude: Tensor | None = None,
) -> tuple[Tensor, list[str]]:
    """Prompts for each query, chosen without its label.

    Args:
        query_descriptors: [Q, C] from :func:`global_descriptor`.
        bank_descriptors: [B, C] from :func:`global_descriptor`.
        bank_categories: the category of each bank row.
        k: prompts per query, all from the category of the nearest bank row, most similar first.
        exclude: optional [Q, B] bool, True where a bank row may not serve a query (e.g. the query image
            itself when calibrating on training images).

    Returns:
        ``indices`` [Q, k] (long, bank rows, the nearest first) and the retrieved category of each query.
    """
    categories = list(bank_categories)
    if bank_descriptors.dim() != 2 or len(categories) != bank_descriptors.shape[0]:
        raise DataError(
            f"the retrieval bank holds {tuple(bank_descriptors.shape)} descriptors but "
            f"{len(categories)} categories; give one category per bank row"
        )
    if query_descriptors.dim() != 2 or query_descriptors.shape[1] != bank_descriptors.shape[1]:
        raise DataError(
            f"query descriptors {tuple(query_descriptors.shape)} do not match the bank's "
            f"{tuple(bank_descriptors.shape)}; compute both with global_descriptor on the same backbone"
        )
    if k < 1:
        raise ConfigError(f"data.test_prompt_k={k} must be at least 1")
    names = sorted(set(categories))
    codes = torch.tensor([names.index(c) for c in categories], device=bank_descriptors.device)
    similarity = query_descriptors.float() @ bank_descriptors.float().T
    if exclude is not None:
        similarity = similarity.masked_fill(exclude.to(similarity.device), -torch.inf)
    nearest = similarity.argmax(dim=1)
    if not bool(torch.isfinite(similarity.gather(1, nearest[:, None])).all()):
        raise DataError("a query has no bank image left to retrieve; the bank needs more normal images")
    retrieved = codes[nearest]
    same_category = codes[None, :] == retrieved[:, None]
    allowed = same_category & torch.isfinite(similarity)
    too_small = allowed.sum(dim=1) < k
    if bool(too_small.any()):
        short = names[int(retrieved[too_small][0])]
        raise ConfigError(
            f"data.test_prompt_k={k} but the retrieval bank has fewer usable images of category {short!r}; "
            "lower data.test_prompt_k or raise data.retrieval_images_per_category"
        )
    indices = similarity.masked_fill(~allowed, -torch.inf).topk(k, dim=1).indices
    return indices, [names[int(code)] for code in retrieved]


@dataclass
class PromptBank:
    """Normal images of each category as prompts and retrieval candidates: their neck features (what a
    prompt is), descriptors (what retrieval compares), categories, file paths (to keep an image from
    serving as its own prompt) and, for the checkpoint's bank, the uint8 images themselves.

    Rows are grouped by category in name order. The checkpoint stores :meth:`to_state`
    (``{category: {"images", "features"}}``), so inference needs no training data.
    """

    features: Tensor = field(default_factory=lambda: torch.empty(0))
    categories: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    images: Tensor | None = None

    def __post_init__(self) -> None:
        self.descriptors = global_descriptor(self.features) if len(self.categories) else torch.empty(0)

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        extract: FeatureExtractor,
        batches: Iterable[dict[str, Any]],
        device: torch.device | str,
        keep_images: bool = False,
    ) -> PromptBank:
        """From batches of ``{"image" (N×3×S×S in [0, 1]), "category", "path"}``."""
        features, categories, paths, images = [], [], [], []
        for batch in batches:
            features.append(extract(batch["image"].to(device)).float())
            categories.extend(str(c) for c in batch["category"])
            paths.extend(str(p) for p in batch["path"])
            if keep_images:
                images.append(batch["image"].mul(255).round().to(torch.uint8).cpu())
        if not features:
            raise DataError("the prompt bank is empty: no normal image was given to it")
        order = sorted(range(len(categories)), key=lambda i: categories[i])
        stacked = torch.cat(features)[order]
        kept = torch.cat(images)[order] if keep_images else None
        return cls(stacked, [categories[i] for i in order], [paths[i] for i in order], kept)

    @classmethod
    @torch.no_grad()
    def from_images(
        cls, extract: FeatureExtractor, images: Mapping[str, Tensor], device: torch.device | str
    ) -> PromptBank:
        """From uint8 images (K×3×S×S) per category; the images are kept, for the checkpoint."""
        bank = cls()
        for category in sorted(images):
            bank.add(category, images[category], extract(images[category].to(device).float().div(255.0)))
        return bank

    def add(self, category: str, images: Tensor | None, features: Tensor, paths: Sequence[str] = ()) -> None:
        """Put one category's prompts in (replacing any it had): uint8 images K×3×S×S and features."""
        self.remove(category)
        rows = {name: self._rows(name) for name in self.category_names}
        rows[category] = (features.detach().float().cpu(), images, list(paths) or [""] * len(features))
        self._set(rows)

    def remove(self, category: str) -> None:
        if category in self.category_names:
            rows = {name: self._rows(name) for name in self.category_names if name != category}
            self._set(rows)

    def _rows(self, category: str) -> tuple[Tensor, Tensor | None, list[str]]:
        index = self.rows_of(category)
        images = self.images[index] if self.images is not None else None
        return self.features[index].cpu(), images, [self.paths[i] for i in index.tolist()]

    def _set(self, rows: Mapping[str, tuple[Tensor, Tensor | None, list[str]]]) -> None:
        names = sorted(rows)
        if not names:
            self.__init__()
            return
        with_images = all(rows[name][1] is not None for name in names)
        self.features = torch.cat([rows[name][0] for name in names])
        self.images = torch.cat([rows[name][1] for name in names]) if with_images else None
        self.categories = [name for name in names for _ in range(len(rows[name][0]))]
        self.paths = [path for name in names for path in rows[name][2]]
        self.__post_init__()

    # ---- reading --------------------------------------------------------------------------------

    @property
    def category_names(self) -> list[str]:
        return sorted(set(self.categories))

    def __len__(self) -> int:
        return len(self.categories)

    def describe(self) -> str:
        return f"{len(self)} normal images of {len(self.category_names)} categories"

    def rows_of(self, category: str) -> Tensor:
        if category not in self.categories:
            known = (
                ", ".join(self.category_names) or "none (pass prompt=IMAGE, a normal image of the product)"
            )
            raise ConfigError(f"category={category!r} is not in the checkpoint's prompt bank; known: {known}")
        return torch.tensor([i for i, name in enumerate(self.categories) if name == category])

    def features_of(self, category: str) -> Tensor:
        """The K prompt features (K×C×h×w) of a category (ConfigError lists the known ones)."""
        return self.features[self.rows_of(category).to(self.features.device)]

    def images_of(self, category: str) -> Tensor:
        if self.images is None:
            raise ConfigError(f"the prompt bank keeps no images of category {category!r}")
        return self.images[self.rows_of(category)]

    def same_image(self, query_paths: Sequence[str]) -> Tensor:
        """[Q, B] bool, True where the bank row is the query image itself."""
        rows = [[str(path) == bank_path for bank_path in self.paths] for path in query_paths]
        return torch.tensor(rows, dtype=torch.bool).reshape(len(query_paths), len(self.paths))

    def retrieve(
        self, query_features: Tensor, k: int = 1, exclude: Tensor | None = None
    ) -> tuple[Tensor, list[str]]:
        """Prompt features [Q, k, C, H, W] for neck features [Q, C, H, W], and the retrieved categories."""
        indices, categories = retrieve_prompts(
            global_descriptor(query_features),
            self.descriptors.to(query_features.device),
            self.categories,
            k,
            exclude,
        )
        return self.features.to(query_features.device)[indices], categories

    def nearest(self, query_features: Tensor) -> tuple[list[str], Tensor]:
        """The category of each query's nearest bank row, and that row's cosine similarity."""
        if not len(self):
            raise ConfigError(
                "the checkpoint has no prompt bank to pick a category from: pass prompt=IMAGE (a normal "
                "image of the product), or convert/train with a prompt bank."
            )
        query = global_descriptor(query_features)
        indices, categories = retrieve_prompts(query, self.descriptors.to(query.device), self.categories)
        rows = self.descriptors.to(query.device)[indices[:, 0]]
        return categories, (query * rows).sum(dim=1)

    # ---- checkpoint -----------------------------------------------------------------------------

    def to_state(self) -> dict[str, dict[str, Tensor]]:
        """``{category: {"images": uint8 K×3×S×S, "features": float32 K×C×h×w}}``: plain containers."""
        state = {}
        for category in self.category_names:
            entry = {"features": self.features_of(category).cpu()}
            if self.images is not None:
                entry["images"] = self.images_of(category).cpu()
            state[category] = entry
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Mapping[str, Tensor]] | None) -> PromptBank:
        bank = cls()
        for category, entry in sorted((state or {}).items()):
            bank.add(category, entry.get("images"), entry["features"])
        return bank


def batch_prompt_features(
    extract: FeatureExtractor,
    batch: dict[str, Any],
    query_features: Tensor,
    retrieval_bank: Callable[[], PromptBank],
    exclude_self: bool = False,
) -> tuple[Tensor, list[str] | None]:
    """Prompt features N×K×C×h×w of an evaluation batch and the retrieved categories (None when given).

    A batch carries its prompt images (``prompt``: N×3×S×S, or N×K×3×S×S for K) or, for retrieval, only
    ``num_prompts``: those come from ``retrieval_bank()``, the image itself left out when ``exclude_self``
    (calibration on training images).
    """
    if "prompt" in batch:
        prompts = batch["prompt"].to(query_features.device)
        prompts = prompts[:, None] if prompts.dim() == 4 else prompts
        return extract(prompts.flatten(0, 1)).unflatten(0, prompts.shape[:2]), None
    bank = retrieval_bank()
    exclude = bank.same_image(batch["path"]) if exclude_self else None
    k = int(torch.as_tensor(batch["num_prompts"]).flatten()[0])
    return bank.retrieve(query_features, k, exclude)


def representative_rows(features: Tensor, k: int) -> list[int]:
    """The ``k`` rows whose descriptors lie nearest the mean descriptor: the most typical normal images,
    so that one odd image (a reflection, a misplaced part) is not chosen as the product's prompt."""
    descriptors = global_descriptor(features)
    centre = F.normalize(descriptors.mean(dim=0, keepdim=True), dim=1)
    similarity = (descriptors @ centre.T)[:, 0]
    return similarity.topk(min(k, len(similarity))).indices.tolist()
