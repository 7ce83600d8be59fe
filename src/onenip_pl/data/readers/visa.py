"""VisA read from the raw release (``VisA_20220922.tar``) through its split CSV, with no conversion step.

``<root>/split_csv/1cls.csv`` has the columns ``object,split,label,image,mask``: split is train/test,
label is normal/anomaly, image and mask paths are relative to the root, and mask is empty for normal
images. The 1cls split is the standard one for unsupervised, unified training. VisA masks hold defect
ids rather than 0/255; ``image_io.read_mask`` treats every value > 0 as anomalous. Normal images get
defect type "good" and anomalous ones "anomaly" (the CSV carries no finer type).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from onenip_pl.data.readers._tree import how_to_get, raise_if_problems, require_root
from onenip_pl.data.records import ImageRecord
from onenip_pl.errors import DataError

TITLE = "VisA"
PAGE = "https://github.com/amazon-science/spot-diff"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
SPLITS = ("train", "test")


def read_visa(
    root: str | Path,
    categories: Sequence[str] | None = None,
    split_file: str = "1cls.csv",
    strict: bool = False,
) -> list[ImageRecord]:
    """Every row of ``split_csv/<split_file>`` for the chosen objects, each file checked to exist.

    The split file names every image, so nothing else in the tree is read and ``strict`` (for the
    tree readers: stop on entries that are not part of the layout) has nothing to act on."""
    root = require_root(root, TITLE, how_to_get("visa", TITLE, PAGE, root))
    csv_path = root / "split_csv" / split_file
    if not csv_path.is_file():
        raise DataError(
            f"{TITLE}: {csv_path} not found. data.root must be the unpacked raw release "
            f"(object folders plus split_csv/); {how_to_get('visa', TITLE, PAGE, root)}"
        )
    problems: list[str] = []
    rows = _read_rows(csv_path, problems)
    wanted = _select_objects(rows, categories, csv_path)
    records = []
    for line, row in rows:
        if row["object"] in wanted:
            record = _record(root, csv_path, line, row, problems)
            if record is not None:
                records.append(record)
    raise_if_problems(problems, f"the {TITLE} tree at {root} (split file {csv_path.name})")
    return records


def _read_rows(csv_path: Path, problems: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows with stripped cells and their line numbers; rows with a wrong number of cells are problems."""
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or ())]
        if missing:
            raise DataError(
                f"{csv_path} lacks the columns {missing} (found {reader.fieldnames}); "
                f"a VisA split file has {','.join(COLUMNS)}"
            )
        rows = []
        for row in reader:
            where = f"{csv_path.name} line {reader.line_num}"
            if None in row or None in row.values():
                problems.append(f"{where}: expected {len(reader.fieldnames or ())} cells")
            elif not row["object"].strip():
                problems.append(f"{where}: empty object name")
            else:
                rows.append((reader.line_num, {key: value.strip() for key, value in row.items()}))
        return rows


def _select_objects(
    rows: list[tuple[int, dict[str, str]]], categories: Sequence[str] | None, csv_path: Path
) -> set[str]:
    available = sorted({row["object"] for _, row in rows if row["object"]})
    if not available:
        raise DataError(f"{csv_path} lists no images")
    if not categories:
        return set(available)
    unknown = [name for name in categories if name not in available]
    if unknown:
        raise DataError(f"{TITLE}: objects {unknown} are not in {csv_path}; available: {available}")
    return set(categories)


def _record(
    root: Path, csv_path: Path, line: int, row: dict[str, str], problems: list[str]
) -> ImageRecord | None:
    where = f"{csv_path.name} line {line}"
    split, label_name, image, mask = row["split"], row["label"], row["image"], row["mask"]
    before = len(problems)
    if split not in SPLITS:
        problems.append(f"{where}: split {split!r} is not one of {SPLITS}")
    if label_name not in LABELS:
        problems.append(f"{where}: label {label_name!r} is not one of {tuple(LABELS)}")
    if not image:
        problems.append(f"{where}: empty image path")
    elif not (root / image).is_file():
        problems.append(f"{where}: image {root / image} does not exist")
    label = LABELS.get(label_name, 0)
    if label == 1 and not mask:
        problems.append(f"{where}: anomalous image {root / image} has no mask")
    if label == 0 and mask:
        problems.append(f"{where}: normal image {root / image} lists a mask ({mask})")
    if mask and not (root / mask).is_file():
        problems.append(f"{where}: mask {root / mask} does not exist")
    if len(problems) > before:
        return None
    return ImageRecord(
        path=root / image,
        category=row["object"],
        split=split,  # type: ignore[arg-type]
        label=label,
        mask_path=root / mask if mask else None,
        defect_type="anomaly" if label else "good",
    )
