"""Export: onnxruntime, OpenVINO (and torch.export) reproduce the PyTorch detector; the sidecar describes
the graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import openvino
import pytest
import torch

from onenip_pl import OneNIPDetector
from onenip_pl.calibration.decision import RULE_TEXT, decide
from onenip_pl.config import compose
from onenip_pl.data.datasets import load_image
from onenip_pl.errors import ConfigError
from onenip_pl.export import export
from onenip_pl.inference.exporters import export_detector

pytest_plugins = ["fixtures_checkpoint"]  # the shared tiny_checkpoint fixture

PARITY_TOLERANCE = 1e-4
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def detector(tiny_checkpoint: Path) -> OneNIPDetector:
    return OneNIPDetector.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def onnx_export(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The export CLI's work, run through the Hydra config."""
    directory = tmp_path_factory.mktemp("onnx")
    overrides = [f"ckpt_path={tiny_checkpoint}", f"out_dir={directory}", "paths.output_dir=unused"]
    export(compose("export", overrides))
    return directory


def test_sidecar_and_prompt_features_describe_the_graph(
    onnx_export: Path, detector: OneNIPDetector, prompts_per_category: int
) -> None:
    spec = json.loads((onnx_export / "onenip.json").read_text())
    assert spec["model"] == "onenip.onnx" and spec["encoder"] == "onenip_encoder.onnx"
    assert spec["image_size"] == IMAGE_SIZE
    assert spec["inputs"]["image"]["dtype"] == "uint8"
    assert spec["inputs"]["image"]["shape"] == ["N", IMAGE_SIZE, IMAGE_SIZE, 3]
    assert spec["categories"] == detector.categories
    thresholds = spec["thresholds"]
    assert thresholds["pooled"] == {"image": detector.image_threshold, "pixel": detector.pixel_threshold}
    for category in detector.categories:
        image, pixel = detector.post_processor.thresholds(category)
        assert thresholds["per_category"][category] == {"image": image, "pixel": pixel, "source": "held_out"}
    assert spec["calibrated"] is True
    assert spec["outputs"]["image_score"]["decision"].startswith(RULE_TEXT)
    assert spec["prompts_per_category"] == {c: prompts_per_category for c in detector.categories}
    bank = np.load(onnx_export / spec["prompt_features"])
    assert sorted(bank.files) == detector.categories
    assert spec["inputs"]["prompt_features"]["shape"][:2] == ["K", "R"]
    for category in detector.categories:
        # K prompts at R = 1 turn: the tiny checkpoint's categories keep a fixed pose
        np.testing.assert_array_equal(bank[category], detector.prompt_features[category][:, None].numpy())
    verification = spec["verification"]["max_abs_diff"]
    assert verification["anomaly_map"] <= PARITY_TOLERANCE and verification["image_score"] <= PARITY_TOLERANCE


def test_onnxruntime_equals_pytorch_on_test_images(
    onnx_export: Path, detector: OneNIPDetector, tiny_demo_root: Path
) -> None:
    """Fresh images and every category's K prompts: onnxruntime alone vs the Python detector."""
    spec = json.loads((onnx_export / "onenip.json").read_text())
    session = onnxruntime.InferenceSession(
        str(onnx_export / spec["model"]), providers=["CPUExecutionProvider"]
    )
    bank = np.load(onnx_export / spec["prompt_features"])
    assert [i.name for i in session.get_inputs()] == ["image", "prompt_features"]
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "image_score"]
    worst_map = worst_score = 0.0
    for category in detector.categories:
        paths = sorted((tiny_demo_root / category / "test").glob("*/*.png"))[:3]
        images = np.stack([load_image(path, IMAGE_SIZE) for path in paths])
        maps, scores = session.run(None, {"image": images, "prompt_features": bank[category]})
        detections = detector.predict(list(images), category=category)
        assert maps.shape == (len(paths), 1, IMAGE_SIZE, IMAGE_SIZE) and scores.shape == (len(paths),)
        expected_maps = np.stack([d.anomaly_map for d in detections])
        expected_scores = np.array([d.score for d in detections])
        worst_map = max(worst_map, float(np.abs(maps[:, 0] - expected_maps).max()))
        worst_score = max(worst_score, float(np.abs(scores - expected_scores).max()))
        threshold = spec["thresholds"]["per_category"][category]["image"]
        decisions = [decide(float(score), threshold) for score in scores]
        flips = [d for d, ours in zip(detections, decisions, strict=True) if d.decision != ours]
        assert all(abs(d.score - threshold) < PARITY_TOLERANCE for d in flips)
    print(f"\n[onnx parity] max |ort - torch|: anomaly map {worst_map:.3g}, image score {worst_score:.3g}")
    assert worst_map <= PARITY_TOLERANCE and worst_score <= PARITY_TOLERANCE


def test_onnx_encoder_makes_the_prompt_features(onnx_export: Path, detector: OneNIPDetector) -> None:
    """A line can make a new prompt without PyTorch: the encoder graph reproduces the stored features."""
    session = onnxruntime.InferenceSession(str(onnx_export / "onenip_encoder.onnx"))
    bank = np.load(onnx_export / "prompt_features.npz")
    for category, images in detector.prompt_images.items():
        (features,) = session.run(None, {"image": images.permute(0, 2, 3, 1).numpy()})
        stored = bank[category][:, 0]
        assert features.shape == stored.shape
        scale = float(np.abs(stored).max())
        assert float(np.abs(features - stored).max()) <= 1e-5 * max(1.0, scale)


