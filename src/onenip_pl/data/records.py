"""The one record type that every data-set reader produces."""

from __future__ import annotations

from collections.abc import Iterable
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


class Records(list):
    """A reader's ImageRecords, with the entries of the tree it passed over on purpose (files that are not
    images, directories the layout does not know), so that the data check can list them."""

    def __init__(
        self,
        records: Iterable[ImageRecord] = (),
        passed_over_files: Iterable[Path] = (),
        passed_over_dirs: Iterable[Path] = (),
    ) -> None:
        super().__init__(records)
        self.passed_over_files = list(passed_over_files)
        self.passed_over_dirs = list(passed_over_dirs)

    def absorb(self, other: Iterable[ImageRecord]) -> None:
        """Append another reader's records, and what it passed over."""
        self.extend(other)
        if isinstance(other, Records):
            self.passed_over_files += other.passed_over_files
            self.passed_over_dirs += other.passed_over_dirs
