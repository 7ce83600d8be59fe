"""MVTec AD read exactly as shipped in ``mvtec_anomaly_detection.tar.xz``.

Layout: ``<root>/<category>/train/good/NNN.png``, ``test/good/``, ``test/<defect>/`` and
``ground_truth/<defect>/NNN_mask.png``. Categories are the directories found under the root (any
names, so the demo set and other MVTec-layout trees read the same way) unless `categories` picks some.
Masks may carry any image extension as long as the stem is ``<image stem>_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from onenip_pl.data.readers._tree import (
    TreeLayout,
    TreeScan,
    how_to_get,
    read_category_tree,
    require_root,
    select_categories,
)
from onenip_pl.data.records import ImageRecord, Records

TITLE = "MVTec AD"
PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
LAYOUT = TreeLayout(normal_dir="good", mask_dir="ground_truth", mask_suffixes=("_mask",))


def read_mvtec(root: str | Path, categories: Sequence[str] | None = None, strict: bool = False) -> Records:
    """Every image of the chosen categories, with masks paired to defective test images; the release's
    licence and readme files (and any other non-image entry) are passed over unless ``strict``."""
    root = require_root(root, TITLE, how_to_get("mvtec", TITLE, PAGE, root))
    scan = TreeScan(strict)
    records: list[ImageRecord] = []
    for category in select_categories(root, categories, TITLE, scan):
        records += read_category_tree(root / category, category, LAYOUT, scan)
    return scan.finish(records, f"the {TITLE} tree at {root}")
