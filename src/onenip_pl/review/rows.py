"""One row of the review page per image: what was decided, by which threshold, and its pictures.

Every verdict here comes from the one decision rule (:func:`onenip_pl.calibration.decision.decide`), so
the page, the W&B table and the test's F1 count the same false positives and false negatives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from onenip_pl.calibration.decision import decide

OUTCOMES = ("TP", "FP", "TN", "FN")


@dataclass(frozen=True)
class ReviewRow:
    """One reviewed image. ``label`` is None in predict runs (no ground truth), ``decision`` None without
    a threshold, ``error`` set (and no score) for an image that could not be read. The picture fields
    are paths relative to the run directory, '' when not written."""

    name: str
    source: str
    category: str
    score: float | None = None
    image_threshold: float | None = None
    decision: bool | None = None
    label: int | None = None
    thumbnail: str = ""
    overlay_thumbnail: str = ""
    overlay: str = ""
    error: str = ""

    @property
    def outcome(self) -> str | None:
        """TP/FP/TN/FN of a decided, labelled image; None otherwise."""
        if self.decision is None or self.label is None:
            return None
        return ("T" if self.decision == bool(self.label) else "F") + ("P" if self.decision else "N")

    def as_dict(self) -> dict:
        return {**asdict(self), "outcome": self.outcome}


def decided_row(
    name: str, source: str, category: str, score: float, image_threshold: float | None, **fields
) -> ReviewRow:
    """A row whose decision is the decision rule applied to ``score`` (no threshold: undecided)."""
    decision = decide(score, image_threshold)
    threshold = image_threshold if decision is not None else None
    return ReviewRow(name, source, category, score, threshold, decision, **fields)


def outcome_counts(rows: Iterable[ReviewRow]) -> dict[str, int]:
    """How many rows are TP, FP, TN and FN (every key present, zero where none)."""
    counts = Counter(row.outcome for row in rows)
    return {outcome: counts[outcome] for outcome in OUTCOMES}
