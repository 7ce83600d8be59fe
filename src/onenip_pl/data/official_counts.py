"""Category names and image counts of the official releases, to compare a tree on disk against.

MVTec AD and BTAD counts are given per category (from the data sets' papers; their sums equal the
published totals). VisA publishes its 1cls split per object only inside the CSV, so only its totals are
kept here. A tree whose counts differ is usually an interrupted download or a different release.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitCounts:
    """Numbers of training images and of normal and anomalous test images."""

    train: int = 0
    test_normal: int = 0
    test_anomalous: int = 0

    @property
    def test(self) -> int:
        return self.test_normal + self.test_anomalous

    def __add__(self, other: SplitCounts) -> SplitCounts:
        return SplitCounts(
            self.train + other.train,
            self.test_normal + other.test_normal,
            self.test_anomalous + other.test_anomalous,
        )


MVTEC_PER_CATEGORY: dict[str, SplitCounts] = {
    "bottle": SplitCounts(209, 20, 63),
    "cable": SplitCounts(224, 58, 92),
    "capsule": SplitCounts(219, 23, 109),
    "carpet": SplitCounts(280, 28, 89),
    "grid": SplitCounts(264, 21, 57),
    "hazelnut": SplitCounts(391, 40, 70),
    "leather": SplitCounts(245, 32, 92),
    "metal_nut": SplitCounts(220, 22, 93),
    "pill": SplitCounts(267, 26, 141),
    "screw": SplitCounts(320, 41, 119),
    "tile": SplitCounts(230, 33, 84),
    "toothbrush": SplitCounts(60, 12, 30),
    "transistor": SplitCounts(213, 60, 40),
    "wood": SplitCounts(247, 19, 60),
    "zipper": SplitCounts(240, 32, 119),
}

BTAD_PER_CATEGORY: dict[str, SplitCounts] = {
    "01": SplitCounts(400, 21, 49),
    "02": SplitCounts(399, 30, 200),
    "03": SplitCounts(1000, 400, 41),
}

MVTEC_CATEGORIES: tuple[str, ...] = tuple(MVTEC_PER_CATEGORY)
VISA_CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
BTAD_CATEGORIES: tuple[str, ...] = tuple(BTAD_PER_CATEGORY)

BENCHMARK_CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec": MVTEC_CATEGORIES,
    "visa": VISA_CATEGORIES,
    "btad": BTAD_CATEGORIES,
}

BENCHMARK_TITLES: dict[str, str] = {"mvtec": "MVTec AD", "visa": "VisA", "btad": "BTAD"}

BENCHMARK_TOTALS: dict[str, SplitCounts] = {
    "mvtec": SplitCounts(3629, 467, 1258),
    "visa": SplitCounts(8659, 962, 1200),
    "btad": SplitCounts(1799, 451, 290),
}

PER_CATEGORY: dict[str, SplitCounts] = {**MVTEC_PER_CATEGORY, **BTAD_PER_CATEGORY}

# Which benchmarks a data-set name covers; "mvtec_visa_btad" is the 30-category union.
DATASET_BENCHMARKS: dict[str, tuple[str, ...]] = {
    "mvtec": ("mvtec",),
    "visa": ("visa",),
    "btad": ("btad",),
    "mvtec_visa_btad": ("mvtec", "visa", "btad"),
}

DTD_CLASSES = 47
DTD_IMAGES = 5640
