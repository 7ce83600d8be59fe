"""BTAD read exactly as shipped in ``btad.zip`` (unpacked, the tree is ``BTech_Dataset_transformed/``).

Layout: ``<root>/<product>/train/ok/``, ``test/ok/``, ``test/ko/`` and ``ground_truth/ko/`` with one
mask per defective image under the same stem. Extensions differ by product (01: .bmp images and .png
masks, 02: .png and .png, 03: .bmp and .bmp), so images and masks are matched by stem whatever their
extension. Normal images get defect type "good", defective ones "ko".
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
from onenip_pl.errors import DataError

TITLE = "BTAD"
PAGE = "https://avires.dimi.uniud.it/papers/btad/btad.zip"
ARCHIVE_FOLDER = "BTech_Dataset_transformed"
LAYOUT = TreeLayout(normal_dir="ok", mask_dir="ground_truth", mask_suffixes=("",))


def read_btad(root: str | Path, categories: Sequence[str] | None = None, strict: bool = False) -> Records:
    """Every image of the chosen products (01, 02, 03), masks paired by stem."""
    root = require_root(root, TITLE, how_to_get("btad", TITLE, PAGE, root))
    if (root / ARCHIVE_FOLDER).is_dir():
        raise DataError(
            f"{TITLE}: {root} holds the unpacked archive folder {ARCHIVE_FOLDER}/; "
            f"set data.root={root / ARCHIVE_FOLDER}"
        )
    scan = TreeScan(strict)
    records: list[ImageRecord] = []
    for product in select_categories(root, categories, TITLE, scan):
        records += read_category_tree(root / product, product, LAYOUT, scan)
    return scan.finish(records, f"the {TITLE} tree at {root}")
