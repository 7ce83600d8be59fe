"""What users hand us, tried through the real entry points in fresh processes: hostile and broken
checkpoints, release trees as shipped, a missing optional extra, logs without a terminal, DDP eval logs."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_cli, tiny_data_overrides, tiny_overrides
from dataset_trees import make_mvtec_tree

from onenip_pl import OneNIPDetector
from onenip_pl.errors import CheckpointError

pytest_plugins = ["fixtures_checkpoint"]


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: a real malicious pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def hostile(tiny_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint that is the tiny one plus a payload; and the file the payload would create."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "hostile.ckpt"
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "extra": Payload(marker)}, path)
    return path, marker


def _one_line_refusal(result, checkpoint: Path, words: str) -> None:
    assert result.returncode == 1, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if str(checkpoint) in line and words in line]
    assert len(lines) == 1, result.output


def _entry_points(checkpoint: Path, tiny_demo_root: Path, out: Path) -> dict[str, list[str]]:
    image = sorted(tiny_demo_root.glob("wood/test/*/*.png"))[0]
    normal = sorted(tiny_demo_root.glob("wood/train/good/*.png"))[0].parent
    return {
        "onenip_pl.train": [
            *tiny_overrides(tiny_demo_root, out / "train", "logger=none"),
            f"ckpt_path={checkpoint}",
        ],
        "onenip_pl.eval": [
            *tiny_overrides(tiny_demo_root, out / "eval", "logger=none"),
            f"ckpt_path={checkpoint}",
        ],
        "onenip_pl.calibrate": [
            f"ckpt_path={checkpoint}",
            *tiny_data_overrides(tiny_demo_root, out / "calibrate"),
        ],
        "onenip_pl.enroll": [
            f"ckpt_path={checkpoint}",
            "category=x",
            f"normal_images={normal}",
            f"paths.output_dir={out / 'e'}",
        ],
        "onenip_pl.predict": [
            f"ckpt_path={checkpoint}",
            f"input={image}",
            f"paths.output_dir={out / 'predict'}",
        ],
        "onenip_pl.export": [
            f"ckpt_path={checkpoint}",
            "format=torch_export",
            f"paths.output_dir={out / 'export'}",
        ],
        "onenip_pl.convert": [
            f"official_ckpt={checkpoint}",
            f"out={out / 'converted.ckpt'}",
            f"paths.output_dir={out / 'c'}",
        ],
    }


@pytest.mark.parametrize(
    "module",
    [
        "onenip_pl.train",
        "onenip_pl.eval",
        "onenip_pl.calibrate",
        "onenip_pl.enroll",
        "onenip_pl.predict",
        "onenip_pl.export",
        "onenip_pl.convert",
    ],
)
def test_a_hostile_checkpoint_never_runs_code_at_any_entry_point(
    module: str, hostile: tuple[Path, Path], tiny_demo_root: Path, tmp_path: Path
) -> None:
    checkpoint, marker = hostile
    result = run_cli(module, *_entry_points(checkpoint, tiny_demo_root, tmp_path)[module])
    assert not marker.exists(), f"{module} ran the checkpoint's code"
    _one_line_refusal(result, checkpoint, "is refused")
    assert "os.system" in result.output or "posix.system" in result.output, "the message names the culprit"


def test_a_hostile_checkpoint_never_runs_code_in_the_python_api(hostile: tuple[Path, Path]) -> None:
    from onenip_pl.lightning.module import OneNIPModule
    from onenip_pl.models import OneNIP

    checkpoint, marker = hostile
    for load in (OneNIPDetector.from_checkpoint, OneNIPModule.load):
        with pytest.raises(CheckpointError, match="is refused"):
            load(checkpoint)
    with pytest.raises(CheckpointError, match="is refused"):
        OneNIP(backbone="tf_efficientnet_lite0", image_size=64, backbone_weights=str(checkpoint))
    assert not marker.exists()


def test_broken_checkpoints_are_named_in_one_line(
    tiny_checkpoint: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])
    directory = tmp_path / "a_run"
    directory.mkdir()
    overrides = tiny_overrides(tiny_demo_root, tmp_path / "eval", "logger=none")
    for path, words in (
        (text, "not a readable torch checkpoint"),
        (truncated, "not a readable torch checkpoint"),
        (directory, "is a directory"),
    ):
        _one_line_refusal(run_cli("onenip_pl.eval", *overrides, f"ckpt_path={path}"), path, words)
    _one_line_refusal(
        run_cli("onenip_pl.eval", *overrides, f"ckpt_path={tmp_path / 'absent.ckpt'}"),
        tmp_path / "absent.ckpt",
        "does not exist",
    )


def test_a_release_tree_with_licences_and_a_validation_split_is_read_and_its_extras_listed(
    tmp_path: Path,
) -> None:
    make_mvtec_tree(tmp_path / "data", ("bottle",))
    result = run_cli("onenip_pl.check", "data.dataset=mvtec", f"data.root={tmp_path / 'data'}")
    assert result.returncode == 0, result.output
    assert "passed over 4 files that are not images" in result.output, "two of the root, two of bottle"
    for name in ("license.txt", "readme.txt", "validation"):
        assert name in result.output
    strict = run_cli(
        "onenip_pl.check", "data.dataset=mvtec", f"data.root={tmp_path / 'data'}", "data.strict=true"
    )
    assert strict.returncode == 1
    assert "license.txt is not an image (data.strict=true)" in strict.output
    assert "validation is not part of the layout (data.strict=true)" in strict.output


def test_export_without_the_deploy_extra_names_the_install(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """onnx and onnxruntime made unimportable in the child process, as in a plain `pip install -e .`."""
    result = run_cli(
        "onenip_pl.export",
        f"ckpt_path={tiny_checkpoint}",
        f"paths.output_dir={tmp_path}",
        timeout=300,
        blocked=("onnx", "onnxruntime"),
    )
    output = result.output
    assert result.returncode == 1 and "Traceback" not in output, output
    assert "pip install 'onenip-pl[deploy]'" in output and "onnx" in output
    assert not list(tmp_path.glob("*.onnx")), "nothing half-written"


def test_training_without_a_terminal_writes_progress_lines(tiny_demo_root: Path, tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(tiny_demo_root, tmp_path, "logger=none") if o != "progress=none"]
    log = tmp_path / "job.log"
    with log.open("w") as handle:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "onenip_pl.train",
                *overrides,
                "progress.every_n_steps=1",
                "trainer.max_epochs=2",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=600,
            cwd=REPO_ROOT,
            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
            check=True,
        )
    text = log.read_text()
    steps = [
        line for line in text.splitlines() if "epoch 1/2  step 1/4" in line or "epoch 2/2  step 3/4" in line
    ]
    assert len(steps) == 2, text
    for part in ("loss", "img/s", "elapsed", "left"):
        assert part in steps[0]
    (done,) = [line for line in text.splitlines() if "epoch 2/2 done" in line]
    assert " 0.0 img/s" not in done, "an epoch's line gives the epoch's speed"
    assert "test batch" in text


def test_on_a_terminal_the_rich_bar_is_used() -> None:
    """A real pseudo-terminal as stdout: the package picks Lightning's Rich bar there."""
    code = (
        "from onenip_pl.lightning.progress import progress_callback; "
        "print(type(progress_callback()).__name__)"
    )
    parent, child = pty.openpty()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=child, stderr=child, cwd=REPO_ROOT)
    os.close(child)
    output = b""
    while True:
        try:
            chunk = os.read(parent, 1024)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    process.wait(timeout=120)
    os.close(parent)
    assert b"RichProgressBar" in output, output


