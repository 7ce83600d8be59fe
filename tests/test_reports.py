"""Report files and tables round-trip the metric values; curves are written as PNG files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from onenip_pl.errors import DataError
from onenip_pl.metrics import CategoryData
from onenip_pl.metrics.reports import format_table, load_results, plot_curves, write_reports

RESULTS = {
    "per_category": {
        "bottle": {"image_AUROC": 0.987654321, "pixel_AP": 0.5},
        "mvtec/cable": {"image_AUROC": 1.0, "pixel_AP": math.nan},
    },
    "mean": {"image_AUROC": 0.9938271605, "pixel_AP": 0.5},
}


def test_format_table_shows_percentages_with_two_decimals() -> None:
    lines = format_table(RESULTS).splitlines()
    assert lines[0].split() == ["category", "image_AUROC", "pixel_AP"]
    assert lines[2].split() == ["bottle", "98.77", "50.00"]
    assert lines[3].split() == ["mvtec/cable", "100.00", "n/a"]
    assert set(lines[4]) <= {"-", " "}
    assert lines[5].split() == ["mean", "99.38", "50.00"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_json_round_trips_with_nan_as_null(tmp_path: Path) -> None:
    paths = write_reports(RESULTS, tmp_path / "run")
    assert paths["json"] == tmp_path / "run" / "metrics.json"
    raw = json.loads(paths["json"].read_text())
    assert raw["per_category"]["mvtec/cable"]["pixel_AP"] is None
    assert raw["per_category"]["bottle"]["image_AUROC"] == 0.987654321
    loaded = load_results(paths["json"])
    assert math.isnan(loaded["per_category"]["mvtec/cable"]["pixel_AP"])
    loaded["per_category"]["mvtec/cable"]["pixel_AP"] = RESULTS["per_category"]["mvtec/cable"]["pixel_AP"]
    assert json.dumps(loaded) == json.dumps(RESULTS)


def test_csv_keeps_full_precision_and_empty_cells_for_nan(tmp_path: Path) -> None:
    with write_reports(RESULTS, tmp_path)["csv"].open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["category", "image_AUROC", "pixel_AP"]
    assert rows[1] == ["bottle", "0.987654321", "0.5"]
    assert rows[2] == ["mvtec/cable", "1.0", ""]
    assert rows[3][0] == "mean" and float(rows[3][1]) == RESULTS["mean"]["image_AUROC"]


def test_markdown_is_a_percent_table(tmp_path: Path) -> None:
    lines = write_reports(RESULTS, tmp_path)["markdown"].read_text().splitlines()
    assert "| category | image_AUROC | pixel_AP |" in lines
    assert "| bottle | 98.77 | 50.00 |" in lines
    assert "| mvtec/cable | 100.00 | n/a |" in lines
    assert lines[-1] == "| **mean** | 99.38 | 50.00 |"


def test_bad_documents_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="summarize"):
        write_reports({"bottle": {"image_AUROC": 1.0}}, tmp_path)
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"bottle": 1.0}))
    with pytest.raises(DataError, match="other.json"):
        load_results(path)


def test_plot_curves_writes_one_png_per_category(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[1:, 4:9, 5:10] = True
    maps = torch.rand(4, 16, 16, generator=generator) + masks
    labels = torch.tensor([0, 1, 1, 1])
    data = {
        "mvtec/bottle": CategoryData(maps.amax(dim=(1, 2)), labels, maps, masks),
        "only_images": CategoryData(torch.tensor([0.2, 0.1]), torch.tensor([0, 1])),
    }
    paths = plot_curves(data, tmp_path / "curves")
    assert paths == {
        "mvtec/bottle": tmp_path / "curves" / "mvtec_bottle_curves.png",
        "only_images": tmp_path / "curves" / "only_images_curves.png",
    }
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
