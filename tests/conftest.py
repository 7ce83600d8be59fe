"""Shared fixtures: environment for offline runs, the shared reference material, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying why (a user's clone has no shared/)."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference material {path} is absent (it exists only beside the project's CI checkout)")
    return path


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    yield


# The model every quick test uses: EfficientNet-Lite0 without weights and a two-head transformer.
TINY_MODEL_ARGS = {
    "backbone": "tf_efficientnet_lite0",
    "pretrained": False,
    "hidden_dim": 32,
    "num_heads": 2,
    "feedforward_dim": 64,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "refiner_channels": 16,
}
# the same as Hydra overrides of the model group
TINY_MODEL = [
    f"model.{key}={str(value).lower() if isinstance(value, bool) else value}"
    for key, value in TINY_MODEL_ARGS.items()
]


def tiny_overrides(data_root: Path, output_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long CPU run on a small MVTec-layout tree."""
    return [
        "experiment=demo",
        "data.dataset=mvtec",
        f"data.root={data_root}",
        "data.image_size=64",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "data.persistent_workers=false",
        *TINY_MODEL,
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "++trainer.limit_train_batches=2",
        "++trainer.enable_model_summary=false",
        "progress=none",
        "++callbacks.model_summary=null",
        "callbacks.report.images_per_category=0",
        "callbacks.report.curves=false",
        f"paths.output_dir={output_dir}",
        f"paths.log_dir={output_dir}/logs",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory) -> Path:
    """A small seeded demo data set in MVTec AD layout (3 categories, 64-px-friendly)."""
    from onenip_pl.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    return generate_demo_dataset(
        root, seed=0, image_size=128, num_train=6, num_test_good=2, num_test_defect=3
    )


def tiny_data_overrides(data_root: Path, output_dir: Path, *extra: str) -> list[str]:
    """The data settings of `tiny_overrides`, for entry points without trainer, model or callbacks."""
    keep = ("experiment=", "data.", "paths.")
    return [o for o in tiny_overrides(data_root, output_dir) if o.startswith(keep)] + list(extra)


def run_cli(
    module: str,
    *arguments: str,
    timeout: int = 600,
    extra_env: dict | None = None,
    blocked: tuple[str, ...] = (),
):
    """``python -m <module> <arguments>`` in a fresh process, as a user runs it; stdout+stderr joined.

    ``blocked`` packages cannot be imported in that process (None in sys.modules), as after a plain
    ``pip install -e .`` without the extra that brings them.
    """
    import subprocess
    import sys

    environment = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "WANDB_MODE": "offline",
        **(extra_env or {}),
    }
    command = [sys.executable, "-m", module, *arguments]
    if blocked:
        block = "".join(f"sys.modules[{name!r}] = None; " for name in blocked)
        code = (
            f"import runpy, sys; {block}sys.argv = [{module!r}, *{list(arguments)!r}]; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
        )
        command = [sys.executable, "-c", code]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO_ROOT
    )
    result.output = result.stdout + result.stderr
    return result