def test_eval_under_ddp_logs_from_rank_zero_only(
    tiny_checkpoint: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(tiny_demo_root, tmp_path, "logger=none", "trainer=ddp_cpu")
    result = run_cli("onenip_pl.eval", *overrides, f"ckpt_path={tiny_checkpoint}")
    assert result.returncode == 0, result.output
    data_lines = [line for line in result.output.splitlines() if "Data: mvtec at" in line]
    assert len(data_lines) == 1, result.output
    assert (tmp_path / "metrics.json").is_file()


def test_eval_applies_evaluation_settings_and_refuses_other_model_overrides(
    tiny_checkpoint: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(tiny_demo_root, tmp_path / "fixed", "logger=none")
    refused = run_cli("onenip_pl.eval", *overrides, f"ckpt_path={tiny_checkpoint}", "model.hidden_dim=64")
    assert refused.returncode == 1 and "Traceback" not in refused.output
    assert "model.hidden_dim=64 cannot change at eval: the checkpoint has hidden_dim=32" in refused.output
    lr = run_cli("onenip_pl.eval", *overrides, f"ckpt_path={tiny_checkpoint}", "model.optimizer.lr=0.1")
    assert lr.returncode == 1 and "model.optimizer.lr=0.1 cannot change at eval" in lr.output
    applied = tiny_overrides(tiny_demo_root, tmp_path / "official", "logger=none")
    result = run_cli("onenip_pl.eval", *applied, f"ckpt_path={tiny_checkpoint}", "model.fusion=official")
    assert result.returncode == 0, result.output
    report = json.loads((tmp_path / "official" / "metrics.json").read_text())
    assert "image_F1" not in report["mean"] and "image_F1max" in report["mean"], "the authors' fusion applied"
