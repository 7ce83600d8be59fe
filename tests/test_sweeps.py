"""Hydra sweeps on tiny settings: the SLURM launcher config, a 2-job sweep through submitit's local
executor, a 2-trial Optuna search on the validation split; every job its own W&B offline run in one
group named after the sweep, and `sweep_summary.csv` with one row per job."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import submitit
from conftest import tiny_overrides
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf
from wandb_records import _records, run_config

from onenip_pl.config import config_dir
from onenip_pl.errors import ConfigError
from onenip_pl.train import optimized_value


def run_group(run_dir: Path) -> str:
    """The W&B group of an offline run, from its `run` record."""
    (run,) = [r.run for r in _records(run_dir) if r.WhichOneof("record_type") == "run"]
    return run.run_group


def _sweep(sweep_dir: Path, data_root: Path, *overrides: str) -> subprocess.CompletedProcess:
    tiny = [o for o in tiny_overrides(data_root, sweep_dir) if not o.startswith("paths.output_dir=")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    env.pop("WANDB_API_KEY", None)
    command = [
        sys.executable,
        "-m",
        "onenip_pl.train",
        "-m",
        *tiny,
        "logger=wandb",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _summary(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "sweep_summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def _job_runs(sweep_dir: Path, jobs: int) -> list[Path]:
    """Each job's single W&B offline run, all in the group named after the sweep."""
    runs = []
    for job in range(jobs):
        (run,) = (sweep_dir / str(job) / "wandb").glob("offline-run-*")
        runs.append(run)
    assert {run_group(run) for run in runs} == {f"train-{sweep_dir.name}"}
    return runs


def test_slurm_launcher_config_renders_a_multi_node_ddp_job(tmp_path: Path, monkeypatch) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(
            "train",
            ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)

    # render the sbatch script submitit would submit, from exactly what the launcher hands it;
    # submitit only looks for an `srun` on PATH before that, so a stand-in that never runs will do
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    queue_params = {k: v for k, v in params.items() if k not in ("submitit_folder", "max_num_timeout")}
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in queue_params.items()})
    script = executor._executor._make_submission_file_text("python -m onenip_pl.train", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4"):
        assert line in script


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local_launcher(tiny_demo_root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    _sweep(sweep_dir, tiny_demo_root, "hydra/launcher=local", "model.num_decoder_layers=1,2")

    assert list((sweep_dir / ".submitit").iterdir()), "the jobs did not run through submitit"
    for job in ("0", "1"):
        assert (sweep_dir / job / "metrics.json").is_file()
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
    configs = [run_config(run) for run in _job_runs(sweep_dir, 2)]
    assert [c["model"]["num_decoder_layers"] for c in configs] == [1, 2]
    assert all(c["data"]["image_size"] == 64 and c["trainer"]["max_epochs"] == 1 for c in configs)
    rows = _summary(sweep_dir)
    assert [row["job"] for row in rows] == ["0", "1"]
    for row, layers in zip(rows, (1, 2), strict=True):
        assert f"model.num_decoder_layers={layers}" in row["overrides"].split()
    assert all(0.0 <= float(row["test/image_AUROC"]) <= 1.0 for row in rows)


@pytest.mark.slow
def test_optuna_search_optimises_a_validation_metric(tiny_demo_root: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    _sweep(
        sweep_dir,
        tiny_demo_root,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "test=false",
    )
    rows = _summary(sweep_dir)
    assert [row["job"] for row in rows] == ["0", "1"]
    values = [float(row["val/pixel_AUROC"]) for row in rows]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert not any(key.startswith("test/") for key in rows[0]), "the search must not touch the test set"
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(values))
    configs = [run_config(run) for run in _job_runs(sweep_dir, 2)]
    learning_rates = [c["model"]["optimizer"]["lr"] for c in configs]
    assert len(set(learning_rates)) == 2 and all(1e-5 <= lr <= 1e-3 for lr in learning_rates)
    assert all(c["data"]["val_fraction"] == pytest.approx(0.2) for c in configs)


def test_a_missing_optimized_metric_is_named() -> None:
    assert optimized_value({"val/pixel_AUROC": 0.75}, "val/pixel_AUROC") == 0.75
    assert optimized_value({"val/pixel_AUROC": 0.75}, None) is None
    with pytest.raises(ConfigError, match="optimized_metric=val/pixel_AUROC .*data.val_fraction"):
        optimized_value({"test/pixel_AUROC": 0.75}, "val/pixel_AUROC")
