"""The built wheel carries the Hydra configs: `python -m onenip_pl.train` works from a plain install."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("onenip_pl-*.whl")
    return path


def test_wheel_contains_configs_and_licence(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for config in (
        "train.yaml",
        "eval.yaml",
        "experiment/demo.yaml",
        "experiment/visa.yaml",
        "model/onenip.yaml",
    ):
        assert f"onenip_pl/conf/{config}" in names, f"{config} missing from the wheel"
    assert any(name.endswith("licenses/LICENSE") or name.endswith("/LICENSE") for name in names)


def test_installed_wheel_composes_and_runs_the_cli(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "NO_ALBUMENTATIONS_UPDATE": "1"}
    probe = (
        "import onenip_pl, onenip_pl.config as c; "
        "print(onenip_pl.__file__); print(c.config_dir()); "
        "print(c.compose('train', ['experiment=visa']).data.dataset)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert out[0].startswith(str(target)), "the wheel's package was not the one imported"
    assert out[1] == str(target / "onenip_pl" / "conf")
    assert out[2] == "visa"

    job = subprocess.run(
        [sys.executable, "-m", "onenip_pl.train", "--cfg", "job", "experiment=mvtec", "trainer.devices=4"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "dataset: mvtec" in job
    assert "devices: 4" in job
