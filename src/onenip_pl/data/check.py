"""Validate a data set before any training or evaluation starts, and report every problem at once.

A run that dies after an hour on a truncated JPEG, or that quietly scores a defect without its mask,
wastes far more than the seconds this check takes. ``check_records`` looks at the records a reader
produced and at every file they name; ``check_dataset`` reads and checks in one call (the datamodule
calls it at the start of every train and eval); ``python -m onenip_pl.check experiment=visa``
does the same from the command line and prints the counts found beside the official ones.

How deeply files are read (``decode``):
  * ``"header"`` (or False): open each file and read its size; catches missing, empty and non-image files.
  * ``"verify"`` (or True, the default): also prove the pixel data is whole. PNGs are verified by
    the CRC of every chunk (no inflating needed); JPEGs are decoded at 1/8 scale, which still reads the
    whole compressed stream; other formats are decoded in full. Truncated or corrupt files are caught
    at about a third of the cost of a full decode.
  * ``"full"``: decode every image and mask exactly as training will (``image_io``).
Files are read by a thread pool, since Pillow releases the GIL while decoding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError
from rich.table import Table

from onenip_pl.data.image_io import read_mask, read_rgb
from onenip_pl.data.official_counts import (
    BENCHMARK_CATEGORIES,
    BENCHMARK_TITLES,
    BENCHMARK_TOTALS,
    DATASET_BENCHMARKS,
    DTD_CLASSES,
    DTD_IMAGES,
    PER_CATEGORY,
    SplitCounts,
)
from onenip_pl.data.readers import read_dataset
from onenip_pl.data.readers._tree import TreeScan, list_images, visible_entries
from onenip_pl.data.records import ImageRecord, Records
from onenip_pl.errors import ConfigError, DataError

DecodeLevel = Literal["header", "verify", "full"]
DECODE_LEVELS: tuple[str, ...] = ("header", "verify", "full")
TRAIN_ONLY_ALLOWED = frozenset({"folder"})


@dataclass(frozen=True)
class CountRow:
    """Image counts found for one category (or a total) beside the official release's, if known."""

    name: str
    found: SplitCounts
    official: SplitCounts | None = None

    @property
    def matches_official(self) -> bool | None:
        return None if self.official is None else self.found == self.official


@dataclass
class CheckReport:
    """The records checked, counts per category and split, problems that must be fixed, and notes."""

    dataset: str | None
    decode: DecodeLevel
    records: list[ImageRecord] = field(default_factory=list)
    rows: list[CountRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_checked: int = 0
    passed_over_files: list[Path] = field(default_factory=list)
    passed_over_dirs: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self) -> str:
        listing = "\n".join(f"  - {line}" for line in self.problems)
        return (
            f"{len(self.problems)} problem(s) in data set {self.dataset or '(unnamed)'}:\n{listing}\n"
            "Fix them (or point data.root/data.categories elsewhere) and run the check again: "
            "python -m onenip_pl.data.check <your overrides>"
        )

    def raise_if_problems(self) -> None:
        if self.problems:
            raise DataError(self.message())

    def table(self) -> Table:
        """A rich table: found counts, and 'found / official' where the official count is known."""
        table = Table(title=f"data set {self.dataset or '(unnamed)'}: images found / official release")
        for column in ("category", "train", "test normal", "test anomalous", "status"):
            table.add_column(column, justify="left" if column in ("category", "status") else "right")
        for row in self.rows:
            style, status = {None: ("", ""), True: ("green", "matches"), False: ("yellow", "differs")}[
                row.matches_official
            ]
            cells = [_count_cell(row, attribute) for attribute in ("train", "test_normal", "test_anomalous")]
            table.add_row(row.name, *cells, status, style=style)
        return table


@dataclass(frozen=True)
class FileState:
    """(height, width) of a readable file, or why it could not be read."""

    size: tuple[int, int] | None
    error: str | None = None


def check_records(
    records: Sequence[ImageRecord],
    dataset: str | None = None,
    *,
    decode: bool | DecodeLevel = True,
    strict_counts: bool = False,
    raise_on_problems: bool = True,
    workers: int | None = None,
) -> CheckReport:
    """Check records and their files; raise one DataError listing every problem unless told not to.

    Problems: a category without training images, a benchmark category without test images, an
    anomalous training image, an anomalous test image without a mask (or a normal one with a mask),
    an image listed twice, a missing or unreadable image or mask, and a mask whose size differs from
    its image's. Counts that differ from the official release are notes, or problems when
    `strict_counts` is set.
    """
    level = decode_level(decode)
    report = CheckReport(dataset=dataset, decode=level, records=list(records))
    if isinstance(records, Records):
        report.passed_over_files = records.passed_over_files
        report.passed_over_dirs = records.passed_over_dirs
    if not records:
        report.problems.append("no images at all: the reader found nothing under data.root")
    per_category = count_by_category(records)
    report.rows = count_rows(dataset, per_category)
    report.problems += _split_problems(dataset, per_category, report.notes)
    report.problems += _record_problems(records)
    report.problems += _file_problems(records, level, workers)
    report.files_checked = len({record.path for record in records} | _mask_paths(records))
    mismatches = _count_mismatches(report.rows)
    (report.problems if strict_counts else report.notes).extend(mismatches)
    if raise_on_problems:
        report.raise_if_problems()
    return report


