"""The README is the front door: every `python -m onenip_pl...` command it shows (and the benchmark
scripts' commands) must compose with the package's real Hydra configs, so a key renamed in the code
and forgotten in the README fails here."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from onenip_pl.config import config_dir

README = REPO_ROOT / "README.md"
CONFIG_OF = {
    "train": "train",
    "eval": "eval",
    "predict": "predict",
    "export": "export",
    "convert": "convert",
    "calibrate": "calibrate",
    "enroll": "enroll",
    "check": "train",
    "serve": "serve",
}
SCRIPTS = ("scripts/benchmark_quality.py", "scripts/benchmark.py")


def readme_commands() -> list[tuple[str, list[str]]]:
    """(entry point or script, its arguments) of every command line in the README's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            for position, token in enumerate(tokens):
                if (
                    token == "-m"
                    and position + 1 < len(tokens)
                    and tokens[position + 1].startswith("onenip_pl.")
                ):
                    commands.append((tokens[position + 1].removeprefix("onenip_pl."), tokens[position + 2 :]))
                elif token in SCRIPTS:
                    commands.append((token, tokens[position + 1 :]))
    return commands


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """A multirun's ``key=a,b`` composed with its first value: the keys are what is checked."""
    return [
        o.split(",")[0] if "=" in o and "," in o.split("=", 1)[1] and "[" not in o else o for o in overrides
    ]


def _compose(config_name: str, overrides: list[str]) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def _load_script(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS = readme_commands()


def test_the_readme_shows_every_entry_point() -> None:
    shown = {name for name, _ in COMMANDS}
    assert {"train", "eval", "predict", "export", "convert", "calibrate", "enroll", "check", "serve"} <= shown
    assert "scripts/benchmark_quality.py" in shown


@pytest.mark.parametrize(("entry", "arguments"), COMMANDS, ids=[" ".join([n, *a])[:90] for n, a in COMMANDS])
def test_a_readme_command_composes_with_the_real_config(entry: str, arguments: list[str]) -> None:
    if entry in SCRIPTS:
        script = _load_script(entry)
        if entry.endswith("benchmark_quality.py"):
            overrides = script.onenip_overrides(script.parse_args(arguments))
        else:
            overrides = script.config_overrides(script.parse_args(arguments))
        _compose("train", overrides)
        return
    overrides = [a for a in arguments if a != "-m" and not a.startswith("--")]
    _compose(CONFIG_OF[entry], _first_of_sweeps(overrides))


def test_the_readme_holds_no_placeholder() -> None:
    text = README.read_text()
    assert "@@" not in text and "CACHE_FIGURES" not in text
