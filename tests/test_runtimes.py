"""The detector on PyTorch, ONNX Runtime and OpenVINO: the same detections; the latency benchmark runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY_MODEL, run_cli

from onenip_pl import OneNIPDetector
from onenip_pl.calibration.decision import decide
from onenip_pl.config import compose
from onenip_pl.errors import ConfigError
from onenip_pl.inference.exporters import export_detector
from onenip_pl.inference.runtimes import RUNTIMES, build_runtime
from onenip_pl.predict import predict_files

pytest_plugins = ["fixtures_checkpoint"]  # the shared tiny_checkpoint fixture

# the bound on |runtime - PyTorch| for the map and the score (float32 in another order: ~1e-5 here)
PARITY_TOLERANCE = 1e-4
COMPILED = [runtime for runtime in RUNTIMES if runtime != "torch"]


@pytest.fixture(scope="module")
def detectors(tiny_checkpoint: Path) -> dict[str, OneNIPDetector]:
    return {runtime: OneNIPDetector.from_checkpoint(tiny_checkpoint, runtime=runtime) for runtime in RUNTIMES}


@pytest.fixture(scope="module")
def test_images(tiny_demo_root: Path) -> list[Path]:
    """Good and defective test images of every category, at their own 128 px (resized inside)."""
    return sorted(tiny_demo_root.glob("*/test/*/00[01].png"))


def _assert_same_detections(reference, candidates, detector: OneNIPDetector) -> None:
    for expected, got in zip(reference, candidates, strict=True):
        assert got.source == expected.source and got.category == expected.category
        assert abs(got.score - expected.score) <= PARITY_TOLERANCE
        assert got.anomaly_map.shape == expected.anomaly_map.shape
        assert float(np.abs(got.anomaly_map - expected.anomaly_map).max()) <= PARITY_TOLERANCE
        threshold = detector.thresholds(got.category)[0]
        assert got.decision == decide(got.score, threshold)
        if abs(expected.score - threshold) > PARITY_TOLERANCE:
            assert got.decision == expected.decision, (got.source, got.score, expected.score, threshold)


@pytest.mark.parametrize("runtime", COMPILED)
def test_compiled_runtimes_detect_as_pytorch(
    detectors: dict[str, OneNIPDetector], test_images: list[Path], runtime: str
) -> None:
    """Retrieval, a bank category and a prompt of your own: scores, maps and decisions of each runtime."""
    torch_detector, detector = detectors["torch"], detectors[runtime]
    assert detector.runtime.name == runtime
    _assert_same_detections(torch_detector.predict(test_images), detector.predict(test_images), detector)
    category = detector.categories[0]
    _assert_same_detections(
        torch_detector.predict(test_images, category=category),
        detector.predict(test_images, category=category),
        detector,
    )
    prompt = sorted(test_images[0].parents[2].glob("train/good/*.png"))[0]
    _assert_same_detections(
        torch_detector.predict(test_images[:3], prompt=prompt),
        detector.predict(test_images[:3], prompt=prompt),
        detector,
    )
    features = detector.encode(test_images[:2])
    expected = torch_detector.encode(test_images[:2])
    scale = max(1.0, float(expected.abs().max()))
    assert float((features - expected).abs().max()) <= 1e-5 * scale, "encoder: float32 rounding at most"


def test_predict_writes_the_same_rows_on_openvino(
    tiny_checkpoint: Path, tiny_demo_root: Path, detectors: dict[str, OneNIPDetector], tmp_path: Path
) -> None:
    category = detectors["torch"].categories[1]
    overrides = [
        f"ckpt_path={tiny_checkpoint}",
        f"input={tiny_demo_root / category / 'test'}",
        f"paths.output_dir={tmp_path}",
        "runtime=openvino",
        "maps=none",
        "overlays=false",
    ]
    report = predict_files(compose("predict", overrides))
    files = sorted((tiny_demo_root / category / "test").rglob("*.png"))
    expected = {str(d.source): d for d in detectors["torch"].predict(files)}
    assert len(report.rows) == len(expected) > 0
    for row in report.rows:
        reference = expected[row["path"]]
        assert row["category"] == reference.category
        # the CSV keeps 6 significant digits
        written = float(row["image_score"])
        assert abs(written - reference.score) <= PARITY_TOLERANCE + 1e-5 * abs(reference.score)
        if abs(reference.score - detectors["torch"].thresholds(category)[0]) > PARITY_TOLERANCE:
            assert row["decision"] == reference.verdict


def test_runtime_settings_are_checked(tiny_checkpoint: Path, detectors: dict[str, OneNIPDetector]) -> None:
    with pytest.raises(ConfigError, match="runtime='tensorrt' is unknown"):
        OneNIPDetector.from_checkpoint(tiny_checkpoint, runtime="tensorrt")
    with pytest.raises(ConfigError, match="runtime=openvino runs on the CPU: use device=cpu"):
        build_runtime("openvino", detectors["torch"].net, torch.device("cuda"))


def test_a_missing_runtime_package_is_named(
    tiny_checkpoint: Path, detectors: dict[str, OneNIPDetector], tmp_path: Path, monkeypatch
) -> None:
    """openvino made unimportable, as in a plain `pip install -e .`: the extra is named in one line."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    install = r"pip install 'onenip-pl\[deploy\]'"
    with pytest.raises(ConfigError, match=rf"runtime=openvino needs openvino.*{install}"):
        OneNIPDetector.from_checkpoint(tiny_checkpoint, runtime="openvino")
    with pytest.raises(ConfigError, match=rf"format=openvino .*needs openvino.*{install}"):
        export_detector(detectors["torch"], tmp_path, fmt="openvino")
    assert not list(tmp_path.iterdir()), "nothing half-written"


