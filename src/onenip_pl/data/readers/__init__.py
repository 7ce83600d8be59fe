"""Data-set readers: each turns a tree on disk into ImageRecords, exactly as the release ships it.

``read_dataset(name, root, categories, **options)`` is the one entry point the rest of the package
uses; ``READERS`` maps the names accepted in ``data.dataset`` to the reader functions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from onenip_pl.data.readers.btad import read_btad
from onenip_pl.data.readers.folder import read_folder
from onenip_pl.data.readers.mvtec import read_mvtec
from onenip_pl.data.readers.union import read_mvtec_visa_btad
from onenip_pl.data.readers.visa import read_visa
from onenip_pl.data.records import ImageRecord, Records
from onenip_pl.errors import ConfigError

READERS: dict[str, Callable[..., list[ImageRecord]]] = {
    "mvtec": read_mvtec,
    "visa": read_visa,
    "btad": read_btad,
    "mvtec_visa_btad": read_mvtec_visa_btad,
    "folder": read_folder,
}

MAPPING_ROOT_DATASETS = frozenset({"mvtec_visa_btad"})

__all__ = ["READERS", "read_dataset", "normalize_categories"]


def read_dataset(
    name: str,
    root: str | Path | Mapping[str, str | Path],
    categories: Sequence[str] | None = None,
    strict: bool = False,
    **options: object,
) -> Records:
    """Records of data set `name` under `root`; `categories` None or empty means all of them. ``strict``
    stops on entries the readers would pass over (files that are not images, unknown directories)."""
    reader = READERS.get(name)
    if reader is None:
        raise ConfigError(f"data.dataset={name!r} is unknown; choose one of {sorted(READERS)}")
    _check_root(name, root)
    chosen = normalize_categories(categories)
    try:
        inspect.signature(reader).bind(root, chosen, strict=strict, **options)
    except TypeError as err:
        raise ConfigError(f"options {sorted(options)} do not fit data.dataset={name!r}: {err}") from err
    records = reader(root, chosen, strict=strict, **options)
    return records if isinstance(records, Records) else Records(records)


def normalize_categories(categories: str | Sequence[str] | None) -> list[str] | None:
    """A list of category names (a lone string is one name), or None for all categories."""
    if categories is None:
        return None
    if isinstance(categories, str):
        categories = [categories]
    names = [str(name) for name in categories]
    if any(not name.strip() for name in names):
        raise ConfigError(f"data.categories contains an empty name: {names}")
    return names or None


def _check_root(name: str, root: object) -> None:
    if root is None or (isinstance(root, str) and not root.strip()):
        raise ConfigError(f"data.root is not set for data.dataset={name!r}; set it to the data set's folder")
    if name in MAPPING_ROOT_DATASETS:
        return
    if isinstance(root, Mapping):
        raise ConfigError(f"data.root for data.dataset={name!r} must be one directory, not {root!r}")
    if not isinstance(root, str | Path):
        raise ConfigError(f"data.root must be a path, got {type(root).__name__}: {root!r}")
