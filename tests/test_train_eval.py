"""The real Hydra config composed and run end to end: tiny train, test, eval, W&B offline, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from wandb_records import logged_values, run_config

from onenip_pl.config import compose
from onenip_pl.errors import ConfigError, DataError
from onenip_pl.eval import evaluate
from onenip_pl.train import train

METRICS = ("image_AUROC", "image_AP", "pixel_AUROC", "pixel_AP")


@pytest.mark.parametrize("experiment", ["demo", "mvtec", "visa", "btad", "mvtec_visa_btad"])
@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_every_experiment_composes(experiment: str, config_name: str) -> None:
    overrides = [f"experiment={experiment}"] + (["ckpt_path=x.ckpt"] if config_name == "eval" else [])
    cfg = compose(config_name, overrides)
    assert cfg.data.batch_size == 8
    assert cfg.model.image_size == cfg.data.image_size
    if experiment != "demo":
        assert cfg.model.backbone == "tf_efficientnet_b4.aa_in1k"
        assert cfg.model.optimizer.lr == pytest.approx(1e-4)
        assert cfg.model.scheduler.step_size == 800
        assert cfg.trainer.max_epochs == 1000
        assert cfg.trainer.gradient_clip_val == pytest.approx(0.1)
        assert cfg.seed == 133


def _read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def test_tiny_train_then_eval_through_hydra(tiny_demo_root: Path, tmp_path: Path) -> None:
    cfg = compose("train", tiny_overrides(tiny_demo_root, tmp_path / "train", "logger=csv"))
    metrics = train(cfg)

    report = _read_metrics(tmp_path / "train")
    categories = sorted(p.name for p in tiny_demo_root.iterdir() if p.is_dir())
    assert sorted(report["per_category"]) == categories
    for name in METRICS:
        assert 0.0 <= report["mean"][name] <= 1.0
        assert metrics[f"test/{name}"] == pytest.approx(report["mean"][name])
    assert (tmp_path / "train" / "metrics.csv").is_file()

    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["state_dict"]["post_processor._extra_state"]["calibrated"]

    eval_cfg = compose(
        "eval",
        [*tiny_overrides(tiny_demo_root, tmp_path / "eval", "logger=none"), f"ckpt_path={ckpt}"],
    )
    results = evaluate(eval_cfg)
    assert results["mean"] == pytest.approx(report["mean"], nan_ok=True)
    assert _read_metrics(tmp_path / "eval")["mean"] == pytest.approx(report["mean"], nan_ok=True)


def test_backbone_weights_and_bn_statistics_unchanged_by_fit(tiny_demo_root: Path, tmp_path: Path) -> None:
    import hydra

    cfg = compose("train", tiny_overrides(tiny_demo_root, tmp_path, "logger=none"))
    model = hydra.utils.instantiate(cfg.model)
    before = {k: v.clone() for k, v in model.net.backbone.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in model.net.named_parameters() if v.requires_grad}
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=hydra.utils.instantiate(cfg.data))

    after = model.net.backbone.state_dict()
    assert any("running_mean" in k for k in before)
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"backbone tensor {key} changed during training"
    changed = [
        k
        for k, v in model.net.named_parameters()
        if v.requires_grad and not torch.equal(v, trainable_before[k])
    ]
    assert changed, "no trainable parameter moved: the optimiser did not run"


def test_wandb_offline_run_holds_logged_metrics(tiny_demo_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose("train", tiny_overrides(tiny_demo_root, tmp_path, "logger=wandb"))
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline W&B run under {tmp_path}, found {runs}"
    logged = logged_values(runs[0])
    report = _read_metrics(tmp_path)
    for name in METRICS:
        assert logged[f"test/{name}"] == [pytest.approx(report["mean"][name], rel=1e-6)]
    category = next(iter(report["per_category"]))
    assert logged[f"test/{category}/image_AUROC"] == [
        pytest.approx(report["per_category"][category]["image_AUROC"], rel=1e-6)
    ]
    assert len(logged["train/total_step"]) >= 1
    config = run_config(runs[0])
    assert config["model"]["hidden_dim"] == 32
    assert config["data"]["image_size"] == 64


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_data_root_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    cfg = compose("train", tiny_overrides(missing, tmp_path / "out", "logger=none"))
    with pytest.raises(DataError, match="nowhere"):
        train(cfg)


def test_image_size_not_multiple_of_16_is_rejected(tiny_demo_root: Path, tmp_path: Path) -> None:
    cfg = compose("train", tiny_overrides(tiny_demo_root, tmp_path, "logger=none", "data.image_size=100"))
    with pytest.raises(ConfigError, match="image_size"):
        train(cfg)


def test_category_without_training_images_is_reported(tiny_demo_root: Path, tmp_path: Path) -> None:
    root = _copy_tree(tiny_demo_root, tmp_path / "data")
    category = sorted(p for p in root.iterdir() if p.is_dir())[0]
    for image in (category / "train" / "good").iterdir():
        image.unlink()
    cfg = compose("train", tiny_overrides(root, tmp_path / "out", "logger=none"))
    with pytest.raises(DataError, match=category.name):
        train(cfg)


def test_unreadable_image_is_named(tiny_demo_root: Path, tmp_path: Path) -> None:
    root = _copy_tree(tiny_demo_root, tmp_path / "data")
    category = sorted(p for p in root.iterdir() if p.is_dir())[0]
    broken = sorted((category / "train" / "good").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:100])
    cfg = compose("train", tiny_overrides(root, tmp_path / "out", "logger=none"))
    with pytest.raises(DataError, match=broken.name):
        train(cfg)