def test_predict_without_openvino_says_what_to_install(
    tiny_checkpoint: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    result = run_cli(
        "onenip_pl.predict",
        f"ckpt_path={tiny_checkpoint}",
        f"input={tiny_demo_root}",
        "runtime=openvino",
        f"paths.output_dir={tmp_path}",
        timeout=300,
        blocked=("openvino",),
    )
    output = result.output
    assert result.returncode == 1 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "pip install 'onenip-pl[deploy]'" in line]
    assert len(errors) == 1 and "runtime=openvino needs openvino" in errors[0]


@pytest.mark.slow
def test_latency_benchmark_smoke(tmp_path: Path) -> None:
    """--quick on a tiny model: PyTorch and OpenVINO (ONNX Runtime shares OpenVINO's code path) measured at
    batch 1 and 8, the tables written; the authors' code is timed where its set-up exists, else its row
    names why not."""
    out = tmp_path / "latency.json"
    script = REPO_ROOT / "scripts" / "benchmark_latency.py"
    overrides = [o for o in TINY_MODEL if not o.startswith("model.pretrained")] + ["data.image_size=64"]
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--widths", "demo", "--source-size", "96"]
        + ["--runtimes", "torch,openvino", "--threads", "2", "--json", str(out), *overrides],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    width = report["widths"]["demo"]
    assert width["model"]["image_size"] == 64 and width["model"]["hidden_dim"] == 32
    assert sorted(width["runtimes"]) == ["openvino", "torch"]
    for measured in width["runtimes"].values():
        rows = measured["rows"]
        assert [row["batch"] for row in rows] == [1, 8]
        for row in rows:
            assert row["images"] == row["calls"] * row["batch"] >= 8
            assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
            assert row["images_per_s"] > 0
            assert 0 <= row["anomalous"] <= row["images"]
    authors = report["authors"]
    assert "median_ms" in authors or authors["skipped"], authors
    table = out.with_suffix(".md").read_text()
    assert "| demo | openvino | 1 |" in table and "| demo | torch (fp32) | 8 |" in table
    assert table in result.stdout


def test_latency_benchmark_says_when_cuda_is_missing() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "benchmark_latency.py"), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "--device cuda: no CUDA device is visible to torch"
