"""The built-in demo data set: MVTec AD layout, determinism, idempotence, safe regeneration, real defects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onenip_pl.data.demo import DEMO_CATEGORIES, MARKER_NAME, generate_demo_dataset, render_demo_image
from onenip_pl.errors import ConfigError, DataError

SMALL = {"image_size": 96, "num_train": 3, "num_test_good": 2, "num_test_defect": 4}


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "set", seed=0, **SMALL)


def test_layout_is_exactly_mvtec(demo_root):
    expected = {MARKER_NAME}
    for category, kinds in DEMO_CATEGORIES.items():
        expected |= {f"{category}/train/good/{i:03d}.png" for i in range(SMALL["num_train"])}
        expected |= {f"{category}/test/good/{i:03d}.png" for i in range(SMALL["num_test_good"])}
        for number in range(SMALL["num_test_defect"]):
            kind, index = kinds[number % len(kinds)], number // len(kinds)
            expected |= {f"{category}/test/{kind}/{index:03d}.png"}
            expected |= {f"{category}/ground_truth/{kind}/{index:03d}_mask.png"}
    assert set(all_files(demo_root)) == expected
    assert len(DEMO_CATEGORIES) >= 3


def test_images_and_masks_pair_up(demo_root):
    size = SMALL["image_size"]
    for category in DEMO_CATEGORIES:
        for image_path in sorted((demo_root / category).glob("*/*/*.png")):
            if "ground_truth" in image_path.parts:
                continue
            image = pixels(image_path)
            assert image.shape == (size, size, 3) and image.dtype == np.uint8
            kind = image_path.parent.name
            mask_path = demo_root / category / "ground_truth" / kind / f"{image_path.stem}_mask.png"
            if kind == "good":
                assert not mask_path.exists()
                continue
            mask = pixels(mask_path)
            assert mask.shape == (size, size)
            assert set(np.unique(mask).tolist()) == {0, 255}, "masks are 0/255 and never empty"
            assert 0.005 <= (mask > 0).mean() <= 0.08


def test_marker_records_parameters_and_files(demo_root):
    marker = json.loads((demo_root / MARKER_NAME).read_text())
    assert marker["complete"] is True
    assert marker["params"]["seed"] == 0 and marker["params"]["num_train"] == SMALL["num_train"]
    assert set(marker["files"]) == set(all_files(demo_root)) - {MARKER_NAME}


def test_two_runs_give_identical_bytes(demo_root, tmp_path):
    other = generate_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    ours, theirs = all_files(demo_root), all_files(other)
    ours.pop(MARKER_NAME), theirs.pop(MARKER_NAME)
    assert ours == theirs


def test_other_seed_other_images(demo_root, tmp_path):
    other = generate_demo_dataset(tmp_path / "seed1", seed=1, **SMALL)
    relative = "washer/train/good/000.png"
    assert not np.array_equal(pixels(demo_root / relative), pixels(other / relative))


def test_second_call_with_same_parameters_writes_nothing(tmp_path):
    root = generate_demo_dataset(tmp_path / "set", **SMALL)
    before = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
    assert generate_demo_dataset(root, **SMALL) == root
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == before


def test_new_parameters_regenerate_and_keep_user_files(tmp_path):
    root = generate_demo_dataset(tmp_path / "set", **SMALL)
    (root / "my_notes.txt").write_text("keep me")
    generate_demo_dataset(root, **{**SMALL, "num_train": 2, "categories": ["wood"]})
    assert (root / "my_notes.txt").read_text() == "keep me"
    assert not (root / "washer").exists(), "folders left empty by the old set are removed"
    assert sorted(p.name for p in (root / "wood" / "train" / "good").iterdir()) == ["000.png", "001.png"]
    assert json.loads((root / MARKER_NAME).read_text())["params"]["categories"] == ["wood"]


def test_interrupted_or_damaged_sets_are_redrawn(tmp_path):
    root = generate_demo_dataset(tmp_path / "set", **SMALL)
    reference = all_files(root)
    (root / "weave" / "test" / "good" / "001.png").unlink()
    generate_demo_dataset(root, **SMALL)
    assert all_files(root) == reference
    marker = json.loads((root / MARKER_NAME).read_text())
    marker["complete"] = False
    (root / MARKER_NAME).write_text(json.dumps(marker))
    generate_demo_dataset(root, **SMALL)
    assert all_files(root) == reference


def test_foreign_folder_is_never_touched(tmp_path):
    root = tmp_path / "users_data"
    root.mkdir()
    (root / "important.png").write_bytes(b"user data")
    with pytest.raises(DataError, match="no demo marker"):
        generate_demo_dataset(root, **SMALL)
    assert [p.name for p in root.iterdir()] == ["important.png"]


def test_marker_cannot_delete_outside_the_root(tmp_path):
    root = tmp_path / "set"
    listed = root / "wood" / "train" / "good" / "000.png"
    listed.parent.mkdir(parents=True)
    listed.write_bytes(b"listed")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not yours")
    files = ["wood/train/good/000.png", "../outside.png"]
    (root / MARKER_NAME).write_text(json.dumps({"files": files, "params": {}, "complete": True}))
    with pytest.raises(DataError, match="unsafe path"):
        generate_demo_dataset(root, **SMALL)
    assert outside.read_bytes() == b"not yours"
    assert listed.read_bytes() == b"listed", "nothing is deleted before every listed path is checked"


@pytest.mark.parametrize("category", sorted(DEMO_CATEGORIES))
def test_defects_are_visible_where_the_mask_says(category):
    """Same seed with and without the defect: the pixels change inside the mask, not outside."""
    for kind in DEMO_CATEGORIES[category]:
        for seed in range(3):
            normal, no_mask = render_demo_image(category, None, 128, np.random.default_rng(seed))
            defective, mask = render_demo_image(category, kind, 128, np.random.default_rng(seed))
            assert no_mask is None and mask.dtype == bool
            difference = np.abs(defective.astype(int) - normal.astype(int)).mean(axis=2)
            inside, outside = difference[mask].mean(), difference[~mask].mean()
            assert inside > 10 and inside > 5 * outside, (kind, seed, inside, outside)


@pytest.mark.parametrize("category", sorted(DEMO_CATEGORIES))
def test_normal_images_vary_a_little(category):
    first, _ = render_demo_image(category, None, 128, np.random.default_rng(1))
    second, _ = render_demo_image(category, None, 128, np.random.default_rng(2))
    difference = np.abs(first.astype(int) - second.astype(int)).mean()
    assert 3 < difference < 60
    assert np.abs(first.mean(axis=(0, 1)) - second.mean(axis=(0, 1))).max() < 20


def test_bad_parameters_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="image_size"):
        generate_demo_dataset(tmp_path / "a", image_size=32)
    with pytest.raises(ConfigError, match="num_train"):
        generate_demo_dataset(tmp_path / "b", num_train=0)
    with pytest.raises(ConfigError, match="categories"):
        generate_demo_dataset(tmp_path / "c", categories=["unicorn"])
    with pytest.raises(ConfigError, match="defect"):
        render_demo_image("wood", "rust", 128, np.random.default_rng(0))
    assert not any(tmp_path.iterdir()), "invalid parameters must not leave folders behind"