@pytest.fixture(scope="module")
def openvino_export(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """`python -m onenip_pl.export format=openvino`'s work, run through the Hydra config."""
    directory = tmp_path_factory.mktemp("openvino")
    overrides = [f"ckpt_path={tiny_checkpoint}", f"out_dir={directory}", "paths.output_dir=unused"]
    overrides.append("format=openvino")
    export(compose("export", overrides))
    return directory


def _compiled(path: Path):
    """The IR alone, as a line without this package would run it (float32, as the sidecar's check did)."""
    core = openvino.Core()
    return core.compile_model(
        core.read_model(str(path)), "CPU", {openvino.properties.hint.inference_precision: openvino.Type.f32}
    )


def test_openvino_sidecar_carries_the_graph_and_the_thresholds(
    openvino_export: Path, onnx_export: Path, detector: OneNIPDetector
) -> None:
    spec = json.loads((openvino_export / "onenip.json").read_text())
    assert spec["format"] == "openvino"
    assert spec["model"] == "onenip.xml" and spec["encoder"] == "onenip_encoder.xml"
    for name in ("onenip", "onenip_encoder"):
        assert (openvino_export / f"{name}.bin").stat().st_size > 0
    onnx_spec = json.loads((onnx_export / "onenip.json").read_text())
    for key in ("image_size", "inputs", "outputs", "categories", "thresholds", "prompts_per_category"):
        assert spec[key] == onnx_spec[key], key
    for category in detector.categories:
        image, pixel = detector.thresholds(category)
        assert spec["thresholds"]["per_category"][category]["image"] == image
        assert spec["thresholds"]["per_category"][category]["pixel"] == pixel
    verification = spec["verification"]["max_abs_diff"]
    assert verification["anomaly_map"] <= PARITY_TOLERANCE and verification["image_score"] <= PARITY_TOLERANCE
    model = openvino.Core().read_model(str(openvino_export / "onenip.xml"))
    assert [port.get_any_name() for port in model.inputs] == ["image", "prompt_features"]
    assert [port.get_any_name() for port in model.outputs] == ["anomaly_map", "image_score"]
    assert model.inputs[0].get_element_type() == openvino.Type.u8
    weights = {op.get_element_type() for op in model.get_ops() if op.get_type_name() == "Constant"}
    assert openvino.Type.f16 not in weights, "weights are saved in float32, not compressed"


def test_openvino_equals_pytorch_on_test_images(
    openvino_export: Path, detector: OneNIPDetector, tiny_demo_root: Path
) -> None:
    """Fresh images, every category's K prompts: the IR in OpenVINO vs the Python detector, decisions too."""
    spec = json.loads((openvino_export / "onenip.json").read_text())
    compiled = _compiled(openvino_export / spec["model"])
    bank = np.load(openvino_export / spec["prompt_features"])
    worst_map = worst_score = 0.0
    for category in detector.categories:
        paths = sorted((tiny_demo_root / category / "test").glob("*/*.png"))[:3]
        images = np.stack([load_image(path, IMAGE_SIZE) for path in paths])
        outputs = compiled({"image": images, "prompt_features": bank[category]})
        maps, scores = (outputs[port] for port in compiled.outputs)
        detections = detector.predict(list(images), category=category)
        assert maps.shape == (len(paths), 1, IMAGE_SIZE, IMAGE_SIZE) and scores.shape == (len(paths),)
        expected_maps = np.stack([d.anomaly_map for d in detections])
        worst_map = max(worst_map, float(np.abs(maps[:, 0] - expected_maps).max()))
        worst_score = max(worst_score, float(np.abs(scores - [d.score for d in detections]).max()))
        threshold = spec["thresholds"]["per_category"][category]["image"]
        for detection, score in zip(detections, scores, strict=True):
            if abs(detection.score - threshold) > PARITY_TOLERANCE:
                assert decide(float(score), threshold) == detection.decision
    print(f"\n[openvino parity] max |ov - torch|: anomaly map {worst_map:.3g}, image score {worst_score:.3g}")
    assert worst_map <= PARITY_TOLERANCE and worst_score <= PARITY_TOLERANCE


def test_openvino_encoder_makes_the_prompt_features(openvino_export: Path, detector: OneNIPDetector) -> None:
    compiled = _compiled(openvino_export / "onenip_encoder.xml")
    bank = np.load(openvino_export / "prompt_features.npz")
    for category, images in detector.prompt_images.items():
        features = compiled({"image": images.permute(0, 2, 3, 1).numpy()})[compiled.outputs[0]]
        stored = bank[category][:, 0]  # the unturned prompts (R = 1 for the tiny checkpoint's categories)
        assert features.shape == stored.shape
        assert float(np.abs(features - stored).max()) <= 1e-5 * max(1.0, float(np.abs(stored).max()))


def test_torch_export_program_equals_pytorch(detector: OneNIPDetector, tmp_path: Path) -> None:
    result = export_detector(detector, tmp_path, fmt="torch_export", encoder=False)
    assert result.model.suffix == ".pt2" and result.encoder is None
    program = torch.export.load(str(result.model)).module()
    images = torch.from_numpy(
        np.stack([img.permute(1, 2, 0).numpy() for img in detector.prompt_images["wood"]])
    )
    prompts = detector.prompt_features["weave"][:, None]
    with torch.inference_mode():
        maps, scores = program(images, prompts)
    detections = detector.predict(list(images.numpy()), category="weave")
    expected = torch.from_numpy(np.stack([d.anomaly_map for d in detections]))
    torch.testing.assert_close(maps[:, 0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, torch.tensor([d.score for d in detections]), rtol=1e-5, atol=1e-5)


def test_unknown_format_is_refused(detector: OneNIPDetector, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="format='tflite'"):
        export_detector(detector, tmp_path, fmt="tflite")
