"""The evaluation protocol: calibration fixed before the test and kept in the checkpoint, the authors'
test-set fusion as a switch, F1 at the saved thresholds, no selection on the test set, the optional
validation split, and every test image counted once however the test set is sharded."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import hydra
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from onenip_pl.config import compose
from onenip_pl.data.samplers import EvalShardSampler
from onenip_pl.eval import evaluate
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.metrics import AnomalyMetrics, compute_category_metrics
from onenip_pl.metrics.evaluator import f1_at_threshold
from onenip_pl.train import train

NO_PICTURES = ("callbacks.report.images_per_category=0", "callbacks.report.curves=false")


def _trainer(cfg) -> L.Trainer:
    return hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[])


@pytest.fixture(scope="module")
def trained_run(tiny_demo_root: Path, tmp_path_factory) -> Path:
    """One tiny training run (calibrated fusion); its output directory."""
    output_dir = tmp_path_factory.mktemp("trained")
    train(compose("train", tiny_overrides(tiny_demo_root, output_dir, "logger=none", *NO_PICTURES)))
    return output_dir


def _direct_maps(model, dataloader) -> list[dict]:
    """Reconstruction and refiner maps straight from the network's forward, batch by batch."""
    batches = []
    with torch.no_grad():
        for batch in dataloader:
            output = model.net.eval()(batch["image"], batch["prompt"])
            batches.append({**batch, "rec_map": output["rec_map"], "refiner_map": output["refiner_map"]})
    return batches


def _fused_by_category(batches: list[dict], scale: float) -> dict[str, dict[str, torch.Tensor]]:
    """Spec §7 written out: 0.5·rec + 0.5·scale·ref; image score = max of the 16×16 mean-filtered map."""
    fused = {}
    for batch in batches:
        anomaly_map = 0.5 * batch["rec_map"] + 0.5 * scale * batch["refiner_map"]
        score = F.avg_pool2d(anomaly_map, 16, stride=1).amax(dim=(1, 2, 3))
        for i, category in enumerate(batch["category"]):
            entry = fused.setdefault(category, {"scores": [], "labels": [], "maps": [], "masks": []})
            entry["scores"].append(score[i])
            entry["labels"].append(batch["label"][i])
            entry["maps"].append(anomaly_map[i, 0])
            entry["masks"].append(batch["mask"][i, 0].bool())
    return {c: {name: torch.stack(values) for name, values in entry.items()} for c, entry in fused.items()}


def test_checkpoint_holds_the_calibration_and_eval_uses_it_unchanged(
    trained_run: Path, tiny_demo_root: Path, tmp_path: Path, caplog
) -> None:
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = state["state_dict"]
    calibration = weights["post_processor._extra_state"]
    assert calibration["calibrated"]
    saved = {"scale": float(weights["net.fusion_scale"]), **calibration["pooled"]}
    assert all(np.isfinite(list(saved.values())))
    assert calibration["prompt_setting"] == "random, k=1"

    # the same test images, but training images that would give another calibration if it were redone
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    for image_path in root.glob("*/train/good/*.png"):
        cv2.imwrite(str(image_path), 255 - cv2.imread(str(image_path)))
    cfg = compose("eval", [*tiny_overrides(root, tmp_path / "eval", "logger=none"), "ckpt_path=x"])
    model = OneNIPModule.load(trained_run / "checkpoints" / "last.ckpt")
    datamodule = hydra.utils.instantiate(cfg.data)
    with caplog.at_level(logging.WARNING):
        _trainer(cfg).test(model, datamodule=datamodule)
    assert "calibrating now" not in caplog.text
    assert float(model.net.fusion_scale) == saved["scale"]
    assert model.post_processor.thresholds(None) == (saved["image"], saved["pixel"])
    assert model.post_processor.per_category == calibration["per_category"]

    # F1 at each category's saved thresholds, recomputed from the network's own maps
    fused = _fused_by_category(_direct_maps(model, datamodule.test_dataloader()), saved["scale"])
    for category, values in model.test_results["per_category"].items():
        image, pixel = (
            calibration["per_category"][category]["image"],
            calibration["per_category"][category]["pixel"],
        )
        expected_image = f1_at_threshold(fused[category]["scores"], fused[category]["labels"], image)
        expected_pixel = f1_at_threshold(fused[category]["maps"], fused[category]["masks"], pixel)
        assert values["image_F1"] == pytest.approx(expected_image, nan_ok=True)
        assert values["pixel_F1"] == pytest.approx(expected_pixel, nan_ok=True)

    # recalibrating on these training images would have moved the scale: the check above can fail
    assert model.calibrate(datamodule.calibration_dataloader()) != pytest.approx(saved["scale"])


def test_f1_at_threshold_counts_the_fixed_decision() -> None:
    scores = torch.tensor([0.1, 0.4, 0.5, 0.9, 0.2])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # at 0.4: predicted anomalous = {0.4, 0.5, 0.9}: TP 2, FP 1, FN 1 -> 2·2 / (2·2 + 1 + 1)
    assert f1_at_threshold(scores, labels, 0.4) == pytest.approx(4 / 6)
    assert f1_at_threshold(scores, labels, 1.0) == 0.0
    assert np.isnan(f1_at_threshold(scores, torch.zeros(5), 1.0))


