"""Exceptions that stop a run with a message a user can act on."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

Config = TypeVar("Config")
Result = TypeVar("Result")


class OneNIPError(Exception):
    """Base class of the package's own errors."""


class DataError(OneNIPError, ValueError):
    """A data set, image or mask is missing, unreadable or inconsistent."""


class ConfigError(OneNIPError, ValueError):
    """A configuration value is invalid; the message names the setting."""


class CheckpointError(OneNIPError, ValueError):
    """A checkpoint file is unsafe, incompatible or has unexpected keys."""


def check_choice(setting: str, value: object, choices: tuple) -> None:
    """ConfigError naming ``setting`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{setting}={value!r} is unknown; use one of {choices}")


def run_or_exit(job: Callable[[Config], Result], config: Config, log: logging.Logger) -> Result:
    """Run a command-line entry point's job. A OneNIPError (bad input; its message says what to do) is
    logged on ``log`` and ends the process with status 1, instead of a traceback."""
    try:
        return job(config)
    except OneNIPError as err:
        log.error("%s", err)
        sys.exit(1)
