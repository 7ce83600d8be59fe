"""Decisions a line can trust: per-category thresholds fixed on held-out normals, the threshold rules,
recalibration and enrolment of a new product through their entry points, and the unseen-product protocol."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_data_overrides, tiny_overrides
from dataset_trees import write_image, write_mask

from onenip_pl import OneNIPDetector
from onenip_pl.calibration.rules import f1_threshold, quantile_threshold
from onenip_pl.config import compose
from onenip_pl.data.splits import split_normals
from onenip_pl.errors import ConfigError, DataError
from onenip_pl.train import train

pytest_plugins = ["fixtures_checkpoint"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _calibration(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"][
        "post_processor._extra_state"
    ]


# ---------------------------------------------------------------- rules and the held-out split


def test_quantile_and_f1_rules_on_hand_made_scores() -> None:
    normal = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert quantile_threshold(normal, 0.5) == pytest.approx(0.25)
    assert math.isnan(quantile_threshold(torch.empty(0), 0.5))
    values = torch.tensor([0.1, 0.2, 0.3, 0.8, 0.9, 0.35])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # flagging >= 0.35 catches all three anomalies and no normal: F1 = 1, the cut midway to 0.3
    assert f1_threshold(values, labels) == pytest.approx(0.325)
    assert math.isnan(f1_threshold(normal, torch.zeros(4))), "no anomaly: no F1 to maximise"


def test_split_holds_out_a_seeded_fraction_and_flags_small_categories(tiny_demo_root: Path) -> None:
    from onenip_pl.data.readers import read_dataset

    train_records = [r for r in read_dataset("mvtec", tiny_demo_root) if r.split == "train"]
    splits = split_normals(train_records, seed=1, calibration_fraction=0.1, calibration_min_images=3)
    assert {r.path for r in splits.pool}.isdisjoint(r.path for r in splits.calibration)
    assert splits.calibration_sources == {c: "held_out" for c in ("washer", "weave", "wood")}
    assert len(splits.calibration) == 3 * 3, "at least calibration_min_images of each category"
    again = split_normals(train_records, seed=1, calibration_fraction=0.1, calibration_min_images=3)
    assert [r.path for r in again.calibration] == [r.path for r in splits.calibration]
    small = split_normals(train_records, seed=1, calibration_fraction=0.1, calibration_min_images=4)
    assert small.calibration_sources == {c: "training" for c in ("washer", "weave", "wood")}
    assert {r.path for r in small.pool} == {r.path for r in train_records}
    unseen = split_normals(train_records, seed=1, holdout_categories=["wood"])
    assert unseen.trained_categories == ["washer", "weave"] and unseen.calibration_sources["wood"] == "unseen"
    with pytest.raises(ConfigError, match="holdout_categories"):
        split_normals(train_records, seed=1, holdout_categories=["washer", "weave", "wood"])


def test_held_out_calibration_images_are_never_in_a_training_batch(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    cfg = compose("train", tiny_overrides(tiny_demo_root, tmp_path))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    held_out = {str(r.path) for r in datamodule.splits.calibration}
    assert held_out, "a calibration split was held out"
    loader = datamodule.train_dataloader()
    source = datamodule.train_source.records
    seen = set()
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for item, _, _ in loader.sampler:
            seen.add(str(source[loader.dataset.indices[item]].path))
        for batch in loader:
            seen.update(
                str(source[i].path) for key in ("query_index", "prompt_index") for i in batch[key].tolist()
            )
    assert seen and seen.isdisjoint(held_out)
    calibration = datamodule.calibration_dataloader()
    assert {str(r.path) for r in calibration.dataset.records} == held_out


# ---------------------------------------------------------------- per-category thresholds everywhere


def test_every_category_has_its_own_thresholds_in_the_checkpoint_and_the_detector(
    tiny_checkpoint: Path, tiny_demo_root: Path
) -> None:
    calibration = _calibration(tiny_checkpoint)
    categories = sorted(p.name for p in tiny_demo_root.iterdir() if p.is_dir())
    assert sorted(calibration["per_category"]) == categories
    images = {calibration["per_category"][c]["image"] for c in categories}
    assert len(images) == len(categories), "categories on their own scales get their own thresholds"
    for entry in calibration["per_category"].values():
        assert entry["source"] == "held_out" and entry["normal_images"] >= 3
    detector = OneNIPDetector.from_checkpoint(tiny_checkpoint)
    for category in categories:
        paths = sorted((tiny_demo_root / category / "test").glob("*/*.png"))
        threshold = calibration["per_category"][category]["image"]
        for detection in detector.predict(paths, category=category):
            assert detection.decision == (detection.score > threshold)
        # retrieval (no category given) decides by the retrieved category's threshold
        for detection in detector.predict(paths):
            expected = calibration["per_category"][detection.category]["image"]
            assert detection.decision == (detection.score > expected)


# ---------------------------------------------------------------- recalibration


def test_calibrate_writes_a_new_checkpoint_and_never_overwrites(
    tiny_checkpoint: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "model.ckpt"
    shutil.copy(tiny_checkpoint, checkpoint)
    before = _sha256(checkpoint)
    data = tiny_data_overrides(tiny_demo_root, tmp_path / "run")
    result = run_cli("onenip_pl.calibrate", f"ckpt_path={checkpoint}", *data, "model.threshold_rule=f1")
    assert result.returncode == 0, result.output
    written = tmp_path / "model_calibrated.ckpt"
    assert written.is_file() and _sha256(checkpoint) == before, "the source checkpoint is untouched"
    new, old = _calibration(written), _calibration(checkpoint)
    assert new["per_category"].keys() == old["per_category"].keys()
    assert all(entry["source"] == "calibrate" for entry in new["per_category"].values())
    assert new["per_category"] != old["per_category"]
    hparams = torch.load(written, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["threshold_rule"] == "f1"
    again = run_cli("onenip_pl.calibrate", f"ckpt_path={checkpoint}", *data)
    assert again.returncode == 0 and (tmp_path / "model_calibrated_2.ckpt").is_file(), again.output
    refused = run_cli("onenip_pl.calibrate", f"ckpt_path={checkpoint}", *data, f"out={written}")
    assert refused.returncode == 1 and "never overwrites" in refused.output
    assert "Traceback" not in refused.output


def test_calibrate_names_a_category_without_usable_images(
    tiny_checkpoint: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    for image in (root / "weave" / "train" / "good").iterdir():
        image.write_bytes(b"not an image")
    result = run_cli(
        "onenip_pl.calibrate", f"ckpt_path={tiny_checkpoint}", *tiny_data_overrides(root, tmp_path / "r")
    )
    assert result.returncode == 1 and "weave" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- enrolment of a new product


def _new_product(folder: Path, count: int, size: tuple[int, int] = (96, 96)) -> list[Path]:
    rng = np.random.default_rng(7)
    paths = [folder / f"part_{i:02d}.png" for i in range(count)]
    for path in paths:
        write_image(path, rng, size)
    return paths


def test_enroll_adds_a_product_that_predict_export_eval_and_the_detector_treat_like_a_trained_one(
    tiny_checkpoint: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "model.ckpt"
    shutil.copy(tiny_checkpoint, checkpoint)
    normals = _new_product(tmp_path / "bracket", 6)
    (tmp_path / "bracket" / "notes.txt").write_text("shift 2")
    result = run_cli(
        "onenip_pl.enroll",
        f"ckpt_path={checkpoint}",
        "category=bracket",
        f"normal_images={normals[0].parent}",
        f"paths.output_dir={tmp_path / 'enroll_run'}",
    )
    assert result.returncode == 0, result.output
    assert "resized to the model's 64x64" in result.output and "notes.txt" in result.output
    enrolled = tmp_path / "model_enrolled.ckpt"
    detector = OneNIPDetector.from_checkpoint(enrolled)
    assert "bracket" in detector.categories
    assert len(detector.bank.rows_of("bracket")) == 2, "as many prompts as the checkpoint has per category"
    entry = detector.post_processor.per_category["bracket"]
    assert entry["source"] == "enrolled" and entry["normal_images"] == 4
    detections = detector.predict(normals)
    assert [d.category for d in detections] == ["bracket"] * len(normals), "retrieval knows the new product"
    assert all(d.decision == (d.score > entry["image"]) for d in detections)

    predicted = run_cli(
        "onenip_pl.predict",
        f"ckpt_path={enrolled}",
        f"input={normals[0].parent}",
        "category=bracket",
        f"paths.output_dir={tmp_path / 'predict'}",
    )
    assert predicted.returncode == 0, predicted.output
    info = json.loads((tmp_path / "predict" / "run_info.json").read_text())
    assert info["thresholds"]["per_category"]["bracket"]["source"] == "enrolled"

    exported = run_cli(
        "onenip_pl.export",
        f"ckpt_path={enrolled}",
        "format=torch_export",
        "encoder=false",
        f"paths.output_dir={tmp_path / 'export'}",
    )
    assert exported.returncode == 0, exported.output
    sidecar = json.loads((tmp_path / "export" / "onenip.json").read_text())
    assert "bracket" in sidecar["categories"] and "bracket" in sidecar["thresholds"]["per_category"]

    # eval on a small tree of the new product: its row is scored at its enrolled thresholds
    root = tmp_path / "bracket_tree"
    rng = np.random.default_rng(3)
    train_dir = root / "bracket" / "train" / "good"
    train_dir.mkdir(parents=True)
    for i, path in enumerate(normals):
        shutil.copy(path, train_dir / path.name)
        write_image(root / "bracket" / "test" / "good" / f"{i:03d}.png", rng, (96, 96))
        write_image(root / "bracket" / "test" / "dent" / f"{i:03d}.png", rng, (96, 96))
        write_mask(root / "bracket" / "ground_truth" / "dent" / f"{i:03d}_mask.png", rng, (96, 96))
    evaluated = run_cli(
        "onenip_pl.eval",
        *tiny_overrides(root, tmp_path / "eval", "logger=none"),
        f"ckpt_path={enrolled}",
    )
    assert evaluated.returncode == 0, evaluated.output
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(report["per_category"]) == ["bracket"] and "image_F1" in report["per_category"]["bracket"]


def test_enroll_bad_input_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    detector = OneNIPDetector.from_checkpoint(tiny_checkpoint)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match="'wood' is already in the checkpoint.*overwrite=true"):
        detector.enroll("wood", [image])
    detector.enroll("wood", [image, image + 10, image + 20], overwrite=True)
    detector.post_processor.threshold_rule = "f1"
    varied = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(5)]
    with_rule = detector.enroll("f1rule", varied)
    entry = detector.post_processor.per_category["f1rule"]
    assert with_rule.spare_images == 4 and (entry["normal_images"], entry["anomalies"]) == (4, 4)
    assert math.isfinite(entry["image"]), "normal spare images and their synthetic anomalies set an F1 cut"
    detector.post_processor.threshold_rule = "quantile"
    one = detector.enroll("single", [image])
    assert one.spare_images == 0 and one.source == "pooled (no spare normal image)"
    assert (one.image_threshold, one.pixel_threshold) == detector.thresholds(None)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    result = run_cli(
        "onenip_pl.enroll",
        f"ckpt_path={tiny_checkpoint}",
        "category=x",
        f"normal_images={empty}",
        f"paths.output_dir={tmp_path / 'r1'}",
    )
    assert result.returncode == 1 and f"normal_images={empty} holds no image file" in result.output
    broken = tmp_path / "broken"
    _new_product(broken, 2)
    (broken / "part_01.png").write_bytes(b"\x89PNG truncated")
    result = run_cli(
        "onenip_pl.enroll",
        f"ckpt_path={tiny_checkpoint}",
        "category=x",
        f"normal_images={broken}",
        f"paths.output_dir={tmp_path / 'r2'}",
    )
    assert result.returncode == 1 and "part_01.png" in result.output and "Traceback" not in result.output
    with pytest.raises(DataError, match="torch tensors"):
        detector.enroll("y", [torch.zeros(3, 8, 8)])


# ---------------------------------------------------------------- the unseen-product protocol


def test_unseen_protocol_trains_without_the_held_out_category_and_reports_seen_and_unseen(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    cfg = compose(
        "train", tiny_overrides(tiny_demo_root, tmp_path, "logger=none", "data.holdout_categories=[wood]")
    )
    metrics = train(cfg)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["unseen_categories"] == ["wood"]
    assert set(report["groups"]) == {"seen", "unseen"}
    seen = [report["per_category"][c]["pixel_AUROC"] for c in ("washer", "weave")]
    assert report["groups"]["seen"]["pixel_AUROC"] == pytest.approx(sum(seen) / 2)
    assert report["groups"]["unseen"]["pixel_AUROC"] == pytest.approx(
        report["per_category"]["wood"]["pixel_AUROC"]
    )
    assert metrics["test/unseen/pixel_AUROC"] == pytest.approx(report["groups"]["unseen"]["pixel_AUROC"])
    table = (tmp_path / "metrics.md").read_text()
    assert "wood *" in table and "**unseen mean**" in table
    calibration = _calibration(tmp_path / "checkpoints" / "last.ckpt")
    assert calibration["per_category"]["wood"]["source"] == "unseen"
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    loader = datamodule.train_dataloader()
    queries = {datamodule.train_source.records[i].category for i in loader.dataset.indices}
    assert queries == {"washer", "weave"}