def test_official_fusion_is_the_authors_test_set_formula(tiny_demo_root: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_demo_root, tmp_path, "logger=none", "model.fusion=official")
    cfg = compose("train", overrides)
    L.seed_everything(0)
    model = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    _trainer(cfg).test(model, datamodule=datamodule)

    batches = _direct_maps(model, datamodule.test_dataloader())
    rec_maps = torch.cat([batch["rec_map"] for batch in batches])
    test_set_scale = float((rec_maps.max() + rec_maps.min()) / 2)
    fused = _fused_by_category(batches, test_set_scale)
    for category, values in model.test_results["per_category"].items():
        data = fused[category]
        expected = compute_category_metrics(data["scores"], data["labels"], data["maps"], data["masks"])
        assert values == pytest.approx(expected, rel=1e-6, nan_ok=True)
    assert not model.post_processor.calibrated, "the test set's scale must not be stored as a calibration"
    assert float(model.net.fusion_scale) == 1.0


def test_official_switch_reaches_eval_of_a_calibrated_checkpoint(
    trained_run: Path, tiny_demo_root: Path
) -> None:
    overrides = tiny_overrides(tiny_demo_root, trained_run / "eval_official", "logger=none", *NO_PICTURES)
    cfg = compose(
        "eval",
        [*overrides, f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", "model.fusion=official"],
    )
    results = evaluate(cfg)
    calibrated = json.loads((trained_run / "metrics.json").read_text())
    assert "image_F1" in calibrated["mean"] and "image_F1" not in results["mean"]
    assert results["mean"]["pixel_AUROC"] != pytest.approx(calibrated["mean"]["pixel_AUROC"], abs=1e-9)


def test_validation_split_serves_calibration_and_the_last_weights_are_tested(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(
        tiny_demo_root,
        tmp_path,
        "logger=none",
        "data.val_fraction=0.34",
        "trainer.max_epochs=2",
        *NO_PICTURES,
    )
    cfg = compose("train", overrides)
    metrics = train(cfg)
    for name in ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AP"):
        assert 0.0 <= metrics[f"val/{name}"] <= 1.0

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 * 2, "last.ckpt must hold the weights after the final step"

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    held_out = {str(r.path) for r in datamodule.val_records}
    assert len(held_out) == 2 * len(datamodule.category_names)
    assert held_out.isdisjoint(str(r.path) for r in datamodule.train_source.records)
    calibration = datamodule.calibration_dataloader()
    assert {str(r.path) for r in calibration.dataset.records} == held_out

    model = OneNIPModule.load(tmp_path / "checkpoints" / "last.ckpt")
    saved_scale = float(model.net.fusion_scale)
    assert model.calibrate(calibration) == pytest.approx(saved_scale, rel=1e-6)
    without_validation = hydra.utils.instantiate(cfg.data, val_fraction=0.0)
    without_validation.setup()
    assert model.calibrate(without_validation.calibration_dataloader()) != pytest.approx(saved_scale)

    # the test ran on the final weights: evaluating last.ckpt reproduces it
    eval_overrides = tiny_overrides(
        tiny_demo_root, tmp_path / "eval", "logger=none", "data.val_fraction=0.34", *NO_PICTURES
    )
    results = evaluate(
        compose("eval", [*eval_overrides, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    )
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert results["mean"] == pytest.approx(report["mean"], nan_ok=True)


@pytest.mark.parametrize("length", [1, 7, 13, 24])
@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_shards_cover_every_index_exactly_once(length: int, world_size: int) -> None:
    shards = [list(EvalShardSampler(length, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert sum(len(EvalShardSampler(length, rank, world_size)) for rank in range(world_size)) == length


def _synthetic_test_set(count: int, seed: int = 0) -> dict:
    """Quantised scores and maps (many ties), two categories, odd size."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3 != 0
    masks = torch.zeros(count, 16, 16, dtype=torch.bool)
    masks[labels, 4:9, 5:11] = True
    maps = (torch.rand(count, 16, 16, generator=generator) + 0.6 * masks).mul(20).round()
    scores = (4 * torch.rand(count, generator=generator) + labels).round()
    categories = ["bottle" if i % 2 else "cable" for i in range(count)]
    return {"scores": scores, "labels": labels.long(), "maps": maps, "masks": masks, "categories": categories}


def _feed(metric: AnomalyMetrics, data: dict, indices: list[int], batch_size: int = 2) -> None:
    for start in range(0, len(indices), batch_size):
        rows = indices[start : start + batch_size]
        metric.update(
            data["scores"][rows],
            data["labels"][rows],
            data["maps"][rows],
            data["masks"][rows],
            [data["categories"][i] for i in rows],
        )


def _assert_same_results(actual: dict, expected: dict) -> None:
    assert actual["per_category"].keys() == expected["per_category"].keys()
    for category, values in expected["per_category"].items():
        assert actual["per_category"][category] == pytest.approx(values, rel=1e-12, nan_ok=True)
    assert actual["mean"] == pytest.approx(expected["mean"], rel=1e-12, nan_ok=True)


def test_metric_states_of_two_shards_merge_to_the_single_process_result() -> None:
    data = _synthetic_test_set(count=23)
    single = AnomalyMetrics()
    _feed(single, data, list(range(23)))
    expected = single.compute()

    ranks = [AnomalyMetrics() for _ in range(2)]
    for rank, metric in enumerate(ranks):
        _feed(metric, data, list(EvalShardSampler(23, rank, 2)))
    ranks[0].merge_state(ranks[1])
    _assert_same_results(ranks[0].compute(), expected)

    # a sampler that pads the shorter shard with a repeated image (DistributedSampler) changes the result
    padded = [AnomalyMetrics() for _ in range(2)]
    _feed(padded[0], data, list(EvalShardSampler(23, 0, 2)))
    _feed(padded[1], data, [*EvalShardSampler(23, 1, 2), 1])
    padded[0].merge_state(padded[1])
    assert padded[0].compute()["mean"] != pytest.approx(expected["mean"], nan_ok=True)
