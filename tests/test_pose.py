"""Prompts turned to the query's pose: the turn found, what it does to the reconstruction, auto's decision,
one scoring path for the test, the detector, predict and the ONNX graph, and the refused settings."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import hydra
import numpy as np
import onnxruntime
import pytest
import torch
from conftest import TINY_MODEL_ARGS, run_cli, tiny_data_overrides, tiny_overrides
from PIL import Image

from onenip_pl import OneNIPDetector
from onenip_pl.config import compose
from onenip_pl.data.image_io import load_image
from onenip_pl.data.pose import (
    AUTO_GAIN_CUT,
    PoseGrid,
    PoseState,
    align_prompts,
    decide_poses,
    turn_gain,
    turn_image,
    turned_features,
)
from onenip_pl.errors import ConfigError
from onenip_pl.inference.exporters import export_detector
from onenip_pl.lightning.datamodule import OneNIPDataModule
from onenip_pl.lightning.module import OneNIPModule
from onenip_pl.models import OneNIP
from onenip_pl.predict import predict_files
from onenip_pl.train import train

IMAGE_SIZE = 64
SOURCE_SIZE = 128
PARITY_TOLERANCE = 1e-4
TRAIN_ANGLES = [0, 41, 97, 150, 203, 262, 318]
TEST_ANGLES = [23, 130, 245]
# the pose run's data settings, also those the test path is read with (same split, same first prompt)
DATA_SETTINGS = ("data.calibration_min_images=1",)


def render_part(angle: float, size: int = SOURCE_SIZE, seed: int | None = None) -> np.ndarray:
    """A tool-like part on a plain table: a bar, a head at one end and a notch on one side (no symmetry),
    drawn turned by ``angle`` degrees counter-clockwise; ``seed`` adds mild sensor noise."""
    image = np.full((size, size, 3), (200, 205, 210), np.uint8)
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])

    def polygon(points: list[list[float]]) -> np.ndarray:
        return (np.asarray(points) * size @ rotation.T + size / 2 - 0.5).round().astype(np.int32)

    import cv2

    cv2.fillPoly(image, [polygon([[-0.38, -0.06], [0.2, -0.06], [0.2, 0.06], [-0.38, 0.06]])], (60, 60, 70))
    cv2.fillPoly(image, [polygon([[0.12, -0.16], [0.32, -0.16], [0.32, 0.16], [0.12, 0.16]])], (90, 80, 60))
    cv2.fillPoly(image, [polygon([[-0.1, 0.06], [0.0, 0.06], [-0.05, 0.2]])], (30, 120, 40))
    if seed is not None:
        noise = np.random.default_rng(seed).normal(0, 3, image.shape)
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_pose_tree(root: Path) -> Path:
    """MVTec layout: ``part`` turned by known angles, ``plate`` (the same part) always at 0 degrees; one
    defect each (a dark blot on the part) with its mask."""
    for category, angles, test_angles in (
        ("part", TRAIN_ANGLES, TEST_ANGLES),
        ("plate", [0] * len(TRAIN_ANGLES), [0] * len(TEST_ANGLES)),
    ):
        for i, angle in enumerate(angles):
            _save(root / category / "train" / "good" / f"{i:03d}.png", render_part(angle, seed=i))
        for i, angle in enumerate(test_angles):
            _save(root / category / "test" / "good" / f"{i:03d}.png", render_part(angle, seed=100 + i))
        defect = render_part(test_angles[0], seed=200)
        mask = np.zeros(defect.shape[:2], np.uint8)
        mask[58:70, 58:70] = 255
        defect[mask > 0] = (20, 20, 20)
        _save(root / category / "test" / "blot" / "000.png", defect)
        _save(root / category / "ground_truth" / "blot" / "000_mask.png", mask)
    return root


@pytest.fixture(scope="module")
def pose_root(tmp_path_factory) -> Path:
    return write_pose_tree(tmp_path_factory.mktemp("pose_data"))


@pytest.fixture(scope="module")
def pose_checkpoint(pose_root: Path, tmp_path_factory) -> Path:
    """A seconds-long run with data.pose=auto: pretrained Lite0, one bank prompt per category."""
    output_dir = tmp_path_factory.mktemp("pose_run")
    overrides = tiny_overrides(
        pose_root,
        output_dir,
        "logger=none",
        "test=false",
        "model.pretrained=true",
        "data.pose=auto",
        *DATA_SETTINGS,
        "callbacks.prompt_bank.per_category=1",
        "++trainer.limit_train_batches=3",
    )
    train(compose("train", overrides))
    return output_dir / "checkpoints" / "last.ckpt"


def _circular_error(a: float, b: float) -> float:
    difference = abs(a - b) % 360
    return min(difference, 360 - difference)


def test_the_turn_of_a_part_is_found_within_a_few_degrees() -> None:
    net = OneNIP(**{**TINY_MODEL_ARGS, "pretrained": True}, image_size=IMAGE_SIZE).eval()
    grid = PoseGrid(angles=72)  # 5-degree steps
    prompt = torch.from_numpy(render_part(0, IMAGE_SIZE)).permute(2, 0, 1)[None]
    posed = turned_features(net.extract_features, prompt, grid, "cpu")
    assert posed.shape[:2] == (1, 72)
    angles = [0, 23, 37, 95, 143, 212, 301, 333]
    queries = torch.stack(
        [torch.from_numpy(render_part(a, IMAGE_SIZE, seed=i)).permute(2, 0, 1) for i, a in enumerate(angles)]
    )
    _, turn = align_prompts(net.extract_features(queries.float() / 255), posed)
    found = [grid.turns[int(t)][0] for t in turn[:, 0]]
    errors = [_circular_error(f, a) for f, a in zip(found, angles, strict=True)]
    print(f"\ntrue angles {angles}\nfound       {found}")
    assert max(errors) <= 5.0, errors


def test_a_mirrored_part_is_found_by_a_grid_with_mirroring() -> None:
    part = render_part(0, IMAGE_SIZE)
    np.testing.assert_array_equal(turn_image(part, 0.0, mirror=True), part[:, ::-1])
    net = OneNIP(**{**TINY_MODEL_ARGS, "pretrained": True}, image_size=IMAGE_SIZE).eval()
    grid = PoseGrid(angles=36, mirror=True)
    assert len(grid.turns) == 72 and grid.turns[36] == (0.0, True)
    posed = turned_features(net.extract_features, torch.from_numpy(part).permute(2, 0, 1)[None], grid, "cpu")
    # a part turned by 40 degrees and seen in a mirror is the mirrored part turned by -40 degrees
    query = np.ascontiguousarray(render_part(40, IMAGE_SIZE, seed=1)[:, ::-1])
    _, turn = align_prompts(net.extract_features(torch.from_numpy(query).permute(2, 0, 1)[None] / 255), posed)
    angle, mirrored = grid.turns[int(turn[0, 0])]
    assert mirrored and _circular_error(angle, 320) <= 5.0, (angle, mirrored)


def test_align_prompts_picks_each_querys_own_turn_and_gathers_it() -> None:
    """Written out: the turn minimising the squared distance inside the disc, per query and prompt."""
    generator = torch.Generator().manual_seed(0)
    posed = torch.randn(2, 5, 3, 4, 4, generator=generator, dtype=torch.float64)
    queries = posed[[0, 1, 0], [3, 1, 4]] + 0.01 * torch.randn(3, 3, 4, 4, generator=generator).double()
    chosen, turn = align_prompts(queries, posed)
    assert chosen.shape == (3, 2, 3, 4, 4) and turn.shape == (3, 2)
    inside = torch.zeros(4, 4, dtype=torch.float64)
    inside[1:3, 1:3] = 1  # the disc of a 4x4 grid keeps the central 2x2 tokens
    for n in range(3):
        for k in range(2):
            distances = ((queries[n] - posed[k]) * inside).square().flatten(1).sum(1)
            assert int(turn[n, k]) == int(distances.argmin())
            torch.testing.assert_close(chosen[n, k], posed[k, int(turn[n, k])])
    assert turn[[0, 1, 2], [0, 1, 0]].tolist() == [3, 1, 4], "each query finds the turn it was made from"
    per_query, per_turn = align_prompts(queries, posed[None].expand(3, -1, -1, -1, -1, -1))
    torch.testing.assert_close(per_query, chosen)
    assert torch.equal(per_turn, turn)


def test_auto_tells_a_rotating_category_from_a_fixed_one(caplog) -> None:
    turned = [render_part(a, seed=i) for i, a in enumerate(TRAIN_ANGLES)]
    fixed = [render_part(0, seed=i) for i in range(len(TRAIN_ANGLES))]
    grid = PoseGrid()
    assert turn_gain(turned, grid) > 2 * AUTO_GAIN_CUT
    assert turn_gain(fixed, grid) < AUTO_GAIN_CUT / 2
    with caplog.at_level(logging.INFO, logger="onenip_pl.data.pose"):
        state = decide_poses({"part": turned, "plate": fixed}, "auto", grid=grid)
    assert state.rotating("part") and not state.rotating("plate")
    assert "Pose of part: auto" in caplog.text and "-> rotating" in caplog.text and "-> fixed" in caplog.text
    forced = decide_poses({"part": turned, "plate": fixed}, "auto", {"part": "fixed"}, grid)
    assert (
        not forced.rotating("part") and forced.decisions["part"].reason == "data.pose_per_category.part=fixed"
    )
    assert PoseState.from_state(state.to_state()) == state


def _test_path_scores(checkpoint: Path, root: Path, output_dir: Path, category: str):
    """The test step's maths on a category's test images: the checkpoint's module, prompts as the test
    gives them (the category's first normal image, which is also its bank prompt)."""
    module = OneNIPModule.load(checkpoint)
    cfg = compose("train", tiny_data_overrides(root, output_dir, "data.test_prompt=first", *DATA_SETTINGS))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    records = [r for r in datamodule.test_records if r.category == category]
    loader = datamodule._prompted_loader(records)
    maps, scores, paths = [], [], []
    for batch in loader:
        rec_map, refiner_map, _ = module.prompted_maps(batch)
        anomaly_map, score = module.net.fuse(rec_map, refiner_map)
        maps.append(anomaly_map)
        scores.append(score)
        paths.extend(batch["path"])
    return torch.cat(maps), torch.cat(scores), paths, module


def test_auto_decision_travels_in_the_checkpoint(pose_checkpoint: Path) -> None:
    pose = torch.load(pose_checkpoint, map_location="cpu", weights_only=True)["pose"]
    assert pose["mode"] == "auto"
    assert pose["decisions"]["part"]["rotating"] is True
    assert pose["decisions"]["plate"]["rotating"] is False
    detector = OneNIPDetector.from_checkpoint(pose_checkpoint)
    assert detector.pose.rotating_categories == ["part"]
    assert detector.posed_prompt_features("part").shape[:2] == (1, 36)
    assert detector.posed_prompt_features("plate").shape[:2] == (1, 1)


def test_the_aligned_prompt_reconstructs_normal_parts_better() -> None:
    """A tiny OneNIP trained for a few seconds as data.pose_train trains (each prompt turned to its query's
    pose), then asked to reconstruct normal parts at new angles from the aligned and the unturned prompt."""
    torch.manual_seed(0)
    net = OneNIP(**{**TINY_MODEL_ARGS, "pretrained": True}, image_size=IMAGE_SIZE)
    grid = PoseGrid()
    normal = torch.stack(
        [
            torch.from_numpy(render_part(a, IMAGE_SIZE, seed=i)).permute(2, 0, 1)
            for i, a in enumerate(TRAIN_ANGLES)
        ]
    )
    posed = turned_features(net.extract_features, normal, grid, "cpu")
    features = posed[:, 0]
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    draw = torch.Generator().manual_seed(0)
    net.train()
    net.backbone.eval()
    for _ in range(150):
        queries = torch.randint(0, len(features), (8,), generator=draw)
        prompts = torch.randint(0, len(features), (8,), generator=draw)
        aligned = align_prompts(features[queries], posed[prompts][:, None])[0][:, 0]
        loss = torch.nn.functional.mse_loss(net.reconstruct(features[queries], aligned), features[queries])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    test = torch.stack(
        [
            torch.from_numpy(render_part(a, IMAGE_SIZE, seed=50 + i)).permute(2, 0, 1)
            for i, a in enumerate(TEST_ANGLES)
        ]
    )
    with torch.no_grad():
        query = net.extract_features(test.float() / 255)
        prompt = posed[:1]  # the part at 0 degrees
        aligned, turn = align_prompts(query, prompt)
        unturned = prompt[:, 0][None].expand(len(query), -1, -1, -1, -1)
        errors = {
            name: net.prompted_maps(query, prompts)[0].mean(dim=(1, 2, 3))
            for name, prompts in (("aligned", aligned), ("unturned", unturned))
        }
    print(f"\nturns {turn[:, 0].tolist()}; mean reconstruction error per image: {errors}")
    found = [grid.turns[int(t)][0] for t in turn[:, 0]]
    assert all(_circular_error(f, a) <= 5.0 for f, a in zip(found, TEST_ANGLES, strict=True)), found
    assert (errors["aligned"] < errors["unturned"]).all()


def test_detector_predict_and_onnx_give_the_test_scores(
    pose_checkpoint: Path, pose_root: Path, tmp_path: Path
) -> None:
    maps, scores, paths, module = _test_path_scores(pose_checkpoint, pose_root, tmp_path / "t", "part")
    assert module.pose.rotating("part")
    detector = OneNIPDetector.from_checkpoint(pose_checkpoint)
    detections = detector.predict([Path(p) for p in paths], category="part")
    detected = torch.tensor([d.score for d in detections])
    assert float((detected - scores).abs().max()) <= PARITY_TOLERANCE
    # the detector's maps come back at the file's size (128 px); the test's are at 64 px
    images = np.stack([load_image(p, IMAGE_SIZE) for p in paths])
    again = detector.predict(list(images), category="part")
    detected_maps = torch.from_numpy(np.stack([d.anomaly_map for d in again]))
    assert float((detected_maps - maps[:, 0]).abs().max()) <= PARITY_TOLERANCE

    out = tmp_path / "predict"
    report = predict_files(
        compose(
            "predict",
            [
                f"ckpt_path={pose_checkpoint}",
                f"input={pose_root / 'part' / 'test'}",
                "category=part",
                f"paths.output_dir={out}",
            ],
        )
    )
    with open(report.csv_path, newline="") as handle:
        rows = {Path(row["path"]).name + Path(row["path"]).parent.name: row for row in csv.DictReader(handle)}
    for path, score in zip(paths, scores.tolist(), strict=True):
        row = rows[Path(path).name + Path(path).parent.name]
        assert row["category"] == "part"
        assert abs(float(row["image_score"]) - score) <= PARITY_TOLERANCE

    compiled = OneNIPDetector.from_checkpoint(pose_checkpoint, runtime="onnxruntime")
    compiled_scores = torch.tensor([d.score for d in compiled.predict(list(images), category="part")])
    assert float((compiled_scores - scores).abs().max()) <= PARITY_TOLERANCE

    exported = export_detector(detector, tmp_path / "onnx")
    assert exported.max_abs_diff["image_score"] <= PARITY_TOLERANCE
    session = onnxruntime.InferenceSession(str(exported.model), providers=["CPUExecutionProvider"])
    bank = np.load(exported.prompt_features)
    assert bank["part"].shape[:2] == (1, 36) and bank["plate"].shape[:2] == (1, 1)
    onnx_maps, onnx_scores = session.run(None, {"image": images, "prompt_features": bank["part"]})
    assert float(np.abs(onnx_scores - scores.numpy()).max()) <= PARITY_TOLERANCE
    assert float(np.abs(onnx_maps - maps.numpy()).max()) <= PARITY_TOLERANCE


def test_a_checkpoint_without_pose_state_loads_as_fixed_and_says_so(
    pose_checkpoint: Path, pose_root: Path, tmp_path: Path, caplog
) -> None:
    checkpoint = torch.load(pose_checkpoint, map_location="cpu", weights_only=True)
    del checkpoint["pose"]
    old = tmp_path / "before_pose.ckpt"
    torch.save(checkpoint, old)
    with caplog.at_level(logging.WARNING):
        detector = OneNIPDetector.from_checkpoint(old)
    warnings = [r.getMessage() for r in caplog.records if "pose" in r.getMessage()]
    assert len(warnings) == 1 and str(old) in warnings[0] and "data.pose=fixed" in warnings[0]
    assert detector.pose.rotating_categories == []
    assert detector.posed_prompt_features("part").shape[:2] == (1, 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, scores, paths, module = _test_path_scores(old, pose_root, tmp_path / "t", "part")
    assert sum("holds no pose decisions" in r.getMessage() for r in caplog.records) == 1
    assert not module.pose.rotating("part")
    unturned = torch.tensor([d.score for d in detector.predict([Path(p) for p in paths], category="part")])
    assert float((unturned - scores).abs().max()) <= PARITY_TOLERANCE


def _datamodule(root: Path, **settings) -> OneNIPDataModule:
    return OneNIPDataModule(dataset="mvtec", root=str(root), image_size=IMAGE_SIZE, **settings)


def test_bad_pose_settings_are_refused_naming_them(pose_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.pose='sideways' is unknown"):
        _datamodule(pose_root, pose="sideways")
    datamodule = _datamodule(pose_root, pose="auto", pose_per_category={"gear": "rotating"})
    with pytest.raises(ConfigError, match=r"data.pose_per_category names 'gear'.*known: part, plate"):
        datamodule.setup()
    datamodule = _datamodule(pose_root, pose_per_category={"part": "upside_down"})
    with pytest.raises(ConfigError, match=r"data.pose_per_category.part='upside_down' is unknown"):
        datamodule.setup()
    single = tmp_path / "single"
    _save(single / "part" / "train" / "good" / "000.png", render_part(0))
    _save(single / "part" / "test" / "good" / "000.png", render_part(40))
    datamodule = _datamodule(single, pose="rotating", calibration_min_images=1)
    with pytest.raises(ConfigError, match=r"data.pose=rotating for category 'part', which has 1 normal"):
        datamodule.setup()
    auto = _datamodule(single, pose="auto", calibration_min_images=1)
    auto.setup()
    assert not auto.pose_state.rotating("part")


def test_a_bad_pose_setting_stops_the_cli_with_one_line(pose_root: Path, tmp_path: Path) -> None:
    result = run_cli(
        "onenip_pl.train",
        *tiny_overrides(pose_root, tmp_path, "logger=none", "data.pose_per_category={gear: rotating}"),
    )
    assert result.returncode == 1 and "Traceback" not in result.output, result.output
    assert "data.pose_per_category names 'gear'" in result.output
