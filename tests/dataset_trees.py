"""Seeded generators of tiny data-set trees laid out exactly like the official releases.

Names, extensions (capitals included), folder spellings, grayscale categories, VisA's split CSV and
its non-binary masks, and BTAD's per-product extensions follow the releases, so a reader that passes
here reads the real thing. Images are tiny and not square (height differs from width), so a swapped
size is caught. Every writer returns the counts it wrote, per category, for tests to compare with.
"""

from __future__ import annotations

import csv
import tarfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from onenip_pl.data.official_counts import (
    BTAD_CATEGORIES,
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    SplitCounts,
)

SIZE = (24, 32)  # height, width
MVTEC_GRAYSCALE = frozenset({"grid", "screw", "zipper"})
BTAD_EXTENSIONS = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
DEFAULT_DEFECTS = {"broken": 2, "crack": 1}


def write_image(
    path: Path, rng: np.random.Generator, size: tuple[int, int] = SIZE, *, gray: bool = False
) -> Path:
    """A random image, single-channel when `gray`; the format follows the extension (any case)."""
    shape = size if gray else (*size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def write_mask(
    path: Path, rng: np.random.Generator, size: tuple[int, int] = SIZE, *, values: Iterable[int] = (255,)
) -> Path:
    """A mask with one filled rectangle per value on a zero background (VisA passes defect ids)."""
    mask = np.zeros(size, dtype=np.uint8)
    height, width = size
    for value in values:
        top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        mask[top : top + height // 3 + 1, left : left + width // 3 + 1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def truncate_file(path: Path, keep: float = 0.5) -> Path:
    """Cut a file short, as an interrupted copy or download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def add_shipped_extras(category_dir: Path, rng: np.random.Generator) -> list[Path]:
    """What release trees carry beside the layout: a licence and a readme per category (MVTec AD) and a
    validation split (MVTec 3D-AD). Returns the entries a reader passes over."""
    (category_dir / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    (category_dir / "readme.txt").write_text("one category of a release\n")
    write_image(category_dir / "validation" / "good" / "000.png", rng)
    return [category_dir / "license.txt", category_dir / "readme.txt", category_dir / "validation"]


def make_mvtec_tree(
    root: Path,
    categories: Iterable[str] = ("bottle", "grid"),
    *,
    n_train: int = 3,
    n_test_good: int = 2,
    defects: Mapping[str, int] | None = None,
    size: tuple[int, int] = SIZE,
    seed: int = 0,
) -> dict[str, SplitCounts]:
    """``<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>/NNN_mask.png}``."""
    rng = np.random.default_rng(seed)
    defects = DEFAULT_DEFECTS if defects is None else defects
    counts = {}
    for category in categories:
        gray = category in MVTEC_GRAYSCALE
        base = root / category
        for index in range(n_train):
            write_image(base / "train" / "good" / f"{index:03d}.png", rng, size, gray=gray)
        for index in range(n_test_good):
            write_image(base / "test" / "good" / f"{index:03d}.png", rng, size, gray=gray)
        for defect, number in defects.items():
            for index in range(number):
                write_image(base / "test" / defect / f"{index:03d}.png", rng, size, gray=gray)
                write_mask(base / "ground_truth" / defect / f"{index:03d}_mask.png", rng, size)
        counts[category] = SplitCounts(n_train, n_test_good, sum(defects.values()))
        add_shipped_extras(base, rng)
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    (root / "readme.txt").write_text("MVTec AD\n")
    return counts


def make_visa_tree(
    root: Path,
    objects: Iterable[str] = ("candle", "pcb1"),
    *,
    n_train: int = 4,
    n_test_normal: int = 2,
    n_anomaly: int = 2,
    size: tuple[int, int] = SIZE,
    seed: int = 0,
) -> dict[str, SplitCounts]:
    """The raw release: ``<object>/Data/{Images,Masks}/...`` plus ``split_csv/1cls.csv``.

    Normal images are ``NNNN.JPG``, anomalous ``NNN.JPG``, masks ``NNN.png`` holding defect ids 1, 2, 3
    (not 0/255), as in the release.
    """
    rng = np.random.default_rng(seed)
    rows = []
    counts = {}
    for name in objects:
        annotations = []
        for index in range(n_train + n_test_normal):
            image = f"{name}/Data/Images/Normal/{index:04d}.JPG"
            write_image(root / image, rng, size)
            split = "train" if index < n_train else "test"
            rows.append([name, split, "normal", image, ""])
            annotations.append([image, "normal", ""])
        for index in range(n_anomaly):
            image = f"{name}/Data/Images/Anomaly/{index:03d}.JPG"
            mask = f"{name}/Data/Masks/Anomaly/{index:03d}.png"
            write_image(root / image, rng, size)
            write_mask(root / mask, rng, size, values=range(1, 1 + index % 3 + 1))
            rows.append([name, "test", "anomaly", image, mask])
            annotations.append([image, "scratch", mask])
        _write_csv(root / name / "image_anno.csv", ["image", "label", "mask"], annotations)
        counts[name] = SplitCounts(n_train, n_test_normal, n_anomaly)
    _write_csv(root / "split_csv" / "1cls.csv", ["object", "split", "label", "image", "mask"], rows)
    return counts


def make_btad_tree(
    root: Path,
    products: Iterable[str] = BTAD_CATEGORIES,
    *,
    n_train: int = 3,
    n_test_ok: int = 2,
    n_test_ko: int = 2,
    size: tuple[int, int] = SIZE,
    seed: int = 0,
) -> dict[str, SplitCounts]:
    """``<product>/{train/ok, test/ok, test/ko, ground_truth/ko}`` with each product's extensions."""
    rng = np.random.default_rng(seed)
    counts = {}
    for product in products:
        image_ext, mask_ext = BTAD_EXTENSIONS.get(product, (".png", ".png"))
        base = root / product
        for index in range(n_train):
            write_image(base / "train" / "ok" / f"{index:04d}{image_ext}", rng, size)
        for index in range(n_test_ok):
            write_image(base / "test" / "ok" / f"{index:04d}{image_ext}", rng, size)
        for index in range(n_test_ko):
            write_image(base / "test" / "ko" / f"{index:04d}{image_ext}", rng, size)
            write_mask(base / "ground_truth" / "ko" / f"{index:04d}{mask_ext}", rng, size)
        add_shipped_extras(base, rng)
        counts[product] = SplitCounts(n_train, n_test_ok, n_test_ko)
    return counts


def make_union_trees(root: Path, *, seed: int = 0) -> tuple[dict[str, Path], dict[str, SplitCounts]]:
    """All 30 official categories, one image of each kind, under ``root/{mvtec,visa,btad}``."""
    roots = {part: root / part for part in ("mvtec", "visa", "btad")}
    small = (12, 16)
    counts = make_mvtec_tree(
        roots["mvtec"],
        MVTEC_CATEGORIES,
        n_train=1,
        n_test_good=1,
        defects={"crack": 1},
        size=small,
        seed=seed,
    )
    counts |= make_visa_tree(
        roots["visa"], VISA_CATEGORIES, n_train=1, n_test_normal=1, n_anomaly=1, size=small, seed=seed
    )
    counts |= make_btad_tree(roots["btad"], n_train=1, n_test_ok=1, n_test_ko=1, size=small, seed=seed)
    return roots, counts


def make_folder_tree(root: Path, *, seed: int = 0) -> dict[str, SplitCounts]:
    """A user's own products with mixed-case extensions and both mask namings.

    ``widget``: train/good, test/good, test/scratch with masks named ``<stem>.png`` and one
    ``<stem>_mask.BMP``; ``gadget``: images directly in train/ and no test split.
    """
    rng = np.random.default_rng(seed)
    widget = root / "widget"
    for name in ("a.PNG", "b.JpEg", "c.tif", "d.jpg"):
        write_image(widget / "train" / "good" / name, rng)
    write_image(widget / "test" / "good" / "n1.TIFF", rng)
    for stem, image_ext in (("s1", ".png"), ("s2", ".JPG"), ("s3", ".bmp")):
        write_image(widget / "test" / "scratch" / f"{stem}{image_ext}", rng)
    write_mask(widget / "ground_truth" / "scratch" / "s1.png", rng)
    write_mask(widget / "ground_truth" / "scratch" / "s2.png", rng)
    write_mask(widget / "ground_truth" / "scratch" / "s3_mask.BMP", rng)
    for name in ("g1.png", "g2.Jpg"):
        write_image(root / "gadget" / "train" / name, rng)
    add_shipped_extras(widget, rng)
    add_shipped_extras(root / "gadget", rng)
    return {"widget": SplitCounts(4, 1, 3), "gadget": SplitCounts(2, 0, 0)}


def make_archive(tree: Path, archive: Path, top_folder: str | None = None) -> Path:
    """Pack `tree`'s contents (under `top_folder` if given) as .zip, .tar, .tar.gz or .tar.xz."""
    files = sorted(path for path in tree.rglob("*") if path.is_file())
    names = [(path, str(Path(top_folder or "") / path.relative_to(tree))) for path in files]
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as handle:
            for path, name in names:
                handle.write(path, name)
        return archive
    mode = {".xz": "w:xz", ".gz": "w:gz", ".tar": "w"}[archive.suffix]
    with tarfile.open(archive, mode) as handle:
        for path, name in names:
            handle.add(path, name)
    return archive


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