def check_dataset(
    dataset: str,
    root: str | Path | Mapping[str, str | Path],
    categories: Sequence[str] | None = None,
    *,
    decode: bool | DecodeLevel = True,
    strict_counts: bool = False,
    raise_on_problems: bool = True,
    strict: bool = False,
    **options: object,
) -> CheckReport:
    """Read data set `dataset` under `root` and check it (see `check_records`); ``strict`` stops on the
    entries a reader would pass over."""
    records = read_dataset(dataset, root, categories, strict, **options)
    return check_records(
        records, dataset, decode=decode, strict_counts=strict_counts, raise_on_problems=raise_on_problems
    )


def decode_level(decode: bool | str) -> DecodeLevel:
    if decode is True:
        return "verify"
    if decode is False:
        return "header"
    if decode not in DECODE_LEVELS:
        raise ConfigError(f"decode={decode!r} is not one of True, False, {DECODE_LEVELS}")
    return decode  # type: ignore[return-value]


def count_by_category(records: Iterable[ImageRecord]) -> dict[str, SplitCounts]:
    """Counts per category, in the order categories first appear."""
    counts: dict[str, SplitCounts] = {}
    for record in records:
        if record.split == "train":
            step = SplitCounts(train=1)
        elif record.label:
            step = SplitCounts(test_anomalous=1)
        else:
            step = SplitCounts(test_normal=1)
        counts[record.category] = counts.get(record.category, SplitCounts()) + step
    return counts


def count_rows(dataset: str | None, per_category: Mapping[str, SplitCounts]) -> list[CountRow]:
    """One row per category, then a total per benchmark (official only when all its categories are here)."""
    benchmarks = DATASET_BENCHMARKS.get(dataset or "", ())
    owned = {name for benchmark in benchmarks for name in BENCHMARK_CATEGORIES[benchmark]}
    rows = [
        CountRow(name, found, PER_CATEGORY.get(name) if name in owned else None)
        for name, found in per_category.items()
    ]
    for benchmark in benchmarks:
        names = BENCHMARK_CATEGORIES[benchmark]
        present = [name for name in names if name in per_category]
        if not present:
            continue
        found = sum((per_category[name] for name in present), SplitCounts())
        complete = len(present) == len(names)
        label = f"{BENCHMARK_TITLES[benchmark]} total ({len(present)}/{len(names)} categories)"
        rows.append(CountRow(label, found, BENCHMARK_TOTALS[benchmark] if complete else None))
    if len(benchmarks) != 1 or set(per_category) - owned:
        rows.append(CountRow("all categories", sum(per_category.values(), SplitCounts())))
    return rows


def inspect_file(path: Path, level: DecodeLevel, *, is_mask: bool = False) -> FileState:
    """Size of an image or mask file read at `level`, or the reason it cannot be read."""
    if level == "full":
        try:
            array = read_mask(path) if is_mask else read_rgb(path)
        except DataError as err:
            return FileState(None, str(err))
        return FileState((array.shape[0], array.shape[1]))
    try:
        with Image.open(path) as image:
            size = (image.height, image.width)
            if level == "verify":
                _verify_pixel_data(image)
    except FileNotFoundError:
        return FileState(None, f"file not found: {path}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return FileState(
            None, f"cannot read {path}: {err}; the file is corrupt, truncated or not an image, so replace it"
        )
    return FileState(size)


def _verify_pixel_data(image: Image.Image) -> None:
    if image.format == "PNG":
        image.verify()
        return
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()


def _split_problems(
    dataset: str | None, per_category: Mapping[str, SplitCounts], notes: list[str]
) -> list[str]:
    problems = []
    for name, counts in per_category.items():
        if counts.train == 0:
            problems.append(
                f"category '{name}' has no training images ({counts.test} test images): OneNIP needs normal "
                "training images of every category, both to learn from and as prompts"
            )
        if counts.test == 0 and counts.train:
            message = f"category '{name}' has training images only, no test images"
            if dataset in TRAIN_ONLY_ALLOWED:
                notes.append(f"{message}: it can be trained on but not evaluated")
            else:
                problems.append(f"{message}; the test split is missing")
    return problems


