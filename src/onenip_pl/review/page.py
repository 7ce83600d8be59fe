"""report.html: the review page of a test or predict run, opened from disk without a server or internet.

The page holds the per-category panels (score histogram with the image threshold, TP/FP/TN/FN, the
metrics row, ROC/PR curves) rendered by Jinja2, and every image row as one JSON blob that a small
hand-written script sorts, filters and shows page by page, so 10,000 rows load without freezing. Row
text is set with ``textContent`` and every link is URL-quoted here, so file names with spaces, unicode,
``<``, ``&`` or ``"`` neither break the page nor their links.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from onenip_pl.review.rows import ReviewRow, outcome_counts

TEMPLATES = Path(__file__).parent / "templates"
PAGE_NAME = "report.html"
HISTOGRAM_BINS = 24
_SVG_WIDTH, _SVG_HEIGHT, _SVG_MARGIN = 340, 110, 18


@dataclass(frozen=True)
class Bar:
    """One histogram bar in SVG coordinates."""

    x: float
    y: float
    width: float
    height: float
    kind: str
    count: int


@dataclass(frozen=True)
class Histogram:
    """The score histogram of one category, ready to draw: bars, the threshold's x and the axis ends."""

    bars: list[Bar]
    threshold_x: float | None
    low: float
    high: float
    width: int = _SVG_WIDTH
    height: int = _SVG_HEIGHT
    margin: int = _SVG_MARGIN


def write_review_page(
    rows: Sequence[ReviewRow],
    run_dir: str | Path,
    *,
    title: str,
    labelled: bool,
    results: Mapping[str, Any] | None = None,
    files: Mapping[str, Mapping[str, Path]] | None = None,
) -> Path:
    """Write ``<run_dir>/report.html`` for ``rows`` (pictures already written beside it) and return it.

    ``labelled``: a test run (true labels, correctness filters); else a predict run. ``results`` is the
    test's ``{"per_category": ..., "mean": ...}`` and ``files`` the report's other pictures by kind and
    category (``{"curves": {...}, "visuals": {...}}``), linked from each category's panel.
    """
    run_dir = Path(run_dir)
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["percent"] = _percent
    environment.filters["score"] = _score
    scored = [row for row in rows if not row.error]
    categories = list(dict.fromkeys(row.category for row in scored))
    if results is not None:
        categories = [c for c in results["per_category"] if c in categories] + [
            c for c in categories if c not in results["per_category"]
        ]
    panels = [
        _panel(category, [r for r in scored if r.category == category], labelled, results, files, run_dir)
        for category in categories
    ]
    page = environment.get_template("report.html.j2").render(
        title=title,
        labelled=labelled,
        written=datetime.now().strftime("%Y-%m-%d %H:%M"),
        panels=panels,
        totals=_totals(rows, labelled),
        mean=None if results is None else results.get("mean"),
        style=Markup((TEMPLATES / "report.css").read_text(encoding="utf-8")),
        script=Markup((TEMPLATES / "report.js").read_text(encoding="utf-8")),
        rows_json=Markup(_script_safe_json(_page_data(rows, labelled))),
    )
    path = run_dir / PAGE_NAME
    path.write_text(page, encoding="utf-8")
    return path


def href(relative_path: str) -> str:
    """A link to a file under the run directory, as the page (in the run directory) writes it."""
    return quote(relative_path, safe="/") if relative_path else ""


def _page_data(rows: Sequence[ReviewRow], labelled: bool) -> dict[str, Any]:
    """The rows as compact JSON objects (short keys: a 10,000-row page stays a few MB)."""
    return {
        "labelled": labelled,
        "rows": [
            {
                "n": row.name,
                "src": _file_uri(row.source),
                "c": row.category,
                "s": _finite(row.score),
                "t": _finite(row.image_threshold),
                "d": None if row.decision is None else int(row.decision),
                "y": row.label,
                "o": row.outcome,
                "th": href(row.thumbnail),
                "ot": href(row.overlay_thumbnail),
                "ov": href(row.overlay),
                "e": row.error,
            }
            for row in rows
        ],
    }


def _panel(
    category: str,
    rows: list[ReviewRow],
    labelled: bool,
    results: Mapping[str, Any] | None,
    files: Mapping[str, Mapping[str, Path]] | None,
    run_dir: Path,
) -> dict[str, Any]:
    thresholds = {row.image_threshold for row in rows if row.image_threshold is not None}
    threshold = thresholds.pop() if len(thresholds) == 1 else None
    links = {
        kind: href(Path(pictures[category]).relative_to(run_dir).as_posix())
        for kind, pictures in (files or {}).items()
        if category in pictures and Path(pictures[category]).is_relative_to(run_dir)
    }
    defective = sum(1 for row in rows if row.label == 1)
    return {
        "category": category,
        "images": len(rows),
        "normal": sum(1 for row in rows if row.label == 0),
        "defective": defective,
        "anomalous": sum(1 for row in rows if row.decision),
        "decided": any(row.decision is not None for row in rows),
        "threshold": threshold,
        "counts": outcome_counts(rows) if labelled else None,
        "metrics": None if results is None else results["per_category"].get(category),
        "histogram": _histogram(rows, threshold, labelled),
        "links": links,
        "no_defects": labelled and defective == 0,
    }


def _totals(rows: Sequence[ReviewRow], labelled: bool) -> dict[str, Any]:
    scored = [row for row in rows if not row.error]
    return {
        "images": len(rows),
        "failed": len(rows) - len(scored),
        "anomalous": sum(1 for row in scored if row.decision),
        "undecided": sum(1 for row in scored if row.decision is None),
        "defective": sum(1 for row in scored if row.label == 1),
        "counts": outcome_counts(scored) if labelled else None,
    }


def _histogram(rows: list[ReviewRow], threshold: float | None, labelled: bool) -> Histogram | None:
    """Bars of the normal and defective (or, unlabelled, all) scores side by side in each bin."""
    scores = np.array([row.score for row in rows if row.score is not None and math.isfinite(row.score)])
    if scores.size == 0:
        return None
    ends = [scores.min(), scores.max(), *([threshold] if threshold is not None else [])]
    low, high = float(min(ends)), float(max(ends))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    kinds = {"normal": 0, "defective": 1} if labelled else {"image": None}
    plot_width = _SVG_WIDTH - 2 * _SVG_MARGIN
    plot_height = _SVG_HEIGHT - 2 * _SVG_MARGIN
    counts = {
        kind: np.histogram([r.score for r in rows if label is None or r.label == label], edges)[0]
        for kind, label in kinds.items()
    }
    tallest = max(1, max(int(c.max()) for c in counts.values()))
    bin_width = plot_width / HISTOGRAM_BINS
    bar_width = bin_width / len(kinds)
    bars = [
        Bar(
            x=_SVG_MARGIN + b * bin_width + k * bar_width,
            y=_SVG_MARGIN + plot_height * (1 - int(count) / tallest),
            width=bar_width,
            height=plot_height * int(count) / tallest,
            kind=kind,
            count=int(count),
        )
        for k, (kind, bin_counts) in enumerate(counts.items())
        for b, count in enumerate(bin_counts)
        if count
    ]
    threshold_x = None
    if threshold is not None:
        threshold_x = _SVG_MARGIN + plot_width * (threshold - low) / (high - low)
    return Histogram(bars, threshold_x, low, high)


def _script_safe_json(data: Any) -> str:
    """JSON that cannot close the <script> element it sits in, whatever the file names hold."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _file_uri(source: str) -> str:
    if not source:
        return ""
    try:
        return Path(source).resolve().as_uri()
    except ValueError:
        return ""


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"
