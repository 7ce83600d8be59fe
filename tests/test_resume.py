"""Resume and faults: a run SIGKILLed mid-epoch resumes with `ckpt_path=last` and ends with exactly the
weights of an uninterrupted run; a NaN loss stops training, naming the step; loader and dataset
pieces that make the resume exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from lightning.pytorch import Callback, LightningModule, Trainer

from onenip_pl.config import compose
from onenip_pl.data.datasets import ImageSource, TrainTripletDataset
from onenip_pl.data.readers import read_dataset
from onenip_pl.data.samplers import TrainShardSampler
from onenip_pl.data.synthesis import AnomalySynthesizer
from onenip_pl.errors import ConfigError
from onenip_pl.lightning.resume import ResumableTrainLoader
from onenip_pl.train import resolve_ckpt_path, train

TESTS_DIR = Path(__file__).resolve().parent
PAUSE_STEP = 4  # of 2 epochs x 3 steps: the second step of the second epoch
TRAINED_PARTS = ("net.reconstructor.", "net.refiner.")


class PauseAtStep(Callback):
    """Holds the run before training step `step` (the previous step's checkpoint is on disk by then)
    and writes `signal_file`, so that the test kills the process at a known place mid-epoch."""

    def __init__(self, step: int, signal_file: str) -> None:
        self.step = step
        self.signal_file = Path(signal_file)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.signal_file.write_text(str(os.getpid()))
            time.sleep(300)


def _start(data_root: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    overrides = tiny_overrides(
        data_root,
        run_dir,
        "logger=none",
        "test=false",
        "trainer.max_epochs=2",
        "++trainer.limit_train_batches=3",
        # one image per category held out for calibration: 15 training images, 3 steps of 4 per epoch
        "data.calibration_min_images=1",
        "trainer.deterministic=true",
        "callbacks.step_checkpoint.every_n_train_steps=2",
        *extra,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "onenip_pl.train", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-4000:]
    return output


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before pausing:\n{process.communicate()[0][-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run never reached the pause step")
        time.sleep(0.1)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_run(tiny_demo_root: Path, tmp_path) -> None:
    runs = tmp_path / "runs"
    paused = tmp_path / "paused"
    reference = _start(tiny_demo_root, tmp_path / "reference")
    victim = _start(
        tiny_demo_root,
        runs / "1-killed",
        f"+callbacks.pause._target_={__name__}.PauseAtStep",
        f"+callbacks.pause.step={PAUSE_STEP}",
        f"+callbacks.pause.signal_file={paused}",
    )
    _wait_for(paused, victim)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed = _load(runs / "1-killed" / "checkpoints" / f"step_{PAUSE_STEP:08d}.ckpt")
    assert (killed["epoch"], killed["global_step"]) == (1, PAUSE_STEP), "the kill was not mid-epoch"

    # the same command again, in a new run directory of the task, with ckpt_path=last
    output = _finish(_start(tiny_demo_root, runs / "2-resumed", "ckpt_path=last"))
    assert f"step_{PAUSE_STEP:08d}.ckpt" in output
    _finish(reference)

    expected = _load(tmp_path / "reference" / "checkpoints" / "last.ckpt")
    resumed = _load(runs / "2-resumed" / "checkpoints" / "last.ckpt")
    for state in (expected, resumed):
        assert (state["epoch"], state["global_step"]) == (1, 6), "not the end of 2 epochs x 3 steps"
    assert resumed["state_dict"].keys() == expected["state_dict"].keys()
    different = [k for k, v in expected["state_dict"].items() if not _same(v, resumed["state_dict"][k])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"
    assert resumed["state_dict"]["post_processor._extra_state"]["calibrated"] and resumed["prompt_bank"]
    scheduler = resumed["lr_schedulers"][0]
    assert scheduler == expected["lr_schedulers"][0]
    expected_moments = expected["optimizer_states"][0]["state"]
    resumed_moments = resumed["optimizer_states"][0]["state"]
    for key, moments in expected_moments.items():
        assert torch.equal(moments["exp_avg_sq"], resumed_moments[key]["exp_avg_sq"])


@pytest.mark.parametrize(
    ("lr", "message"),
    [
        # a finite first update so large that the next loss is NaN
        ("1e30", r"non-finite training loss at global step 1 "),
        # an update that leaves the weights inf/NaN after a finite loss: caught before its checkpoint
        ("inf", r"non-finite weights at global step 1 "),
    ],
)
def test_non_finite_training_stops_naming_the_step(tiny_demo_root: Path, tmp_path: Path, lr, message) -> None:
    overrides = tiny_overrides(
        tiny_demo_root,
        tmp_path,
        "logger=none",
        f"model.optimizer.lr={lr}",
        "++trainer.limit_train_batches=4",
        "callbacks.step_checkpoint.every_n_train_steps=1",
    )
    with pytest.raises(FloatingPointError, match=message):
        train(compose("train", overrides))
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        trained = [v for k, v in _load(path)["state_dict"].items() if k.startswith(TRAINED_PARTS)]
        assert trained and all(torch.isfinite(w).all() for w in trained), f"{path} holds NaN/inf weights"


def _same(expected: object, actual: object) -> bool:
    """Equal tensors, or equal values of anything else (the post-processor's calibration)."""
    if isinstance(expected, torch.Tensor):
        return isinstance(actual, torch.Tensor) and torch.equal(expected, actual)
    return expected == actual


def _triplets(data_root: Path) -> TrainTripletDataset:
    records = [r for r in read_dataset("mvtec", data_root, None) if r.split == "train"]
    return TrainTripletDataset(ImageSource(records, 64), AnomalySynthesizer(64), seed=5)


def test_synthesis_is_keyed_by_epoch_and_position_not_by_process_state(tiny_demo_root: Path) -> None:
    dataset = _triplets(tiny_demo_root)
    first = dataset[(0, 0, 0)]
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(dataset[(0, 0, 0)]["synthetic"], first["synthetic"])
    # the same image at another position (another rank) or in another epoch is synthesised anew
    assert not torch.equal(dataset[(0, 0, 1)]["synthetic_mask"], first["synthetic_mask"])
    assert not torch.equal(dataset[(0, 1, 0)]["synthetic_mask"], first["synthetic_mask"])


def _positions(loader: ResumableTrainLoader) -> list[int]:
    return [p for _, _, p in loader.sampler]


def test_loader_state_skips_consumed_batches_on_any_rank_count(tiny_demo_root: Path) -> None:
    dataset = _triplets(tiny_demo_root)
    categories = [dataset.source.records[i].category for i in dataset.indices]

    def loader(rank: int, world: int) -> ResumableTrainLoader:
        return ResumableTrainLoader(dataset, TrainShardSampler(categories, 7, rank, world), 7, batch_size=2)

    single = loader(0, 1)
    single.sampler.set_epoch(3)
    batches = iter(single)
    consumed = [next(batches)["query"] for _ in range(2)]
    state = single.state_dict()
    assert state == {"epoch": 3, "next_position": 4}
    assert len(consumed) == 2

    # resumed on 2 ranks, the remaining global positions 4.. are split between them, none repeated
    remaining = []
    for rank in (0, 1):
        resumed = loader(rank, 2)
        resumed.load_state_dict(state)
        resumed.sampler.set_epoch(3)
        resumed.sampler.begin()
        remaining += _positions(resumed)
    assert sorted(remaining) == list(range(4, len(dataset)))
    # a new epoch starts from its beginning again
    resumed.sampler.set_epoch(4)
    resumed.sampler.begin()
    assert _positions(resumed)[0] == 1


def _checkpoint(path: Path, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_ckpt_path_last_picks_the_newest_checkpoint_of_the_task(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _checkpoint(runs / "a" / "checkpoints" / "last.ckpt", age=30)
    newest = _checkpoint(runs / "b" / "checkpoints" / "step_00000100.ckpt", age=10)
    (runs / "b" / "checkpoints" / "dangling.ckpt").symlink_to("gone.ckpt")
    assert resolve_ckpt_path("last", runs / "new") == str(newest)
    assert resolve_ckpt_path("some/file.ckpt", runs / "new") == "some/file.ckpt"
    # a requeued sweep job resumes from its own directory and never from a sibling job's
    own = _checkpoint(runs / "a" / "checkpoints" / "step_00000050.ckpt", age=20)
    assert resolve_ckpt_path("last", runs / "a", search_other_runs=False) == str(own)
    with pytest.raises(ConfigError, match="no checkpoint found under .*new/checkpoints"):
        resolve_ckpt_path("last", runs / "new", search_other_runs=False)
