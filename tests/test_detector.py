"""OneNIPDetector: what the checkpoint holds, safe loading, inputs of every kind, prompts, retrieval."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from onenip_pl import OneNIPDetector
from onenip_pl.data.datasets import load_image, to_tensor
from onenip_pl.errors import CheckpointError, ConfigError, DataError
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.models.onenip import SCORE_POOL_SIZE

IMAGE_SIZE = 64

pytest_plugins = ["fixtures_checkpoint"]  # the shared tiny_checkpoint fixture


@pytest.fixture(scope="module")
def detector(tiny_checkpoint: Path) -> OneNIPDetector:
    return OneNIPDetector.from_checkpoint(tiny_checkpoint)


def categories_of(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_checkpoint_carries_bank_and_calibration_and_loads_weights_only(
    tiny_checkpoint: Path, tiny_demo_root: Path, prompts_per_category: int
) -> None:
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    bank = checkpoint["prompt_bank"]
    assert sorted(bank) == categories_of(tiny_demo_root)
    for entry in bank.values():
        images, features = entry["images"], entry["features"]
        assert images.dtype == torch.uint8
        assert images.shape == (prompts_per_category, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert features.dtype == torch.float32
        assert features.shape[0] == prompts_per_category
        assert features.shape[2:] == (IMAGE_SIZE // 16, IMAGE_SIZE // 16)
    state = checkpoint["state_dict"]
    calibration = state["post_processor._extra_state"]
    assert calibration["calibrated"]
    assert all(math.isfinite(calibration["pooled"][level]) for level in ("image", "pixel"))
    assert float(state["net.fusion_scale"]) != 1.0, "the fusion scale was never calibrated"
    assert isinstance(checkpoint["hyper_parameters"]["out_indices"], list)


def test_bank_features_are_the_features_of_the_bank_images(detector: OneNIPDetector) -> None:
    for category, images in detector.prompt_images.items():
        encoded = detector.encode(list(images.permute(0, 2, 3, 1).numpy()))
        torch.testing.assert_close(encoded, detector.prompt_features[category], rtol=1e-5, atol=1e-5)


def test_predictions_equal_the_lightning_module_averaged_over_prompts(
    detector: OneNIPDetector, tiny_checkpoint: Path, tiny_demo_root: Path, prompts_per_category: int
) -> None:
    """The detector (weights_only loading) reproduces eval's module: the mean map over the K bank prompts."""
    module = OneNIPModule.load(tiny_checkpoint).eval()
    category = categories_of(tiny_demo_root)[0]
    paths = sorted((tiny_demo_root / category / "test").glob("*/*.png"))[:3]
    images = [load_image(path, IMAGE_SIZE) for path in paths]
    detections = detector.predict(images, category=category)

    prompts = module.prompt_bank.features_of(category)
    assert len(prompts) == prompts_per_category
    batch = torch.stack([to_tensor(image) for image in images])
    with torch.no_grad():
        per_prompt = [
            module.net(batch, prompt_features=prompts[k : k + 1])["anomaly_map"] for k in range(len(prompts))
        ]
    expected_maps = torch.stack(per_prompt).mean(dim=0)
    expected_scores = F.avg_pool2d(expected_maps, SCORE_POOL_SIZE, stride=1).flatten(1).amax(dim=1)
    for detection, expected_map, expected_score in zip(
        detections, expected_maps, expected_scores, strict=True
    ):
        assert detection.category == category
        np.testing.assert_allclose(detection.anomaly_map, expected_map[0].numpy(), rtol=1e-5, atol=1e-4)
        assert detection.score == pytest.approx(float(expected_score), rel=1e-5)
        assert detection.decision == (detection.score > module.post_processor.thresholds(category)[0])


