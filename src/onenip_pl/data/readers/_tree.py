"""Walking MVTec-style category trees, shared by the mvtec, btad and folder readers.

A category directory holds ``train/<normal>/``, ``test/<normal>/``, ``test/<defect>/`` and
``<mask_dir>/<defect>/`` with one mask per defective image, matched by file stem. Release trees carry
more than that, as their owners ship them: MVTec AD has ``license.txt`` and ``readme.txt`` in every
category, MVTec 3D-AD a ``validation/`` split, users' folders ``Thumbs.db``, notes or a ``_meta/``
folder. So the walk passes over files that are not images (listed in one INFO line) and directories it
does not know (named in one WARNING line), and ``strict=True`` makes both a problem instead. Everything
that is damage stays a problem: an image where none belongs, a defective image without a mask, a mask
without an image, an empty category; the caller raises one DataError listing them all. Names starting
with "." (.DS_Store, AppleDouble ``._x`` files, hidden folders) are operating-system metadata and are
always passed over.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onenip_pl.data.image_io import IMAGE_EXTENSIONS
from onenip_pl.data.records import ImageRecord, Records
from onenip_pl.errors import DataError

log = logging.getLogger(__name__)

NORMAL_DEFECT_TYPE = "good"
_LISTED = 12


@dataclass(frozen=True)
class TreeLayout:
    """How one family of releases names its folders and masks."""

    normal_dir: str = "good"
    mask_dir: str = "ground_truth"
    mask_suffixes: tuple[str, ...] = ("_mask",)
    flat_train_allowed: bool = False


@dataclass
class TreeScan:
    """What a walk found besides images: problems that stop the read, and entries passed over."""

    strict: bool = False
    problems: list[str] = field(default_factory=list)
    passed_over_files: list[Path] = field(default_factory=list)
    passed_over_dirs: list[Path] = field(default_factory=list)

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def pass_over_file(self, path: Path) -> None:
        """A file that is not an image (licence, notes, Thumbs.db): left out, or a problem when strict."""
        if self.strict:
            self.problem(f"file {path} is not an image (data.strict=true); move it out of the data tree")
        else:
            self.passed_over_files.append(path)

    def pass_over_dir(self, path: Path) -> None:
        """A directory the layout does not know (validation/, _meta/): left out, or a problem when strict."""
        if self.strict:
            self.problem(f"directory {path} is not part of the layout (data.strict=true); move it away")
        else:
            self.passed_over_dirs.append(path)

    def finish(self, records: list[ImageRecord], where: str) -> Records:
        """Raise one DataError for every problem, else log what was passed over and return the records."""
        raise_if_problems(self.problems, where)
        if self.passed_over_files:
            log.info(
                "Passed over %d file(s) that are not images in %s: %s",
                len(self.passed_over_files),
                where,
                _listing(self.passed_over_files),
            )
        if self.passed_over_dirs:
            log.warning(
                "Passed over %d directory(ies) the layout does not know in %s (data.strict=true stops on "
                "them): %s",
                len(self.passed_over_dirs),
                where,
                _listing(self.passed_over_dirs),
            )
        return Records(records, self.passed_over_files, self.passed_over_dirs)


def _listing(paths: Sequence[Path]) -> str:
    more = f" ... and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
    return ", ".join(str(path) for path in paths[:_LISTED]) + more


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def visible_entries(directory: Path) -> list[Path]:
    return sorted(entry for entry in directory.iterdir() if not is_hidden(entry))


def list_images(directory: Path, scan: TreeScan) -> list[Path]:
    """The image files directly inside `directory`; other files and sub-directories are passed over."""
    images = []
    for entry in visible_entries(directory):
        if is_image_file(entry):
            images.append(entry)
        elif entry.is_dir():
            scan.pass_over_dir(entry)
        else:
            scan.pass_over_file(entry)
    return images


def duplicate_stems(paths: Iterable[Path]) -> dict[str, list[Path]]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        by_stem[path.stem].append(path)
    return {stem: group for stem, group in by_stem.items() if len(group) > 1}


def pair_masks(
    images: Sequence[Path], mask_dir: Path, suffixes: Sequence[str], scan: TreeScan
) -> dict[Path, Path]:
    """Map each defective image to its mask `<stem><suffix>.<any ext>` inside `mask_dir`."""
    if not mask_dir.is_dir():
        if images:
            scan.problem(
                f"no mask directory {mask_dir} for the {len(images)} defective images in {images[0].parent}; "
                "every defective test image needs a ground-truth mask"
            )
        return {}
    masks = list_images(mask_dir, scan)
    masks_by_stem: dict[str, list[Path]] = defaultdict(list)
    for mask in masks:
        masks_by_stem[mask.stem].append(mask)
    for stem, group in duplicate_stems(images).items():
        shared = ", ".join(map(str, group))
        scan.problem(f"images {shared} share the stem '{stem}', so their masks cannot be told apart")
    pairs: dict[Path, Path] = {}
    claimed: set[Path] = set()
    for image in images:
        candidates = [mask for suffix in suffixes for mask in masks_by_stem.get(image.stem + suffix, [])]
        claimed.update(candidates)
        if not candidates:
            expected = " or ".join(f"{image.stem}{suffix}.png" for suffix in suffixes)
            scan.problem(f"defective image {image} has no mask: expected {expected} in {mask_dir}")
        elif len(candidates) > 1:
            listing = ", ".join(map(str, candidates))
            scan.problem(f"defective image {image} matches several masks: {listing}")
        else:
            pairs[image] = candidates[0]
    for mask in masks:
        if mask not in claimed:
            scan.problem(f"mask {mask} belongs to no image in {images[0].parent if images else mask_dir}")
    return pairs


def looks_like_category(directory: Path) -> bool:
    return (directory / "train").is_dir() or (directory / "test").is_dir()


def select_categories(
    root: Path, requested: Sequence[str] | None, dataset_title: str, scan: TreeScan
) -> list[str]:
    """The requested category directories (all must exist), or every directory under `root` that holds
    train/ or test/; the root's other files and directories (a licence, a readme) are passed over."""
    entries = visible_entries(root)
    if requested:
        names = list(dict.fromkeys(requested))
        missing = [name for name in names if not (root / name).is_dir()]
        if missing:
            available = [entry.name for entry in entries if entry.is_dir()]
            raise DataError(
                f"{dataset_title}: categories {missing} not found under {root}; "
                f"available: {available or 'none'}. Fix data.categories or data.root."
            )
        return names
    directories = [entry for entry in entries if entry.is_dir()]
    categories = [entry for entry in directories if looks_like_category(entry)]
    if not categories:
        if directories:
            raise DataError(_not_a_category_message(directories[0]))
        raise DataError(f"{dataset_title}: no category directories under {root}; is data.root right?")
    for entry in entries:
        if entry.is_file():
            scan.pass_over_file(entry)
        elif entry not in categories:
            scan.pass_over_dir(entry)
    return [entry.name for entry in categories]


