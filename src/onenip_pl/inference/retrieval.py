"""Prompt retrieval without the category label: the nearest normal training image by a global feature.

The authors pick each test image's prompt from its own category, so their test uses the label. Here a
test image is matched against a bank of normal training images by the cosine similarity of one global
descriptor per image (the mean of the backbone's multi-scale neck features, L2-normalised); the nearest
bank image decides the category, and the ``k`` most similar bank images of that category are the prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from onenip_pl.errors import ConfigError, DataError

__all__ = ["RetrievalBank", "global_descriptor", "retrieve_prompts"]


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
        ``indices`` [Q, k] (long, bank rows) and the retrieved category of each query.
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
class RetrievalBank:
    """Normal training images as retrieval candidates: their neck features (the prompts), global
    descriptors (the keys), categories and file paths (to exclude an image from its own retrieval)."""

    features: Tensor
    descriptors: Tensor
    categories: list[str]
    paths: list[str]

    @classmethod
    def build(
        cls,
        extract_features: Callable[[Tensor], Tensor],
        batches: Iterable[dict[str, Any]],
        device: torch.device | str,
    ) -> RetrievalBank:
        """Run ``extract_features`` over batches of ``{"image", "category", "path"}``."""
        features, categories, paths = [], [], []
        with torch.no_grad():
            for batch in batches:
                features.append(extract_features(batch["image"].to(device)).float())
                categories.extend(batch["category"])
                paths.extend(str(p) for p in batch["path"])
        if not features:
            raise DataError("the retrieval bank is empty: the training set holds no normal image")
        stacked = torch.cat(features)
        return cls(stacked, global_descriptor(stacked), categories, paths)

    def same_image(self, query_paths: Sequence[str]) -> Tensor:
        """[Q, B] bool, True where the bank row is the query image itself."""
        rows = [[str(path) == bank_path for bank_path in self.paths] for path in query_paths]
        return torch.tensor(rows, dtype=torch.bool, device=self.descriptors.device).reshape(
            len(query_paths), len(self.paths)
        )

    def retrieve(
        self, query_features: Tensor, k: int = 1, exclude: Tensor | None = None
    ) -> tuple[Tensor, list[str]]:
        """Prompt features [Q, k, C, H, W] for neck features [Q, C, H, W], and the retrieved categories."""
        indices, categories = retrieve_prompts(
            global_descriptor(query_features), self.descriptors, self.categories, k, exclude
        )
        return self.features[indices], categories
