"""The visual report: bounded sample keeping, the four panels of a row, grid files, and a tiny run that
writes metrics.json/csv/md, visuals/ and curves/ and logs the pictures to W&B."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from matplotlib.image import imread
from wandb_records import logged_values

from onenip_pl.config import compose
from onenip_pl.errors import ConfigError
from onenip_pl.eval import evaluate
from onenip_pl.metrics.visual import SampleKeeper, VisualSample, overlay, sample_panels, write_sample_grids
from onenip_pl.train import train


def _sample(label: int = 1, size: int = 32) -> VisualSample:
    image = torch.full((3, size, size), 200, dtype=torch.uint8)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[8:16, 8:16] = bool(label)
    anomaly_map = torch.linspace(0, 1, size * size).reshape(size, size)
    return VisualSample(image, mask, anomaly_map, label, 0.9, f"/data/cat/test/crack/{label:03d}.png")


def test_sample_keeper_keeps_a_bounded_mix_per_category() -> None:
    keeper = SampleKeeper(3)
    for label in [0, 0, 1, 1, 1, 0, 1]:
        for category in ("a", "b"):
            if keeper.wants(category, label):
                keeper.add(category, label, path=str(label))
    for category in ("a", "b"):
        assert sorted(s["label"] for s in keeper.samples[category]) == [0, 1, 1]
    assert not SampleKeeper(0).wants("a", 1)
    with pytest.raises(ConfigError, match="images_per_category"):
        SampleKeeper(-1)


def test_panels_show_image_mask_overlay_and_thresholded_map() -> None:
    sample = _sample()
    panels = sample_panels(sample, threshold=0.75, low=0.0, high=1.0)
    assert np.array_equal(panels["image"], np.full((32, 32, 3), 200, dtype=np.uint8))
    assert np.array_equal(panels["ground truth"], sample.mask.numpy())
    assert np.array_equal(panels["prediction"], sample.anomaly_map.numpy() >= 0.75)
    assert 0 < panels["prediction"].sum() < 32 * 32
    hottest = np.round(255 * (0.5 * 200 / 255 + 0.5 * np.array(matplotlib.colormaps["jet"](1.0)[:3])))
    assert np.array_equal(panels["anomaly map"][-1, -1], hottest.astype(np.uint8))
    assert panels["anomaly map"].shape == (32, 32, 3) and panels["anomaly map"].dtype == np.uint8
    assert sample_panels(sample, threshold=None, low=0.0, high=1.0)["prediction"] is None
    assert sample_panels(sample, threshold=float("nan"), low=0.0, high=1.0)["prediction"] is None


def test_overlay_clips_to_the_display_range() -> None:
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    anomaly_map = np.array([[-5.0, 0.0], [1.0, 9.0]])
    coloured = overlay(image, anomaly_map, low=0.0, high=1.0)
    assert np.array_equal(coloured[0, 0], coloured[0, 1])
    assert np.array_equal(coloured[1, 0], coloured[1, 1])
    assert not np.array_equal(coloured[0, 0], coloured[1, 1])


def test_grids_have_one_row_per_sample(tmp_path: Path) -> None:
    paths = write_sample_grids(
        {"bottle": [_sample(0), _sample(1)], "mvtec/cable": [_sample(1)]}, tmp_path, 0.5
    )
    assert paths == {"bottle": tmp_path / "bottle.png", "mvtec/cable": tmp_path / "mvtec_cable.png"}
    two_rows, one_row = imread(paths["bottle"]), imread(paths["mvtec/cable"])
    assert two_rows.shape[1] == one_row.shape[1]
    assert two_rows.shape[0] > 1.7 * one_row.shape[0]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_run_writes_every_report_and_logs_pictures_to_wandb(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    overrides = tiny_overrides(
        tiny_demo_root,
        tmp_path,
        "logger=wandb",
        "callbacks.report.images_per_category=2",
        "callbacks.report.curves=true",
    )
    train(compose("train", overrides))
    categories = sorted(p.name for p in tiny_demo_root.iterdir() if p.is_dir())

    report = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(report["per_category"]) == categories
    for values in [*report["per_category"].values(), report["mean"]]:
        assert list(values)[:4] == ["image_AUROC", "image_AP", "image_F1max", "image_F1"]
        assert list(values)[-1] == "pixel_F1"
        assert values["image_F1"] is None or 0.0 <= values["image_F1"] <= 1.0
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [row["category"] for row in rows] == [*categories, "mean"]
    assert float(rows[-1]["pixel_F1"]) == pytest.approx(report["mean"]["pixel_F1"], rel=1e-12)
    markdown = (tmp_path / "metrics.md").read_text()
    assert "| image_F1 |" in markdown and "pixel_F1 |" in markdown

    for category in categories:
        grid = imread(tmp_path / "visuals" / f"{category}.png")
        curves = imread(tmp_path / "curves" / f"{category}_curves.png")
        assert grid.shape[0] < grid.shape[1], "two rows of four panels are wider than tall"
        assert curves.shape[0] > 100 and curves.shape[1] > 100

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = logged_values(run)
    for kind in ("visuals", "curves"):
        assert logged[f"test/{kind}/count"] == [len(categories)]
        assert logged[f"test/{kind}/captions"] == [categories]
    assert logged["test/per_category/_type"] == ["table-file"]
    assert len(list((run / "files" / "media" / "images").rglob("*.png"))) == 2 * len(categories)

    eval_overrides = tiny_overrides(
        tiny_demo_root,
        tmp_path / "eval",
        "logger=none",
        "callbacks.report.images_per_category=0",
        "callbacks.report.curves=false",
    )
    evaluate(compose("eval", [*eval_overrides, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]))
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert not (tmp_path / "eval" / "visuals").exists() and not (tmp_path / "eval" / "curves").exists()
