"""Converting an authors' checkpoint: round trip to eval on a small MVTec tree, safety, bad keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path

from onenip_pl import OneNIPDetector
from onenip_pl.config import compose
from onenip_pl.convert import convert, convert_checkpoint
from onenip_pl.errors import CheckpointError
from onenip_pl.eval import evaluate
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.models import OneNIP

IMAGE_SIZE = 224
CATEGORY = "hazelnut"


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory) -> Path:
    """A file in the authors' format: golden reconstructor + a random efficientnet_pytorch B4 backbone."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    golden = shared_path("golden", "reconstruction_state_dict.pt")
    torch.manual_seed(0)
    backbone = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4").state_dict()
    state_dict = {f"module.backbone.{key}": value for key, value in backbone.items()}
    reconstruction = torch.load(golden, map_location="cpu", weights_only=True)
    state_dict.update({f"module.{key}": value for key, value in reconstruction.items()})
    path = tmp_path_factory.mktemp("official") / "onenip_mvtec_224.pth"
    torch.save({"state_dict": state_dict, "epoch": 1000}, path)
    return path


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    """One image per folder of the real hazelnut_toy set, in MVTec AD layout (B4 at 224 px is slow on CPU)."""
    source = shared_path("data", "hazelnut_toy", "hazelnut_toy")
    root = tmp_path_factory.mktemp("mvtec")
    category = root / CATEGORY
    for folder in ("train/good", "test/good", "test/colour"):
        (category / folder).mkdir(parents=True)
        for image in sorted((source / folder).iterdir())[:1]:
            shutil.copy(image, category / folder / image.name)
    (category / "ground_truth" / "colour").mkdir(parents=True)
    for image in (category / "test" / "colour").iterdir():
        mask = f"{image.stem}_mask.png"
        shutil.copy(source / "ground_truth" / "colour" / mask, category / "ground_truth" / "colour" / mask)
    return root


@pytest.fixture(scope="module")
def converted(official_checkpoint: Path, mvtec_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "onenip_mvtec_224.ckpt"
    overrides = [
        f"official_ckpt={official_checkpoint}",
        f"out={out}",
        f"image_size={IMAGE_SIZE}",
        f"prompt_root={mvtec_root}",
        "paths.output_dir=unused",
    ]
    return convert(compose("convert", overrides))


def test_converted_checkpoint_is_the_authors_model(converted: Path, official_checkpoint: Path) -> None:
    checkpoint = torch.load(converted, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["fusion"] == "official"
    assert hparams["backbone"] == "tf_efficientnet_b4" and hparams["official_padding"] is True
    assert hparams["image_size"] == IMAGE_SIZE and hparams["pretrained"] is False
    assert checkpoint["prompt_bank"][CATEGORY]["images"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    module = OneNIPModule.load(converted).eval()
    reference = OneNIP.from_official(official_checkpoint, image_size=IMAGE_SIZE)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = module.net(images[:1], images[1:]), reference(images[:1], images[1:])
    for name in ("query_features", "reconstruction", "refiner_logit", "anomaly_map"):
        assert torch.equal(ours[name], theirs[name]), name


def test_convert_then_eval_prints_the_table(
    converted: Path, mvtec_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = [
        f"ckpt_path={converted}",
        "experiment=mvtec",
        f"data.root={mvtec_root}",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "trainer.accelerator=cpu",
        "logger=none",
        "progress=none",
        "callbacks.report.images_per_category=0",
        "callbacks.report.curves=false",
        f"paths.output_dir={tmp_path}",
    ]
    results = evaluate(compose("eval", overrides))
    assert list(results["per_category"]) == [CATEGORY]
    for name in ("image_AUROC", "pixel_AUROC", "pixel_AP"):
        assert 0.0 <= results["mean"][name] <= 1.0
    printed = capsys.readouterr().out
    assert "category" in printed and CATEGORY in printed and "mean" in printed
    assert (tmp_path / "metrics.json").is_file()


def test_converted_checkpoint_predicts_without_thresholds(converted: Path, mvtec_root: Path) -> None:
    detector = OneNIPDetector.from_checkpoint(converted)
    assert detector.categories == [CATEGORY] and not detector.calibrated
    path = sorted((mvtec_root / CATEGORY / "test" / "colour").iterdir())[0]
    (detection,) = detector.predict(path)
    assert detection.category == CATEGORY and detection.decision is None and detection.verdict == "undecided"
    assert detection.anomaly_map.shape == (512, 512) and np.isfinite(detection.anomaly_map).all()


def test_fusion_can_be_set_to_calibrated(official_checkpoint: Path, tmp_path: Path) -> None:
    out = convert_checkpoint(
        official_checkpoint, tmp_path / "calibrated.ckpt", IMAGE_SIZE, fusion="calibrated"
    )
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["fusion"] == "calibrated"
    assert checkpoint["prompt_bank"] == {}
    assert not checkpoint["state_dict"]["post_processor._extra_state"]["calibrated"]


class CodeOnLoad:
    """Unpickling this object would create `marker`: a stand-in for a malicious download."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused(official_checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    unsafe = tmp_path / "unsafe.pth"
    state_dict = torch.load(official_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    torch.save({"state_dict": state_dict, "args": CodeOnLoad(marker)}, unsafe)
    with pytest.raises(CheckpointError, match="refused"):
        convert_checkpoint(unsafe, tmp_path / "out.ckpt")
    assert not marker.exists(), "reading the checkpoint ran code"
    assert not (tmp_path / "out.ckpt").exists()


def test_unknown_missing_and_misshaped_keys_stop_with_their_names(
    official_checkpoint: Path, tmp_path: Path
) -> None:
    state_dict = torch.load(official_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    unknown = tmp_path / "unknown.pth"
    torch.save(
        {"state_dict": {**state_dict, "module.reconstruction.extra_head.weight": torch.zeros(1)}}, unknown
    )
    with pytest.raises(CheckpointError, match="reconstruction.extra_head.weight"):
        convert_checkpoint(unknown, tmp_path / "out.ckpt")
    missing = tmp_path / "missing.pth"
    key = "module.reconstruction.seghead.predictor.weight"
    torch.save({"state_dict": {k: v for k, v in state_dict.items() if k != key}}, missing)
    with pytest.raises(CheckpointError, match="missing keys: refiner.predictor.weight"):
        convert_checkpoint(missing, tmp_path / "out.ckpt")
    with pytest.raises(CheckpointError, match="pos_embed.*image_size=256"):
        convert_checkpoint(official_checkpoint, tmp_path / "out.ckpt", image_size=256)