def test_every_input_kind_gives_a_map_at_its_own_resolution(
    detector: OneNIPDetector, tiny_demo_root: Path
) -> None:
    path = sorted(tiny_demo_root.glob("*/test/*/*.png"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    gray = np.asarray(Image.open(path).convert("L").resize((120, 90)))
    inputs = {
        "path": path,
        "PIL RGBA": Image.fromarray(rgb).convert("RGBA").resize((150, 100)),
        "gray uint8": gray,
        "gray uint16": gray.astype(np.uint16) * 257,
        "gray float": gray.astype(np.float32) / 255.0,
        "gray H×W×1": gray[..., None],
        "RGBA uint8": np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]),
        "RGB float 0-255": rgb.astype(np.float64),
    }
    expected_shapes = {
        "path": rgb.shape[:2],
        "PIL RGBA": (100, 150),
        "RGBA uint8": rgb.shape[:2],
        "RGB float 0-255": rgb.shape[:2],
    }
    detections = dict(zip(inputs, detector.predict(list(inputs.values()), batch_size=3), strict=True))
    for name, detection in detections.items():
        assert detection.anomaly_map.dtype == np.float32
        assert detection.anomaly_map.shape == expected_shapes.get(name, gray.shape), name
        assert np.isfinite(detection.anomaly_map).all() and np.isfinite(detection.score), name
    assert detections["path"].source == str(path)
    # the same pixels in other containers and dtypes are the same image (batches differ: float rounding)
    for name in ("gray uint16", "gray float", "gray H×W×1"):
        assert_same_map(detections[name], detections["gray uint8"])
    for name in ("RGBA uint8", "RGB float 0-255"):
        assert_same_map(detections[name], detections["path"])


def assert_same_map(ours, reference) -> None:
    np.testing.assert_allclose(ours.anomaly_map, reference.anomaly_map, rtol=1e-5, atol=1e-4)
    assert ours.score == pytest.approx(reference.score, rel=1e-5)


def test_a_single_image_or_a_4d_batch_is_accepted(detector: OneNIPDetector, tiny_demo_root: Path) -> None:
    paths = sorted(tiny_demo_root.glob("*/test/good/*.png"))[:2]
    stacked = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    single = detector.predict(stacked[0])
    batch = detector.predict(stacked)
    assert len(single) == 1 and len(batch) == 2
    assert_same_map(single[0], batch[0])


def test_retrieval_picks_the_category_without_the_label(
    detector: OneNIPDetector, tiny_demo_root: Path
) -> None:
    paths = sorted(tiny_demo_root.glob("*/test/*/*.png"))
    detections = detector.predict(paths, batch_size=4)
    truth = [p.relative_to(tiny_demo_root).parts[0] for p in paths]
    accuracy = np.mean([d.category == c for d, c in zip(detections, truth, strict=True)])
    print(f"\n[retrieval] right category for {accuracy:.1%} of {len(paths)} demo test images")
    assert accuracy >= 0.9
    assert all(-1.0 <= d.similarity <= 1.0 for d in detections)
    # a mixed batch is scored per category with that category's prompts
    for detection, category in zip(detections, truth, strict=True):
        if detection.category == category:
            alone = detector.predict(detection.source, category=category)[0]
            assert detection.score == pytest.approx(alone.score, rel=1e-5)


def test_user_prompt_replaces_the_bank(detector: OneNIPDetector, tiny_demo_root: Path) -> None:
    category = categories_of(tiny_demo_root)[-1]
    path = sorted((tiny_demo_root / category / "test").glob("*/*.png"))[0]
    bank_images = list(detector.prompt_images[category].permute(0, 2, 3, 1).numpy())
    with_bank = detector.predict(path, category=category)[0]
    with_same_images = detector.predict(path, prompt=bank_images)[0]
    assert with_same_images.category is None
    assert with_same_images.score == pytest.approx(with_bank.score, rel=1e-5)
    other = sorted((tiny_demo_root / category / "train" / "good").glob("*.png"))[-1]
    with_other = detector.predict(path, prompt=other)[0]
    assert with_other.score != pytest.approx(with_bank.score, rel=1e-6)


