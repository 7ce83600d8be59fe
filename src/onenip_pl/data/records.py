"""The one record type that every data-set reader produces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "test"]


@dataclass(frozen=True)
class ImageRecord:
    """One image on disk with its category, split, label and (for defects) mask.

    ``label`` is 0 for a normal image and 1 for an anomalous one. ``mask_path``
    is None for normal images; every anomalous test image must have one.
    """

    path: Path
    category: str
    split: Split
    label: int = 0
    mask_path: Path | None = None
    defect_type: str = "good"

    @property
    def is_normal(self) -> bool:
        return self.label == 0