def _record_problems(records: Sequence[ImageRecord]) -> list[str]:
    problems = []
    seen: dict[Path, int] = {}
    for record in records:
        seen[record.path] = seen.get(record.path, 0) + 1
        if record.split not in ("train", "test"):
            problems.append(f"{record.path}: split {record.split!r} is neither train nor test")
        if record.label not in (0, 1):
            problems.append(f"{record.path}: label {record.label!r} is neither 0 (normal) nor 1 (anomalous)")
        if record.split == "train" and record.label == 1:
            problems.append(f"training image {record.path} is labelled anomalous; train on normals only")
        if record.split == "test" and record.label == 1 and record.mask_path is None:
            problems.append(f"defective test image {record.path} has no mask")
        if record.label == 0 and record.mask_path is not None:
            problems.append(f"normal image {record.path} has a mask ({record.mask_path})")
    problems += [f"image {path} is listed {count} times" for path, count in seen.items() if count > 1]
    return problems


def _mask_paths(records: Iterable[ImageRecord]) -> set[Path]:
    return {record.mask_path for record in records if record.mask_path is not None}


def _file_problems(records: Sequence[ImageRecord], level: DecodeLevel, workers: int | None) -> list[str]:
    images = sorted({record.path for record in records})
    masks = sorted(_mask_paths(records))
    states = _inspect_all(images, masks, level, workers)
    problems = [state.error for state in states.values() if state.error]
    for record in records:
        if record.mask_path is None:
            continue
        image_size, mask_size = states[record.path].size, states[record.mask_path].size
        if image_size and mask_size and image_size != mask_size:
            problems.append(
                f"mask {record.mask_path} is {mask_size[1]}x{mask_size[0]} (WxH) but its image "
                f"{record.path} is {image_size[1]}x{image_size[0]}"
            )
    return problems


def _inspect_all(
    images: Sequence[Path], masks: Sequence[Path], level: DecodeLevel, workers: int | None
) -> dict[Path, FileState]:
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        image_states = pool.map(lambda path: inspect_file(path, level), images)
        mask_states = pool.map(lambda path: inspect_file(path, level, is_mask=True), masks)
        return dict(zip(images, image_states, strict=True)) | dict(zip(masks, mask_states, strict=True))


def _count_mismatches(rows: Iterable[CountRow]) -> list[str]:
    return [
        f"{row.name}: found {_triple(row.found)} (train / test normal / test anomalous) but the official "
        f"release has {_triple(row.official)}; an interrupted download or a different release?"
        for row in rows
        if row.official is not None and row.found != row.official
    ]


def _triple(counts: SplitCounts) -> str:
    return f"{counts.train} / {counts.test_normal} / {counts.test_anomalous}"


def _count_cell(row: CountRow, attribute: str) -> str:
    found = getattr(row.found, attribute)
    return str(found) if row.official is None else f"{found} / {getattr(row.official, attribute)}"


@dataclass
class TextureReport:
    """What a DTD-style texture folder (``<root>/images/<class>/*.jpg``) holds."""

    root: Path
    classes: int = 0
    images: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_dtd(
    root: str | Path, *, decode: bool | DecodeLevel = True, raise_on_problems: bool = True
) -> TextureReport:
    """Check the texture source used for anomaly synthesis: every ``images/<class>/`` file readable."""
    root = Path(root).expanduser()
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(
            f"DTD was expected at {root} (with an images/ folder inside). Get it with "
            f"`python scripts/prepare_data.py dtd --root {root}` or from "
            "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (dtd-r1.0.1.tar.gz)."
        )
    report = TextureReport(root)
    files: list[Path] = []
    # DTD ships images only: anything else in a class folder is a problem
    scan = TreeScan(strict=True)
    for entry in visible_entries(images_dir):
        if entry.is_dir():
            report.classes += 1
            files += list_images(entry, scan)
        else:
            report.problems.append(f"unexpected file {entry}; images/ holds one folder per texture class")
    report.problems += scan.problems
    report.images = len(files)
    if not files:
        report.problems.append(f"no texture images under {images_dir}")
    states = _inspect_all(files, [], decode_level(decode), None)
    report.problems += [state.error for state in states.values() if state.error]
    if (report.classes, report.images) != (DTD_CLASSES, DTD_IMAGES):
        report.notes.append(
            f"found {report.classes} classes and {report.images} images; the DTD release has "
            f"{DTD_CLASSES} and {DTD_IMAGES} (fine for a subset)"
        )
    if raise_on_problems and report.problems:
        listing = "\n".join(f"  - {line}" for line in report.problems)
        raise DataError(f"{len(report.problems)} problem(s) in the DTD textures at {root}:\n{listing}")
    return report
