"""Walking MVTec-style category trees, shared by the mvtec, btad and folder readers.

A category directory holds ``train/<normal>/``, ``test/<normal>/``, ``test/<defect>/`` and
``<mask_dir>/<defect>/`` with one mask per defective image, matched by file stem. The walk is strict:
every entry it does not understand (a stray file, an unexpected directory, a mask without an image)
becomes a problem line, and the caller raises one DataError listing them all, so nothing is dropped
without the user hearing of it. Names starting with "." (.DS_Store, AppleDouble ``._x`` files,
hidden folders) are operating-system metadata and are passed over on purpose.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from onenip_pl.data.image_io import IMAGE_EXTENSIONS
from onenip_pl.data.records import ImageRecord
from onenip_pl.errors import DataError

NORMAL_DEFECT_TYPE = "good"


@dataclass(frozen=True)
class TreeLayout:
    """How one family of releases names its folders and masks."""

    normal_dir: str = "good"
    mask_dir: str = "ground_truth"
    mask_suffixes: tuple[str, ...] = ("_mask",)
    flat_train_allowed: bool = False


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def visible_entries(directory: Path) -> list[Path]:
    return sorted(entry for entry in directory.iterdir() if not is_hidden(entry))


def list_images(directory: Path, problems: list[str]) -> list[Path]:
    """The image files directly inside `directory`; anything else there is reported as a problem."""
    images = []
    for entry in visible_entries(directory):
        if is_image_file(entry):
            images.append(entry)
        elif entry.is_dir():
            problems.append(f"unexpected directory {entry} in an image directory; move its images up or away")
        else:
            problems.append(
                f"unexpected file {entry}: not an image ({', '.join(IMAGE_EXTENSIONS)}, any case); "
                "remove it or move it out of the data tree"
            )
    return images


def duplicate_stems(paths: Iterable[Path]) -> dict[str, list[Path]]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        by_stem[path.stem].append(path)
    return {stem: group for stem, group in by_stem.items() if len(group) > 1}


def pair_masks(
    images: Sequence[Path], mask_dir: Path, suffixes: Sequence[str], problems: list[str]
) -> dict[Path, Path]:
    """Map each defective image to its mask `<stem><suffix>.<any ext>` inside `mask_dir`."""
    if not mask_dir.is_dir():
        if images:
            problems.append(
                f"no mask directory {mask_dir} for the {len(images)} defective images in {images[0].parent}; "
                "every defective test image needs a ground-truth mask"
            )
        return {}
    masks = list_images(mask_dir, problems)
    masks_by_stem: dict[str, list[Path]] = defaultdict(list)
    for mask in masks:
        masks_by_stem[mask.stem].append(mask)
    for stem, group in duplicate_stems(images).items():
        shared = ", ".join(map(str, group))
        problems.append(f"images {shared} share the stem '{stem}', so their masks cannot be told apart")
    pairs: dict[Path, Path] = {}
    claimed: set[Path] = set()
    for image in images:
        candidates = [mask for suffix in suffixes for mask in masks_by_stem.get(image.stem + suffix, [])]
        claimed.update(candidates)
        if not candidates:
            expected = " or ".join(f"{image.stem}{suffix}.png" for suffix in suffixes)
            problems.append(f"defective image {image} has no mask: expected {expected} in {mask_dir}")
        elif len(candidates) > 1:
            listing = ", ".join(map(str, candidates))
            problems.append(f"defective image {image} matches several masks: {listing}")
        else:
            pairs[image] = candidates[0]
    for mask in masks:
        if mask not in claimed:
            problems.append(f"mask {mask} belongs to no image in {images[0].parent if images else mask_dir}")
    return pairs


def looks_like_category(directory: Path) -> bool:
    return (directory / "train").is_dir() or (directory / "test").is_dir()


def select_categories(root: Path, requested: Sequence[str] | None, dataset_title: str) -> list[str]:
    """The requested category directories (all must exist), or every visible directory under `root`."""
    if requested:
        names = list(dict.fromkeys(requested))
        missing = [name for name in names if not (root / name).is_dir()]
        if missing:
            available = [entry.name for entry in visible_entries(root) if entry.is_dir()]
            raise DataError(
                f"{dataset_title}: categories {missing} not found under {root}; "
                f"available: {available or 'none'}. Fix data.categories or data.root."
            )
        return names
    names = [entry.name for entry in visible_entries(root) if entry.is_dir()]
    if not names:
        raise DataError(f"{dataset_title}: no category directories under {root}; is data.root right?")
    return names


def read_category_tree(
    category_dir: Path, category: str, layout: TreeLayout, problems: list[str], *, test_required: bool = True
) -> list[ImageRecord]:
    """Records of one category directory; structural problems are appended to `problems`."""
    if not looks_like_category(category_dir):
        problems.append(_not_a_category_message(category_dir))
        return []
    _report_unexpected_entries(category_dir, {"train", "test", layout.mask_dir}, problems)
    records = _read_train(category_dir / "train", category, layout, problems)
    test_dir = category_dir / "test"
    if test_dir.is_dir():
        records += _read_test(category_dir, category, layout, problems)
    elif test_required:
        problems.append(f"{category_dir} has no test/ directory")
    if not records:
        problems.append(f"category {category_dir} holds no images")
    return records


def _not_a_category_message(directory: Path) -> str:
    nested = [entry.name for entry in visible_entries(directory) if looks_like_category(entry)]
    hint = ""
    if nested:
        hint = f"; it holds category folders ({', '.join(nested[:5])}), so data.root may be {directory}"
    return f"{directory} is not a category directory: it has neither train/ nor test/{hint}"


def _report_unexpected_entries(directory: Path, allowed: set[str], problems: list[str]) -> None:
    for entry in visible_entries(directory):
        if entry.name not in allowed or not entry.is_dir():
            problems.append(f"unexpected entry {entry}; expected only {', '.join(sorted(allowed))}/ here")


def _read_train(train_dir: Path, category: str, layout: TreeLayout, problems: list[str]) -> list[ImageRecord]:
    if not train_dir.is_dir():
        return []
    normal_dir = train_dir / layout.normal_dir
    if layout.flat_train_allowed and not normal_dir.is_dir():
        images = list_images(train_dir, problems)
    else:
        _report_unexpected_entries(train_dir, {layout.normal_dir}, problems)
        images = list_images(normal_dir, problems) if normal_dir.is_dir() else []
    return [ImageRecord(path, category, "train", 0, None, NORMAL_DEFECT_TYPE) for path in images]


def _read_test(
    category_dir: Path, category: str, layout: TreeLayout, problems: list[str]
) -> list[ImageRecord]:
    test_dir = category_dir / "test"
    mask_root = category_dir / layout.mask_dir
    records: list[ImageRecord] = []
    defect_dirs: list[str] = []
    for entry in visible_entries(test_dir):
        if not entry.is_dir():
            problems.append(f"unexpected file {entry}; test images belong in test/<defect type>/ folders")
            continue
        images = list_images(entry, problems)
        if entry.name == layout.normal_dir:
            records += [ImageRecord(path, category, "test", 0, None, NORMAL_DEFECT_TYPE) for path in images]
            continue
        defect_dirs.append(entry.name)
        masks = pair_masks(images, mask_root / entry.name, layout.mask_suffixes, problems)
        records += [ImageRecord(path, category, "test", 1, masks.get(path), entry.name) for path in images]
    if mask_root.is_dir():
        for entry in visible_entries(mask_root):
            if entry.name not in defect_dirs:
                problems.append(f"masks in {entry} have no test/{entry.name}/ images beside them")
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
