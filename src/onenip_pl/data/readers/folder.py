"""A user's own products, laid out one folder per category.

Layout under ``data.root`` (``dataset: folder``)::

    <root>/<category>/train/good/*          normal training images (required); they may also lie
                                            directly in train/ when there is no train/good/
    <root>/<category>/test/good/*           normal test images (optional)
    <root>/<category>/test/<defect>/*       defective test images, one folder per defect type (optional)
    <root>/<category>/ground_truth/<defect>/<stem>.<ext> or <stem>_mask.<ext>
                                            one mask per defective image, matched by file stem;
                                            any value > 0 marks the defect

Every extension in ``image_io.IMAGE_EXTENSIONS`` is accepted in any letter case, and images and masks
need not share an extension. Options (keys under ``data`` passed on by the caller): ``normal_dir``
renames ``good`` and ``mask_dir`` renames ``ground_truth``. A category without test/ can be trained on
but not evaluated; the data check says so. Categories are every folder under the root that holds train/
or test/, unless ``categories`` names some. Files that are not images (notes, Thumbs.db) and folders the
layout does not know are passed over and listed in the log, or stop the read with ``strict=True``;
damage (a defective image without a mask, an image outside the layout) is an error that names the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from onenip_pl.data.readers._tree import (
    TreeLayout,
    TreeScan,
    read_category_tree,
    require_root,
    select_categories,
)
from onenip_pl.data.records import ImageRecord, Records

TITLE = "image folder data set"


def read_folder(
    root: str | Path,
    categories: Sequence[str] | None = None,
    normal_dir: str = "good",
    mask_dir: str = "ground_truth",
    strict: bool = False,
) -> Records:
    """Every image of the chosen category folders, masks paired to defective test images by stem."""
    root = require_root(
        root,
        TITLE,
        "Set data.root to the folder that holds one sub-folder per category "
        "(see onenip_pl.data.readers.folder for the layout).",
    )
    layout = TreeLayout(
        normal_dir=normal_dir, mask_dir=mask_dir, mask_suffixes=("_mask", ""), flat_train_allowed=True
    )
    scan = TreeScan(strict)
    records: list[ImageRecord] = []
    for category in select_categories(root, categories, TITLE, scan):
        records += read_category_tree(root / category, category, layout, scan, test_required=False)
    return scan.finish(records, f"the {TITLE} at {root}")
