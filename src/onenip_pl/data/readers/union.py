"""MVTec AD + VisA + BTAD read as one 30-category data set, for training a single unified model.

``root`` maps each part to its own root, e.g. ``{mvtec: data/mvtec, visa: data/visa, btad:
data/btad}`` (Hydra hands over a DictConfig; any Mapping works). Requested categories are routed to
the release that owns the name; category names must be unique across the three, which is checked.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from onenip_pl.data.official_counts import BENCHMARK_CATEGORIES
from onenip_pl.data.readers.btad import read_btad
from onenip_pl.data.readers.mvtec import read_mvtec
from onenip_pl.data.readers.visa import read_visa
from onenip_pl.data.records import ImageRecord, Records
from onenip_pl.errors import ConfigError, DataError

PART_READERS: dict[str, Callable[..., list[ImageRecord]]] = {
    "mvtec": read_mvtec,
    "visa": read_visa,
    "btad": read_btad,
}


def read_mvtec_visa_btad(
    root: Mapping[str, str | Path], categories: Sequence[str] | None = None, strict: bool = False
) -> Records:
    """Records of the three releases together; each keeps its own category names."""
    roots = _part_roots(root)
    wanted = _route_categories(categories)
    records = Records()
    owners: dict[str, set[str]] = defaultdict(set)
    for part, reader in PART_READERS.items():
        if wanted is not None and not wanted[part]:
            continue
        part_records = reader(roots[part], wanted[part] if wanted is not None else None, strict=strict)
        for record in part_records:
            owners[record.category].add(part)
        records.absorb(part_records)
    clashes = {category: sorted(parts) for category, parts in owners.items() if len(parts) > 1}
    if clashes:
        raise DataError(
            f"category names must be unique across MVTec AD, VisA and BTAD, but {clashes} appear in "
            "several of data.root's trees; remove the stray category folders"
        )
    return records


def _part_roots(root: object) -> dict[str, str | Path]:
    example = "{mvtec: /data/mvtec, visa: /data/visa, btad: /data/btad}"
    if not isinstance(root, Mapping):
        raise ConfigError(
            f"data.root for dataset mvtec_visa_btad must map each part to its root, e.g. "
            f"{example}; got {root!r}"
        )
    missing = [part for part in PART_READERS if not root.get(part)]
    unknown = [key for key in root if key not in PART_READERS]
    if missing or unknown:
        raise ConfigError(
            f"data.root for dataset mvtec_visa_btad needs exactly the keys {list(PART_READERS)}; "
            f"missing or empty: {missing}, unknown: {unknown}. Example: {example}"
        )
    return {part: root[part] for part in PART_READERS}


def _route_categories(categories: Sequence[str] | None) -> dict[str, list[str]] | None:
    """Requested names grouped by the release that owns them; None means every category."""
    if not categories:
        return None
    routed: dict[str, list[str]] = {part: [] for part in PART_READERS}
    unknown = []
    for name in dict.fromkeys(categories):
        part = next((part for part, names in BENCHMARK_CATEGORIES.items() if name in names), None)
        if part is None:
            unknown.append(name)
        else:
            routed[part].append(name)
    if unknown:
        known = [name for names in BENCHMARK_CATEGORIES.values() for name in names]
        raise ConfigError(f"data.categories {unknown} are in none of MVTec AD, VisA, BTAD; pick from {known}")
    return routed
