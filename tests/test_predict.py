"""The predict command: mixed formats and a corrupt file in a directory, maps at original size, exit code."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onenip_pl.config import compose
from onenip_pl.errors import ConfigError
from onenip_pl.predict import output_names, predict_files

pytest_plugins = ["fixtures_checkpoint"]  # the shared tiny_checkpoint fixture


@pytest.fixture(scope="module")
def mixed_dir(tiny_demo_root: Path, tmp_path_factory) -> Path:
    """One demo test image saved in every supported format and mode, plus a truncated PNG and a text file."""
    directory = tmp_path_factory.mktemp("mixed")
    source = Image.open(sorted(tiny_demo_root.glob("wood/test/*/*.png"))[0]).convert("RGB")
    gray = source.convert("L")
    (directory / "sub").mkdir()
    source.save(directory / "rgb.png")
    source.resize((150, 100)).save(directory / "wide.jpg", quality=92)
    source.save(directory / "rgb.bmp")
    gray.resize((96, 80)).save(directory / "gray.tif")
    gray.save(directory / "gray.png")
    source.convert("RGBA").save(directory / "sub" / "rgba.png")
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(directory / "gray16.png")
    truncated = (directory / "rgb.png").read_bytes()[:300]
    (directory / "broken.png").write_bytes(truncated)
    (directory / "notes.txt").write_text("not an image")
    return directory


def predict_overrides(checkpoint: Path, input_spec: Path | str, output_dir: Path, *extra: str) -> list[str]:
    return [f"ckpt_path={checkpoint}", f"input={input_spec}", f"paths.output_dir={output_dir}", *extra]


def read_rows(csv_path: Path) -> dict[str, dict[str, str]]:
    with open(csv_path, newline="") as handle:
        return {Path(row["path"]).name: row for row in csv.DictReader(handle)}


def test_directory_of_mixed_formats_with_a_corrupt_file(
    tiny_checkpoint: Path, mixed_dir: Path, tmp_path: Path
) -> None:
    cfg = compose(
        "predict", predict_overrides(tiny_checkpoint, mixed_dir, tmp_path, "maps=both", "batch_size=4")
    )
    report = predict_files(cfg)

    assert [Path(path).name for path, _ in report.failures] == ["broken.png"]
    assert "broken.png" in report.failures[0][1] and "truncated" in report.failures[0][1]
    rows = read_rows(report.csv_path)
    assert sorted(rows) == [
        "gray.png",
        "gray.tif",
        "gray16.png",
        "rgb.bmp",
        "rgb.png",
        "rgba.png",
        "wide.jpg",
    ]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["failed"][0]["path"].endswith("broken.png") and info["predicted"] == 7
    for name, row in rows.items():
        original = Image.open(row["path"])
        height, width = original.height, original.width
        anomaly_map = np.load(tmp_path / row["anomaly_map"])
        assert anomaly_map.dtype == np.float32 and anomaly_map.shape == (height, width), name
        assert row["category"] == "wood", name
        assert row["decision"] in ("normal", "anomalous")
        assert row["decision"] == (
            "anomalous"
            if float(row["image_score"]) > info["thresholds"]["per_category"]["wood"]["image"]
            else "normal"
        )
        overlay = Image.open(tmp_path / row["overlay"])
        assert overlay.size == (width, height) and overlay.mode == "RGB"
        png16 = Image.open(tmp_path / row["anomaly_map"].replace(".npy", ".png"))
        assert png16.mode.startswith("I;16") and png16.size == (width, height)
        expected = np.clip(
            np.round(anomaly_map.astype(np.float64) / info["png16_full_scale"] * 65535), 0, 65535
        )
        np.testing.assert_array_equal(np.asarray(png16), expected.astype(np.uint16))
    assert rows["rgba.png"]["anomaly_map"] == "maps/sub/rgba.npy"
    # the 16-bit file holds the 8-bit gray values x 257, the BMP the PNG's pixels: the same images
    for twin, reference in (("gray16.png", "gray.png"), ("rgb.bmp", "rgb.png"), ("rgba.png", "rgb.png")):
        assert float(rows[twin]["image_score"]) == pytest.approx(
            float(rows[reference]["image_score"]), rel=1e-5
        )


def test_cli_names_the_unreadable_file_and_exits_non_zero(
    tiny_checkpoint: Path, mixed_dir: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "onenip_pl.predict",
        *predict_overrides(tiny_checkpoint, f"{mixed_dir}/*.png", tmp_path / "run", "category=weave"),
        f"paths.log_dir={tmp_path}/logs",
    ]
    environment = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "broken.png" in output and "could not be read" in output
    rows = read_rows(tmp_path / "run" / "predictions.csv")
    assert sorted(rows) == ["gray.png", "gray16.png", "rgb.png"]
    assert {row["category"] for row in rows.values()} == {"weave"}
    assert all(row["similarity"] == "" for row in rows.values())


def test_prompt_image_instead_of_a_category(
    tiny_checkpoint: Path, tiny_demo_root: Path, mixed_dir: Path, tmp_path: Path
) -> None:
    prompt = sorted(tiny_demo_root.glob("wood/train/good/*.png"))[0]
    overrides = predict_overrides(
        tiny_checkpoint, mixed_dir / "rgb.png", tmp_path, f"prompt={prompt}", "maps=none", "overlays=false"
    )
    report = predict_files(compose("predict", overrides))
    (row,) = report.rows
    assert row["prompt"] == str(prompt) and row["category"] == ""
    assert row["anomaly_map"] == "" and row["overlay"] == ""
    assert not (tmp_path / "maps").exists()


def test_bad_settings_stop_before_predicting(tiny_checkpoint: Path, mixed_dir: Path, tmp_path: Path) -> None:
    cases = {
        "neither a file": predict_overrides(tiny_checkpoint, tmp_path / "nowhere" / "*.png", tmp_path),
        "not both": predict_overrides(
            tiny_checkpoint, mixed_dir, tmp_path, "category=wood", f"prompt={mixed_dir / 'rgb.png'}"
        ),
        "maps='tiff'": predict_overrides(tiny_checkpoint, mixed_dir, tmp_path, "maps=tiff"),
        "not in the checkpoint's prompt bank": predict_overrides(
            tiny_checkpoint, mixed_dir / "rgb.png", tmp_path, "category=bottle"
        ),
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            predict_files(compose("predict", overrides))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        predict_files(compose("predict", predict_overrides(tiny_checkpoint, empty, tmp_path)))


def test_output_names_mirror_the_tree_and_separate_twins(tmp_path: Path) -> None:
    files = [tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "good" / "b.tif"]
    assert output_names(files, tmp_path) == ["a_png", "a_jpg", "good/b"]
