"""Where the Hydra configs live, and composing them from Python."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The `conf/` directory: inside the installed wheel, else at the repository root."""
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"onenip_pl's Hydra configs were not found next to {_PACKAGE_DIR}; reinstall the package."
    )


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config exactly as the command line would, without running a job."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