def read_category_tree(
    category_dir: Path, category: str, layout: TreeLayout, scan: TreeScan, *, test_required: bool = True
) -> list[ImageRecord]:
    """Records of one category directory; structural problems go to `scan`."""
    if not looks_like_category(category_dir):
        scan.problem(_not_a_category_message(category_dir))
        return []
    _pass_over_others(category_dir, {"train", "test", layout.mask_dir}, scan)
    records = _read_train(category_dir / "train", category, layout, scan)
    test_dir = category_dir / "test"
    if test_dir.is_dir():
        records += _read_test(category_dir, category, layout, scan)
    elif test_required:
        scan.problem(f"{category_dir} has no test/ directory")
    if not records:
        scan.problem(f"category {category_dir} holds no images")
    return records


def _not_a_category_message(directory: Path) -> str:
    nested = [entry.name for entry in visible_entries(directory) if looks_like_category(entry)]
    hint = ""
    if nested:
        hint = f"; it holds category folders ({', '.join(nested[:5])}), so data.root may be {directory}"
    return f"{directory} is not a category directory: it has neither train/ nor test/{hint}"


def _pass_over_others(directory: Path, known: set[str], scan: TreeScan) -> None:
    """Entries of a layout directory other than its known sub-directories: an image there is misplaced
    data (a problem); other files and directories are passed over."""
    for entry in visible_entries(directory):
        if entry.name in known and entry.is_dir():
            continue
        if is_image_file(entry):
            scan.problem(
                f"image {entry} lies outside the layout's folders; expected only {sorted(known)}/ here"
            )
        elif entry.is_dir():
            scan.pass_over_dir(entry)
        else:
            scan.pass_over_file(entry)


def _read_train(train_dir: Path, category: str, layout: TreeLayout, scan: TreeScan) -> list[ImageRecord]:
    if not train_dir.is_dir():
        return []
    normal_dir = train_dir / layout.normal_dir
    if layout.flat_train_allowed and not normal_dir.is_dir():
        images = list_images(train_dir, scan)
    else:
        _pass_over_others(train_dir, {layout.normal_dir}, scan)
        images = list_images(normal_dir, scan) if normal_dir.is_dir() else []
    return [ImageRecord(path, category, "train", 0, None, NORMAL_DEFECT_TYPE) for path in images]


def _read_test(category_dir: Path, category: str, layout: TreeLayout, scan: TreeScan) -> list[ImageRecord]:
    test_dir = category_dir / "test"
    mask_root = category_dir / layout.mask_dir
    records: list[ImageRecord] = []
    defect_dirs: list[str] = []
    for entry in visible_entries(test_dir):
        if not entry.is_dir():
            if is_image_file(entry):
                scan.problem(
                    f"image {entry} lies directly in test/; test images belong in test/<defect type>/"
                )
            else:
                scan.pass_over_file(entry)
            continue
        images = list_images(entry, scan)
        if entry.name == layout.normal_dir:
            records += [ImageRecord(path, category, "test", 0, None, NORMAL_DEFECT_TYPE) for path in images]
            continue
        defect_dirs.append(entry.name)
        masks = pair_masks(images, mask_root / entry.name, layout.mask_suffixes, scan)
        records += [ImageRecord(path, category, "test", 1, masks.get(path), entry.name) for path in images]
    if mask_root.is_dir():
        for entry in visible_entries(mask_root):
            if entry.is_file():
                scan.pass_over_file(entry)
            elif entry.name not in defect_dirs:
                scan.problem(f"masks in {entry} have no test/{entry.name}/ images beside them")
    return records


def raise_if_problems(problems: Sequence[str], where: str) -> None:
    """One DataError naming every problem found, so a user can fix the tree in one pass."""
    if problems:
        listing = "\n".join(f"  - {line}" for line in problems)
        raise DataError(f"{len(problems)} problem(s) reading {where}:\n{listing}")


def require_root(root: str | Path, dataset_title: str, how_to_get: str) -> Path:
    """`root` as a Path, or a DataError saying where the data set was expected and how to get it."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{dataset_title} was expected at {path}, which is not a directory. {how_to_get}")
    return path


def how_to_get(name: str, title: str, page: str, root: Path | str) -> str:
    return (
        f"Get it with `python scripts/prepare_data.py {name} --root {root}` "
        f"(or download {title} from {page} and unpack it there), or point data.root at it."
    )
