"""Scale: DDP on CPU (2 processes over gloo) through the real command line, mixed precision,
gradient accumulation and torch.compile.

Lightning starts DDP rank 1 by re-running the command line, so these tests run
`python -m onenip_pl.train` / `python -m onenip_pl.eval` as subprocesses. One
sweep job covers: training and testing on 2 ranks, rank 1 re-running that job
(not the sweep), identical initial weights, different synthesis per rank,
rank-zero checkpoint/W&B/console, the per-device and global batch in the W&B
config, and test metrics equal to a 1-process evaluation of the same checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from conftest import tiny_overrides
from lightning.pytorch import Callback, LightningModule, Trainer
from omegaconf import OmegaConf
from torch._dynamo import register_backend
from wandb_records import run_config

from onenip_pl.config import compose
from onenip_pl.eval import evaluate
from onenip_pl.models import OneNIP
from onenip_pl.models.losses import onenip_loss
from onenip_pl.train import train

TESTS_DIR = Path(__file__).resolve().parent


def _digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


class RankProbe(Callback):
    """Writes what one DDP rank saw to `<out_dir>/rank<R>.json`: weights before DDP wraps the model,
    its first training batch, and its weights after training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict = {}

    def _weights(self, pl_module: LightningModule) -> str:
        return _digest(p for p in pl_module.net.parameters() if p.requires_grad)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.record.update(rank=trainer.global_rank, initial_weights=self._weights(pl_module))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        if batch_idx == 0 and "first_synthetic" not in self.record:
            self.record["first_synthetic"] = _digest([batch["synthetic"], batch["synthetic_mask"]])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["final_weights"] = self._weights(pl_module)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def run_cli(module: str, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _without_output_dir(overrides: list[str]) -> list[str]:
    """In a sweep every job needs its own directory: leave paths.output_dir to Hydra."""
    return [o for o in overrides if not o.startswith("paths.output_dir=")]


def _scores(path: Path) -> str:
    """The mean and per-category metrics as canonical JSON (exact comparison, NaN included)."""
    report = json.loads(path.read_text())
    return json.dumps({"mean": report["mean"], "per_category": report["per_category"]}, sort_keys=True)


@pytest.mark.slow
def test_ddp_sweep_job_trains_and_tests_on_two_cpu_processes(tiny_demo_root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    probe_dir = tmp_path / "probe"
    overrides = _without_output_dir(tiny_overrides(tiny_demo_root, tmp_path))
    result = run_cli(
        "onenip_pl.train",
        "-m",
        *overrides,
        "trainer=ddp_cpu",
        "logger=wandb",
        f"hydra.sweep.dir={sweep_dir}",
        f"+callbacks.rank_probe._target_={__name__}.RankProbe",
        f"+callbacks.rank_probe.out_dir={probe_dir}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_dir = sweep_dir / "0"
    test_images = sum(1 for p in tiny_demo_root.glob("*/test/*/*") if p.is_file())
    assert test_images % 2 == 1, "an odd test set checks that no image is padded or dropped"

    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["initial_weights"] == ranks[1]["initial_weights"], "seeded init differs across ranks"
    assert ranks[0]["first_synthetic"] != ranks[1]["first_synthetic"], "ranks synthesised the same batch"
    assert ranks[0]["final_weights"] == ranks[1]["final_weights"], "DDP replicas drifted apart"

    # rank 1 re-ran this job in single-run mode inside the job's directory: no second sweep, no stray run
    assert [p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] == ["0"]
    assert not list(tmp_path.glob("logs/**/runs"))
    combined = result.stdout + result.stderr
    assert combined.count("Instantiating datamodule") == 1, "rank 1 printed its INFO log lines too"

    assert [p.name for p in (job_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    (wandb_run,) = (job_dir / "wandb").glob("offline-run-*")
    config = run_config(wandb_run)
    assert (config["per_device_batch_size"], config["world_size"], config["global_batch_size"]) == (4, 2, 8)
    with (sweep_dir / "sweep_summary.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["test/pixel_AUROC"]) == pytest.approx(
        json.loads((job_dir / "metrics.json").read_text())["mean"]["pixel_AUROC"]
    )

    # the same checkpoint evaluated by 2 processes and by 1 scores exactly as the training run's test
    checkpoint = job_dir / "checkpoints" / "last.ckpt"
    two = run_cli(
        "onenip_pl.eval",
        *tiny_overrides(tiny_demo_root, tmp_path / "eval2", "logger=none"),
        "trainer=ddp_cpu",
        f"ckpt_path={checkpoint}",
        f"hydra.run.dir={tmp_path / 'eval2'}",
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    torch.set_num_threads(1)
    one = tiny_overrides(tiny_demo_root, tmp_path / "eval1", "logger=none", f"ckpt_path={checkpoint}")
    evaluate(compose("eval", one))
    trained = _scores(job_dir / "metrics.json")
    assert _scores(tmp_path / "eval2" / "metrics.json") == trained
    assert _scores(tmp_path / "eval1" / "metrics.json") == trained


def test_bf16_mixed_run_with_gradient_accumulation(tiny_demo_root: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tiny_demo_root,
        tmp_path,
        "logger=csv",
        "trainer.precision=bf16-mixed",
        "trainer.accumulate_grad_batches=2",
    )
    metrics = train(compose("train", overrides))
    assert all(0.0 <= metrics[f"test/{name}"] <= 1.0 for name in ("image_AUROC", "pixel_AUROC"))
    (hparams,) = tmp_path.glob("csv/*/hparams.yaml")
    logged = OmegaConf.load(hparams)
    assert (logged.per_device_batch_size, logged.global_batch_size) == (4, 8)
    # 2 batches, accumulated into 1 optimiser step
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def _tiny_net() -> OneNIP:
    return OneNIP(
        backbone="tf_efficientnet_lite0",
        image_size=64,
        hidden_dim=32,
        num_heads=2,
        feedforward_dim=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        refiner_channels=16,
    )


def test_maps_and_losses_stay_float32_under_autocast() -> None:
    net = _tiny_net()
    images = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = net(images, images.flip(0))
        masks = torch.zeros(2, 1, 64, 64)
        reconstruction, features = output["reconstruction"], output["query_features"]
        losses = onenip_loss(reconstruction, features, output["refiner_logit"], masks)
    assert output["reconstruction"].dtype == torch.bfloat16, "autocast was not active"
    for name in ("rec_map", "refiner_map", "anomaly_map", "image_score"):
        assert output[name].dtype == torch.float32, name
    assert all(loss.dtype == torch.float32 for loss in losses.values())


def test_fp16_mixed_on_cpu_falls_back_to_bf16(tmp_path: Path) -> None:
    overrides = [f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.precision=16-mixed"]
    cfg = compose("train", overrides)
    with pytest.warns(UserWarning, match="not supported on CPU"):
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert trainer.precision == "bf16-mixed"


def test_compiled_reconstructor_trains(tiny_demo_root: Path, tmp_path: Path) -> None:
    """model.compile=<backend> compiles the reconstructor at fit time. The backend here records the
    graphs and runs them as captured: inductor's C++ build of them takes minutes on a small CPU."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    register_backend(capture, name="onenip_test_capture")
    overrides = tiny_overrides(tiny_demo_root, tmp_path, "logger=none", "test=false")
    train(compose("train", [*overrides, "model.compile=onenip_test_capture"]))
    assert graphs, "the reconstructor was not compiled"
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    assert not any("_orig_mod" in key for key in state["state_dict"]), "compiling renamed the weights"