def test_bad_requests_say_what_to_do(detector: OneNIPDetector, tmp_path: Path) -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ConfigError, match="not in the checkpoint's prompt bank; known: washer"):
        detector.predict(image, category="bottle")
    with pytest.raises(ConfigError, match="not both"):
        detector.predict(image, category="wood", prompt=image)
    with pytest.raises(DataError, match=r"shape \(32, 32, 2\)"):
        detector.predict(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(DataError, match="NaN"):
        detector.predict(np.full((32, 32), np.nan, np.float32))
    with pytest.raises(DataError, match="missing.png"):
        detector.predict(tmp_path / "missing.png")
    with pytest.raises(DataError, match="torch tensors"):
        detector.predict(torch.zeros(3, 32, 32))


def test_checkpoint_problems_are_named(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        OneNIPDetector.from_checkpoint(tmp_path / "none.ckpt")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a onenip-pl checkpoint"):
        OneNIPDetector.from_checkpoint(plain)
    marker = tmp_path / "code_ran"
    unsafe = tmp_path / "unsafe.ckpt"
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "payload": CodeOnLoad(marker)}, unsafe)
    with pytest.raises(CheckpointError, match="refused"):
        OneNIPDetector.from_checkpoint(unsafe)
    assert not marker.exists(), "loading the checkpoint ran code"


class CodeOnLoad:
    """Unpickling this object would create `marker`: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_of_onenip_pl_0_1_still_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Checkpoints of onenip-pl 0.1 hold OmegaConf lists among their hyper-parameters (allowed), the
    optimiser settings there, and one pooled threshold as top-level buffers: they are read as they are."""
    from omegaconf import OmegaConf

    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    calibration = checkpoint["state_dict"]["post_processor._extra_state"]
    hparams = {**checkpoint["hyper_parameters"], **checkpoint["net_config"]}
    for key in ("threshold_rule", "pixel_threshold_quantile", "cpu_training_kernels"):
        hparams.pop(key)
    hparams.update(lr=1e-4, weight_decay=1e-4, lr_step_size=800, lr_gamma=0.1)
    hparams["out_indices"] = OmegaConf.create(hparams["out_indices"])
    hparams["betas"] = OmegaConf.create([0.9, 0.999])
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("post_processor.")}
    state["fusion_calibrated"] = torch.tensor(True)
    state["image_threshold"] = torch.tensor(calibration["pooled"]["image"])
    state["pixel_threshold"] = torch.tensor(calibration["pooled"]["pixel"])
    older = tmp_path / "older.ckpt"
    legacy = {k: v for k, v in checkpoint.items() if k not in ("format_version", "net_config")}
    torch.save(
        {**legacy, "state_dict": state, "hyper_parameters": hparams, "calibration_prompt": "random, k=1"},
        older,
    )
    with pytest.raises(pickle.UnpicklingError, match="ListConfig"):
        torch.load(older, map_location="cpu", weights_only=True)

    detector = OneNIPDetector.from_checkpoint(older)
    assert detector.categories == sorted(checkpoint["prompt_bank"])
    assert detector.calibrated
    assert (detector.image_threshold, detector.pixel_threshold) == pytest.approx(
        (calibration["pooled"]["image"], calibration["pooled"]["pixel"]), rel=1e-6
    )
    module = OneNIPModule.load(older)
    assert module.post_processor.prompt_setting == "random, k=1"
    torch.testing.assert_close(module.net.state_dict(), OneNIPModule.load(tiny_checkpoint).net.state_dict())


def test_importing_the_package_stays_light() -> None:
    """`import onenip_pl` must not pull in torch; the detector is imported on first use."""
    code = "import sys, onenip_pl; assert 'torch' not in sys.modules, sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert OneNIPDetector.__module__ == "onenip_pl.inference.detector"
